"""View replay: rebuild an aliased output by re-running the view ops that made it.

An output that aliases an input (or another output) is rebuilt by the runtime
outside the compiled graph so that autograd knows it is a view (Note
[Rebuilding aliased outputs], runtime.py).  The best rebuild runs the same
view ops eager ran — then ``grad_fn`` is ``ViewBackward0``/``UnbindBackward0``
as in eager, and multi-output views keep eager's in-place rules.  The graph
holds those ops: walking back from the output node through view ops to the
node that stands for the base gives a *replay plan*::

    unbind = aten.unbind.int(primals_1); getitem_1 = unbind[1]; return (..., getitem_1, ...)
    plan for getitem_1: [(aten.unbind.int, (), {}), (getitem, (1,), {})]
    runtime: base.unbind()[1]

Only pure view ops whose other arguments are constants, or sizes the
runtime can compute from the call's inputs (``SizeArg``), qualify; anything
else (other values from the graph, non-view ops) has no plan and the runtime
falls back to ``as_strided``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import _torch
from .codegen import verified_binding

Plan = tuple[tuple[Any, tuple, dict], ...]


# Note [Sizes in replay plans]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Under dynamic shapes a view's int arguments are often computed in the
# graph from its symbolic inputs: ``x[:x.shape[0] // 2]`` under dynamo is
# ``floordiv = arg0_1 // 2; slice_1 = aten.slice.Tensor(arg2_1, 0, 0, floordiv)``
# (``arg0_1`` the size dynamo passes), under ``aot_function(dynamic=True)``
# ``sym_size = aten.sym_size.int(arg0_1, 0)``.  Such an argument is kept in
# the plan as a ``SizeArg``: integer arithmetic on int graph inputs and on
# the sizes, strides, offset and numel of tensor graph inputs (of inputs whose
# sizes the program does not change), computed from the call's inputs when
# the output is rebuilt (``SizeArg.source``: in the generated runtime).
# Anything else computed in the graph leaves the output without a plan.

_ARITHMETIC = {operator.add: "+", operator.sub: "-", operator.mul: "*",
               operator.floordiv: "//", operator.mod: "%"}
_QUERIES = {_torch.aten.sym_size.int: "size", _torch.aten.sym_stride.int: "stride",
            _torch.aten.sym_storage_offset.default: "storage_offset",
            _torch.aten.sym_numel.default: "numel"}


@dataclass(frozen=True)
class SizeArg:
    """An int argument of a replayed view op, computed from the inputs
    ``i0 ...`` of the call (Note [Sizes in replay plans]): ``op`` is
    ``"input"`` (``args``: the input's index), a query of ``_QUERIES``
    (``args``: the input's index, and the dim), ``"neg"`` or a binary
    operator of ``_ARITHMETIC`` (``args``: operands, SizeArgs or ints)."""
    op: Any
    args: tuple

    def source(self) -> str:
        """The value as a Python expression of the input names ``i0 ...``."""
        if self.op == "input":
            return f"i{self.args[0]}"
        if self.op in _QUERIES.values():
            return f"i{self.args[0]}.{self.op}({', '.join(map(repr, self.args[1:]))})"
        operands = [a.source() if isinstance(a, SizeArg) else repr(a) for a in self.args]
        if self.op == "neg":
            return f"(-{operands[0]})"
        return f"({operands[0]} {_ARITHMETIC[self.op]} {operands[1]})"

    def value(self, inputs: Sequence[Any]) -> int:
        if self.op == "input":
            return inputs[self.args[0]]
        if self.op in _QUERIES.values():
            return getattr(inputs[self.args[0]], self.op)(*self.args[1:])
        operands = [a.value(inputs) if isinstance(a, SizeArg) else a for a in self.args]
        return -operands[0] if self.op == "neg" else self.op(*operands)


def _size_arg(node: fx.Node, inputs: dict[fx.Node, int], sized: set[int]) -> SizeArg | None:
    """``node`` as a SizeArg, or None.  ``inputs``: placeholder -> input index;
    ``sized``: the inputs whose sizes and strides may be read."""
    if node in inputs:
        return SizeArg("input", (inputs[node],)) \
            if isinstance(node.meta.get("val"), (int, torch.SymInt)) else None
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target in _QUERIES:
        src = node.args[0]
        if src not in inputs or inputs[src] not in sized or _has_node(node.args[1:]):
            return None
        return SizeArg(_QUERIES[node.target], (inputs[src], *node.args[1:]))
    if node.target in _ARITHMETIC or node.target is operator.neg:
        operands = []
        for a in node.args:
            if isinstance(a, fx.Node):
                a = _size_arg(a, inputs, sized)
                if a is None:
                    return None
            elif type(a) is not int:
                return None
            operands.append(a)
        return SizeArg("neg" if node.target is operator.neg else node.target, tuple(operands))
    return None


def _size_args(value: Any, inputs: dict[fx.Node, int] | None, sized: set[int]) -> Any:
    """``value`` (a view op's argument) with its nodes as SizeArgs; None if one is not."""
    if isinstance(value, fx.Node):
        return None if inputs is None else _size_arg(value, inputs, sized)
    if isinstance(value, (list, tuple)):
        items = [_size_args(v, inputs, sized) if _has_node(v) else v for v in value]
        return None if any(i is None and _has_node(v) for i, v in zip(items, value)) \
            else (list(items) if isinstance(value, list) else tuple(items))
    return value


def has_size_args(plan: Plan) -> bool:
    return any(_holds_size_arg(a) for _, args, kwargs in plan for a in (*args, *kwargs.values()))


def _holds_size_arg(value: Any) -> bool:
    if isinstance(value, SizeArg):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_size_arg(v) for v in value)


def resolved(plan: Plan, inputs: Sequence[Any]) -> Plan:
    """``plan`` with its SizeArgs computed from the call's inputs."""
    def value(a: Any) -> Any:
        if isinstance(a, SizeArg):
            return a.value(inputs)
        if isinstance(a, (list, tuple)):
            return type(a)(value(v) for v in a)
        return a
    return tuple((t, tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()})
                 for t, args, kwargs in plan)


@dataclass(frozen=True)
class AliasPlan:
    steps: Plan
    from_original_input: bool   # rooted at the input as it was passed, before any write-back


def is_view_op(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments or not schema.returns:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and not alias.is_write and \
        all(r.alias_info is not None or str(r.type).startswith("List") for r in schema.returns)


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    return False


def replay_plan(node: Any, roots: set[fx.Node], inputs: dict[fx.Node, int] | None = None,
                sized: set[int] = frozenset()) -> tuple[Plan, fx.Node] | None:
    """The view ops from one of ``roots`` to ``node`` and that root, or None.
    ``inputs`` (placeholder -> input index) and ``sized``: Note [Sizes in
    replay plans] (without them, an argument computed in the graph means no plan)."""
    steps = []
    while isinstance(node, fx.Node) and node not in roots:
        if node.op != "call_function":
            return None
        if node.target is operator.getitem:
            src = node.args[0]
            if not (isinstance(src, fx.Node) and is_view_op(src.target)):
                return None
            steps.append((operator.getitem, (node.args[1],), {}))
        elif is_view_op(node.target):
            if _has_node(node.kwargs):
                return None
            if _has_node(node.args[1:]):  # Note [Sizes in replay plans]
                args = _size_args(tuple(node.args[1:]), inputs, sized)
                if args is None:
                    return None
                steps.append((node.target, args, {}))
                node = node.args[0]
                continue
            # Note [Verified bindings] (codegen.py): the op's faster binding
            binding = verified_binding(node)
            if binding is not None:
                steps.append((binding.fn, binding.args(tuple(node.args))[1:], {}))
            else:
                steps.append((node.target, tuple(node.args[1:]), dict(node.kwargs)))
        else:
            return None
        node = node.args[0]
    if not isinstance(node, fx.Node) or not steps:
        return None
    return tuple(reversed(steps)), node


def replay(base: torch.Tensor, plan: Plan) -> torch.Tensor:
    out: Any = base
    for target, args, kwargs in plan:
        out = target(out, *args, **kwargs)
    return out


def _same_layout(value: Any, placeholder: fx.Node) -> bool:
    """Whether ``value`` (a node) has the sizes and dtype of ``placeholder``'s
    tensor: a new value of the input, not one a copy broadcasts or casts."""
    if not isinstance(value, fx.Node):
        return False
    new, old = value.meta.get("val"), placeholder.meta.get("val")
    return isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and \
        new.dtype == old.dtype and new.shape == old.shape


def input_roots(graph: fx.Graph, index: int, extra: Sequence[fx.Node] = ()) -> set[fx.Node]:
    """Nodes standing for input ``index``: its placeholder, in-place ops on it,
    the new value a trailing ``copy_`` writes into it, and ``extra`` (its new
    value when the graph returns one).

    Note [Views of an input mutated in the graph]: with the mutation kept in
    the graph (``keep_inference_input_mutations``, as torch.compile's
    backends set it) the graph ends with ``copy_(arg0_1, add)``, and an
    output that is a view of the input is, in the functional graph, a view
    of ``add`` (functionalization regenerates views from the latest value)::

        add = aten.add.Tensor(arg0_1, 1); slice_1 = aten.slice.Tensor(add, 0, 1)
        copy_ = aten.copy_.default(arg0_1, add); return (slice_1,)

    ``add`` has the input's sizes, dtype and storage once the graph has run,
    so the view ops from it replay on the input itself.  Without it as a
    root there was no plan, and the analysis's sizes, strides and offset
    (the fallback) are those of the functional value, not of the input:
    missing under dynamic shapes (an error), wrong for an input at a storage
    offset or with gaps between its elements (a silently wrong view)."""
    placeholder = graph.find_nodes(op="placeholder")[index]
    roots = {placeholder, *extra}
    for user in placeholder.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.name in ("aten::copy_", "aten::set_") and \
                user.args[0] is placeholder:
            roots.add(user)
            if schema.name == "aten::copy_" and _same_layout(user.args[1], placeholder):
                roots.add(user.args[1])
    return roots


def alias_plans(gm: fx.GraphModule, sig: Any) -> dict[int, AliasPlan]:
    """Replay plans for the rebuilt outputs of ``sig`` in forward/inference
    graph ``gm`` (Note [What the graph returns], analyze.py): user output
    index -> plan."""
    from .analyze import OutputKind

    graph = gm.graph
    values = list(graph.output_node().args[0])
    mutated = sig.mutated_inputs_out_of_graph
    first_user = len(mutated)
    position = {i: first_user + j for j, i in enumerate(sig.user_graph_outputs)}
    first_base = first_user + len(sig.user_graph_outputs)
    plans: dict[int, Plan] = {}
    placeholders = graph.find_nodes(op="placeholder")
    inputs = {p: k for k, p in enumerate(placeholders[:len(sig.inputs)])}
    sized = {k for k, x in enumerate(sig.inputs) if not (x.mutates_metadata or x.mutates_storage)}
    for i, info in enumerate(sig.outputs):
        if not info.kind.rebuilt:
            continue
        if info.kind is OutputKind.ALIAS_OF_INPUT:
            extra = [values[k] for k, m in enumerate(mutated) if m == info.base]
            roots = input_roots(graph, info.base, [v for v in extra if isinstance(v, fx.Node)])
        elif info.kind is OutputKind.ALIAS_OF_OUTPUT:
            roots = {values[position[info.base]]}
        else:
            roots = {values[first_base + info.base]}
        found = replay_plan(values[position[i]], roots, inputs, sized)
        if found is not None:
            steps, root = found
            original = root is placeholders[info.base] \
                if info.kind is OutputKind.ALIAS_OF_INPUT else root.op == "placeholder"
            plans[i] = AliasPlan(steps, original)
    return plans
