"""Dynamo graphs whose inputs are lists: flattened for aot_module_simplified.

Note [Nested graph inputs]
~~~~~~~~~~~~~~~~~~~~~~~~~~
``aot_module_simplified`` takes a flat list of graph inputs (tensors, SymInts,
scalars).  Dynamo does not always hand a backend one: the graph of a backward
captured by compiled autograd (``torch._dynamo.config.compiled_autograd``)
takes the backward's tensors as *one list* (and may take lists of sizes and
scalars), read inside the graph with ``getitem``.  Dynamo also marks such a
placeholder ``meta["steal_arg"]``: the callee owns the list and should empty
it, so that its tensors die when the callee is done with them rather than
when the caller's frame ends.

The backends rewrite such a graph before compiling it: each list or tuple
placeholder becomes one placeholder per leaf, and a ``list(...)`` /
``tuple(...)`` node rebuilds the value the rest of the graph reads (the
nodes are copied with their meta, so Note [Node metadata] and inductor's
pre-grad passes see a GraphModule as usual).  The compiled function is
wrapped to flatten each call's arguments the same way, emptying the stolen
lists first.  Any other container (a dict) is a TypeError naming the input.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

__all__ = ["is_nested", "compile_flattened"]


def is_nested(example_inputs: Sequence[Any]) -> bool:
    """Whether some graph input is a container (Note [Nested graph inputs])."""
    return any(isinstance(x, (list, tuple, dict)) for x in example_inputs)


def _leaves(value: Any, out: list) -> list:
    if isinstance(value, (list, tuple)):
        for v in value:
            _leaves(v, out)
    else:
        out.append(value)
    return out


def _check(value: Any, where: str) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        raise TypeError(f"aotgrad's backends take graph inputs that are tensors, SymInts, "
                        f"scalars or lists/tuples of them; graph input {where} is a dict")


def _flat_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    k = 0

    def build(value: Any, name: str, like: fx.Node) -> fx.Node:
        if isinstance(value, (list, tuple)):
            parts = [build(v, f"{name}_{i}", like) for i, v in enumerate(value)]
            return graph.call_function(type(value) if type(value) in (list, tuple)
                                       else tuple, (parts,))
        node = graph.placeholder(name)
        node.meta.update({key: like.meta[key] for key in ("stack_trace", "nn_module_stack")
                          if key in like.meta})
        return node

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = example_inputs[k]
            k += 1
            if isinstance(value, (list, tuple)):
                env[node] = build(value, node.name, node)
                continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)


def compile_flattened(compile_flat: Callable[[fx.GraphModule, list], Callable],
                      gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """``compile_flat(flat_gm, flat_inputs)`` for a graph with list inputs;
    returns a callable taking the original (nested) arguments."""
    for i, x in enumerate(example_inputs):
        _check(x, str(i))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise TypeError(f"the graph has {len(placeholders)} inputs but {len(example_inputs)} "
                        f"example inputs were given")
    stolen = [i for i, (node, x) in enumerate(zip(placeholders, example_inputs))
              if isinstance(x, list) and node.meta.get("steal_arg", False)]
    compiled = compile_flat(_flat_graph(gm, example_inputs), _leaves(list(example_inputs), []))

    def run(*args: Any) -> Any:
        flat = _leaves(args, [])
        for i in stolen:  # the caller handed these lists over
            args[i].clear()
        return compiled(*flat)

    return run
