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

Only pure view ops whose other arguments are constants qualify; anything
else (symbolic sizes from the graph, non-view ops) has no plan and the
runtime falls back to ``as_strided``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from .codegen import verified_binding

Plan = tuple[tuple[Any, tuple, dict], ...]


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


def replay_plan(node: Any, roots: set[fx.Node]) -> tuple[Plan, fx.Node] | None:
    """The view ops from one of ``roots`` to ``node`` and that root, or None."""
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
            if _has_node(node.args[1:]) or _has_node(node.kwargs):
                return None
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


def input_roots(graph: fx.Graph, index: int, extra: Sequence[fx.Node] = ()) -> set[fx.Node]:
    """Nodes standing for input ``index``: its placeholder, in-place ops on it,
    and ``extra`` (its new value when the graph returns one)."""
    placeholder = graph.find_nodes(op="placeholder")[index]
    roots = {placeholder, *extra}
    for user in placeholder.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.name in ("aten::copy_", "aten::set_") and \
                user.args[0] is placeholder:
            roots.add(user)
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
        found = replay_plan(values[position[i]], roots)
        if found is not None:
            steps, root = found
            plans[i] = AliasPlan(steps, root.op == "placeholder")
    return plans
