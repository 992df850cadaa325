"""Ready-made compilers: TorchScript (``ts_compile``, ``nnc_jit``) and
``memory_efficient_fusion``, plus the ``default_decompositions`` they use.

``ts_compile`` turns one of aotgrad's ATen graphs into a TorchScript function.
TorchScript cannot script everything ``make_fx`` writes, so it works on a copy
of the graph (the caller's graph is left alone) and rewrites it first:

    def forward(self, primals_1, primals_2):             # before
        ones = torch.ops.aten.ones.default([3], device = device(type='cpu'), pin_memory = False)
        mul = torch.ops.aten.mul.Tensor(primals_1, ones)
        return (mul, None, primals_2)

    def forward(self, primals_1, primals_2):             # after
        ones = torch.ops.aten.ones([3], device = 'cpu', pin_memory = False)
        mul = torch.ops.aten.mul(primals_1, ones)
        return (mul, primals_2)                          # None put back by the wrapper

* targets ``OpOverload`` -> their ``OpOverloadPacket`` (TorchScript resolves
  the overload from the argument types again);
* ``torch.device`` arguments -> strings (``'cpu'``, ``'cuda:1'``);
* the output becomes one flat tuple of the graph's *node* outputs; constants in
  the output (``None`` gradients, ints) are put back around the call, in the
  original container (tuple or list);
* placeholders holding SymInt/SymFloat/SymBool are annotated ``int`` /
  ``float`` / ``bool``.

The scripted module is frozen (constants inlined); ``optimize_for_inference``
is not applied (it may change layouts and numerics, and backward graphs are not
inference).  The example inputs are usually fake tensors, so the graph is never
run at compile time.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import _torch
from .api import aot_function, aot_module

aten = torch.ops.aten

__all__ = ["ts_compile", "nnc_jit", "memory_efficient_fusion", "default_decompositions"]


# ---------------------------------------------------------------- ts_compile

_SYM_ANNOTATIONS = ((torch.SymInt, int), (torch.SymFloat, float), (torch.SymBool, bool),
                    (bool, bool), (int, int), (float, float))


def _scriptable_arg(value: Any) -> Any:
    """Rewrite one argument (recursively in lists/tuples/dicts) for TorchScript."""
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_scriptable_arg(v) for v in value)
    if isinstance(value, dict):
        return {k: _scriptable_arg(v) for k, v in value.items()}
    return value


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (same attributes)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _prepare_for_script(gm: fx.GraphModule) -> tuple[fx.GraphModule, Callable[[tuple], Any]]:
    """Rewrite a copy of ``gm`` so that TorchScript can script it.

    Returns the copy and ``rebuild``, which turns the copy's flat tuple of
    outputs back into the original graph's output structure.
    """
    gm = _copy_graph_module(gm)
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            for sym_type, py_type in _SYM_ANNOTATIONS:
                if isinstance(val, sym_type):
                    node.type = py_type
                    break
        elif node.op == "call_function":
            target = node.target
            if isinstance(target, _torch.OpOverload):
                node.target = target.overloadpacket
            elif isinstance(target, _torch.HigherOrderOperator):
                raise RuntimeError(
                    f"ts_compile: TorchScript cannot script the higher-order operator "
                    f"{target.name()} in\n  {node.format_node()}\nUse another compiler "
                    "(aotgrad.nop, or inductor) for this graph.")
            node.args = _scriptable_arg(node.args)
            node.kwargs = _scriptable_arg(node.kwargs)

    (output_node,) = graph.find_nodes(op="output")
    result = output_node.args[0]
    leaves, spec = _torch.pytree.tree_flatten(result)
    node_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]
    output_node.args = (tuple(leaves[i] for i in node_positions),)
    graph.lint()
    gm.recompile()

    flat_nodes = (isinstance(result, (tuple, list)) and len(result) == len(leaves)
                  and len(node_positions) == len(leaves))
    if flat_nodes and type(result) is tuple:
        def rebuild(flat: tuple) -> Any:  # the usual case: nothing to rebuild
            return flat
    elif flat_nodes and type(result) is list:
        rebuild = list
    elif len(node_positions) == len(leaves):
        def rebuild(flat: tuple) -> Any:
            return _torch.pytree.tree_unflatten(list(flat), spec)
    else:
        def rebuild(flat: tuple) -> Any:
            full = list(leaves)
            for i, value in zip(node_positions, flat):
                full[i] = value
            return _torch.pytree.tree_unflatten(full, spec)
    return gm, rebuild


def ts_compile(fx_g: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Compile an ATen FX graph with TorchScript; returns a boxed callable.

    ``fx_g`` itself is not modified.  ``example_inputs`` (often fake tensors)
    are not run.  Raises, naming the node, for graphs TorchScript cannot
    script (e.g. higher-order operators).
    """
    gm, rebuild = _prepare_for_script(fx_g)
    with _torch.jit_autocast_disabled(), warnings.catch_warnings():
        # GraphModule.__init__'s instance annotations are not TorchScript types;
        # TorchScript warns about them although forward() is all it compiles.
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
        # ts_compile is TorchScript by request: its deprecation notices are noise here.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        try:
            scripted = torch.jit.script(gm)
        except Exception as e:
            raise RuntimeError(
                f"ts_compile: torch.jit.script failed on this graph:\n{gm.code}") from e
        try:
            # Freezing inlines get_attr constants.  It changes no numerics here
            # (weights are graph inputs, not attributes), so it is safe; if it
            # fails the unfrozen module is just as correct.
            scripted = torch.jit.freeze(scripted.eval())
        except Exception:  # noqa: BLE001 - freezing is an optimisation only
            pass

    def run(args: list) -> Any:
        return rebuild(scripted(*args))

    run._boxed_call = True  # type: ignore[attr-defined]
    run.scripted = scripted  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]
    return run


