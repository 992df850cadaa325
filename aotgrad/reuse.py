"""The second program of a double backward reads the first's saved values.

Note [Saved values in the second program]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The differentiable backward (Note [Higher-order backward], higher_order.py)
runs the traced program again from its graph inputs, so its joint graph
recomputes the forward: a critic's convolutions, once in the first
program's forward and again in the second's.  Yet the first program saved
many of those values for its backward, and they are at hand when the second
program is called (``ctx.saved_tensors``).  So the second program takes them
as extra inputs, after the graph inputs and before the tangents, and a pass
on its joint graph (``ReusingPartition``, run before the user's partitioner)
replaces each node that computes the same value as one of them by that
input; what only fed those nodes is then dead and dropped.

"The same value" is decided on the graphs, by value numbering: a node's
number is given by its op, its constant arguments and its arguments'
numbers, a graph input's by its index; the first program's numbers are made
first and the second's looked up in the same table, so equal numbers mean
the same op applied to the same values of the same inputs.  Only
deterministic, non-mutating ops get numbers (a random op or an in-place one
never equals anything; random ops are refused for double backward anyway),
and only saved values that are neither graph inputs nor views (an input
aliasing another would change what the program is) are offered.  A value
given whose metadata differs from the node's (a compiler's other output
strides) is not used for it.  The programs that mutate inputs keep their
recomputation (their second run changes copies), and so do those with graph
inputs that are not tensors (a symbolic size dynamo passes): the second
program is called with that size as a plain int, a constant of its trace
rather than an input, so its inputs' indices are not the first program's.
Eager's double backward reads the saved activations too: the values are the
first forward's, not a recomputation.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch
from .descriptors import DESC, Primal
from .views import is_view_op

_UNIQUE = object()


def _constant_key(value: Any) -> Any:
    """A hashable stand-in for a constant argument (``_UNIQUE`` if none)."""
    if isinstance(value, (list, tuple)):
        parts = tuple(_constant_key(v) for v in value)
        return _UNIQUE if any(p is _UNIQUE for p in parts) else (type(value).__name__, parts)
    if isinstance(value, float):
        return ("float", repr(value))      # 0.0 and -0.0 differ
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device,
                                           torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    return _UNIQUE


class ValueNumbers:
    """Note [Saved values in the second program]: numbers shared by graphs."""

    def __init__(self) -> None:
        self._table: dict[tuple, int] = {}
        self._next = 0

    def _fresh(self) -> int:
        self._next += 1
        return -self._next               # never in the table

    def number(self, graph: fx.Graph, input_key: Callable[[fx.Node], Any],
               add: bool) -> dict[fx.Node, int]:
        """Each node's number; ``add``: new keys enter the table (else they
        get fresh numbers, equal to nothing)."""
        numbers: dict[fx.Node, int] = {}

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return ("node", numbers[a])
            if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
                return (type(a).__name__, tuple(arg(x) for x in a))
            return _constant_key(a)

        for n in graph.nodes:
            key: Any = _UNIQUE
            if n.op == "placeholder":
                k = input_key(n)
                key = ("input", k) if k is not None else _UNIQUE
            elif n.op == "call_function" and _numbered(n.target):
                args = tuple(arg(a) for a in n.args)
                kwargs = tuple(sorted((k, arg(v)) for k, v in n.kwargs.items()))
                if not any(a is _UNIQUE for a in args) and \
                        not any(v is _UNIQUE for _, v in kwargs):
                    key = (n.target, args, kwargs)
            if key is _UNIQUE:
                numbers[n] = self._fresh()
            elif key in self._table:
                numbers[n] = self._table[key]
            elif add:
                numbers[n] = self._table[key] = len(self._table)
            else:
                numbers[n] = self._fresh()
        return numbers


def _numbered(target: Any) -> bool:
    if target is operator.getitem:
        return True
    if not isinstance(target, _torch.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags



def _primal_index(n: fx.Node) -> int | None:
    desc = n.meta.get(DESC)
    return desc.index if isinstance(desc, Primal) else None


def offered_values(fw_gm: fx.GraphModule, num_fwd_outputs: int, num_saved_tensors: int
                   ) -> tuple[tuple[int, ...], ValueNumbers, dict[int, int]]:
    """The saved tensors (indices) the second program may read instead of
    recomputing them, the numbers, and per offered value's number its
    position among the offered values."""
    vn = ValueNumbers()
    numbers = vn.number(fw_gm.graph, _primal_index, add=True)
    saved = fw_gm.graph.output_node().args[0][num_fwd_outputs:num_fwd_outputs + num_saved_tensors]
    offered: list[int] = []
    position: dict[int, int] = {}
    for j, s in enumerate(saved):
        if not isinstance(s, fx.Node) or s.op != "call_function" or is_view_op(s.target) or \
                s.target is operator.getitem and is_view_op(getattr(s.args[0], "target", None)):
            continue
        val = s.meta.get("val")
        if not isinstance(val, torch.Tensor) or numbers[s] < 0 or numbers[s] in position:
            continue
        if any(isinstance(d, torch.SymInt) for d in (*val.shape, *val.stride())):
            continue
        position[numbers[s]] = len(offered)
        offered.append(j)
    return tuple(offered), vn, position


class ReusingPartition:
    """A partitioner: the substitution of Note [Saved values in the second
    program] on the joint graph, then ``partition_fn``."""

    def __init__(self, partition_fn: Callable, numbers: ValueNumbers, position: dict[int, int],
                 num_inputs: int):
        self.partition_fn = partition_fn
        self.numbers = numbers
        self.position = position          # number -> offered value's position
        self.num_inputs = num_inputs      # the program's graph inputs (then the offered values)
        self.__name__ = getattr(partition_fn, "__name__", type(partition_fn).__name__)
        self.__qualname__ = getattr(partition_fn, "__qualname__", self.__name__)

    def __call__(self, joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int):
        substitute(joint_gm, self.numbers, self.position, self.num_inputs)
        return self.partition_fn(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)


def substitute(joint_gm: fx.GraphModule, vn: ValueNumbers, position: dict[int, int],
               num_inputs: int) -> int:
    """Replace the nodes computing an offered value by its input; the number replaced."""
    graph = joint_gm.graph
    placeholders = {}
    for p in graph.find_nodes(op="placeholder"):
        i = _primal_index(p)
        if i is not None and i >= num_inputs:
            placeholders[i - num_inputs] = p
    numbers = vn.number(graph, lambda n: i if (i := _primal_index(n)) is not None and
                        i < num_inputs else None, add=False)
    replaced = 0
    for n in list(graph.nodes):
        k = position.get(numbers.get(n, -1))
        if k is None or n.op != "call_function" or k not in placeholders:
            continue
        p = placeholders[k]
        if not _same_meta(p.meta.get("val"), n.meta.get("val")):
            continue
        n.replace_all_uses_with(p)
        replaced += 1
    if replaced:
        graph.eliminate_dead_code()
        joint_gm.recompile()
    return replaced


def _same_meta(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
        a.dtype == b.dtype and a.device == b.device and tuple(a.shape) == tuple(b.shape) and \
        tuple(a.stride()) == tuple(b.stride()) and a.storage_offset() == b.storage_offset()