# ---------------------------------------------------------------- nnc_jit

def nnc_jit(fn: Callable, static_argnums: Sequence[int] | None = None) -> Callable:
    """``aot_function(fn)`` with TorchScript-compiled forward and backward graphs.

    ``static_argnums`` is accepted for compatibility: aotgrad always treats
    non-tensor arguments as compile-time constants (a new value recompiles),
    so there is nothing to do; a tensor at a static position is an error.
    """
    compiled = aot_function(fn, fw_compiler=ts_compile, bw_compiler=ts_compile)
    if not static_argnums:
        return compiled
    static = tuple(static_argnums)

    def call(*args: Any, **kwargs: Any) -> Any:
        for i in static:
            if isinstance(args[i], torch.Tensor):
                raise TypeError(
                    f"nnc_jit: argument {i} is marked static but is a tensor; "
                    "only non-tensor arguments can be static")
        return compiled(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    call.__name__ = getattr(fn, "__name__", "nnc_jit")
    return call


# ---------------------------------------------------------------- decompositions

default_decompositions = _torch.get_decompositions([
    aten.detach,
    aten.gelu_backward,
    aten.leaky_relu_backward,
    aten.sigmoid_backward,
    aten.threshold_backward,
    aten.hardtanh_backward,
    aten.hardsigmoid_backward,
    aten.hardswish_backward,
    aten.tanh_backward,
    aten.silu_backward,
    aten.elu_backward,
    aten.cudnn_batch_norm,
    aten.cudnn_batch_norm_backward,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.elu,
    aten.leaky_relu,
    aten.hardtanh,
    aten.hardswish,
    aten.hardsigmoid,
    aten.conj_physical,
    aten.is_same_size,
])


# ---------------------------------------------------------------- memory_efficient_fusion

def _min_cut_partition() -> Callable:
    from . import partition

    return partition.min_cut_rematerialization_partition


def memory_efficient_fusion(fn: Callable | nn.Module, **kwargs: Any) -> Callable | nn.Module:
    """``aot_module`` (for modules) or ``aot_function`` with TorchScript compilers,
    the min-cut rematerialization partitioner and ``default_decompositions``.

    ``kwargs`` override any of these (and pass other ``aot_function`` options).
    """
    settings: dict[str, Any] = {
        "fw_compiler": ts_compile,
        "bw_compiler": ts_compile,
        "partition_fn": _min_cut_partition(),
        "decompositions": default_decompositions,
    }
    settings.update(kwargs)
    if isinstance(fn, nn.Module):
        return aot_module(fn, **settings)
    return aot_function(fn, **settings)
