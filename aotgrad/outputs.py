"""The user's outputs, built by the runtime (runtime.py) from the graph's
outputs, the inputs and constants: Note [Rebuilding aliased outputs].

``Assembler`` writes the lines of the generated call that build ``u0 ...``
and return them in the user's pytree; ``rebuild_alias`` makes an output that
aliases an input, another output or an intermediate a real view of it.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch

from . import _torch, subclass
from ._torch import pytree
from .analyze import OutputInfo, OutputKind, Signature
from .views import AliasPlan, SizeArg, has_size_args, replay, resolved


class Assembler:
    """Writes the lines that build the user's outputs ``u0 ...`` from graph
    outputs ``o0 ...``, inputs ``i0 ...`` and constants, and the return."""

    def __init__(self, sig: Signature, plans: dict[int, AliasPlan], src: Any):
        self.sig, self.plans, self.src = sig, plans, src
        first_user = len(sig.mutated_inputs_out_of_graph)
        self.graph_pos = {i: first_user + j for j, i in enumerate(sig.user_graph_outputs)}
        self.first_base = first_user + len(sig.user_graph_outputs)
        # Note [Views taken before a mutation]: an output that is a view of an
        # input taken before the input was mutated is rebuilt before the
        # mutation is written back (so its metadata, and autograd's view
        # bookkeeping, are as in eager).
        self.early_outputs = [
            i for i, p in sorted(plans.items()) if p.from_original_input and (
                sig.inputs[sig.outputs[i].base].mutated or
                # still requires grad: it was taken before the input's detach_()
                (sig.inputs[sig.outputs[i].base].detached_in_place and
                 sig.outputs[i].requires_grad))]

    def early(self) -> None:
        for i in self.early_outputs:
            self._rebuild(i)

    def outputs(self) -> None:
        sig, src = self.sig, self.src
        # outputs that refer to other outputs come after them
        rank = {OutputKind.ALIAS_OF_INPUT: 1, OutputKind.ALIAS_OF_INTERMEDIATE: 1,
                OutputKind.ALIAS_OF_OUTPUT: 2, OutputKind.SAME_AS_OUTPUT: 3}
        for i in sorted(range(len(sig.outputs)), key=lambda i: rank.get(sig.outputs[i].kind, 0)):
            if i in self.early_outputs:
                continue
            info = sig.outputs[i]
            kind = info.kind
            if kind.through_autograd:
                # a view made under no_grad of a tensor that requires grad is,
                # in eager, a leaf that requires grad
                leaf = ".detach().requires_grad_()" if info.no_grad_view and info.requires_grad \
                    else ""
                src(f"u{i} = o{self.graph_pos[i]}{leaf}")
            elif kind is OutputKind.IS_INPUT:
                src(f"u{i} = i{info.base}")
            elif kind is OutputKind.CONSTANT:
                src(f"u{i} = {src.bind(info.constant, 'constant')}")
            elif kind is OutputKind.SAME_AS_OUTPUT:
                src(f"u{i} = u{info.base}")
            else:
                self._rebuild(i)
        self._mark_dynamic_dims()
        src(f"return {_spec_source(sig.out_spec, iter(range(len(sig.outputs))), src)}")

    def _mark_dynamic_dims(self) -> None:
        """Note [Dynamic dims of outputs]: an output whose sizes are symbolic
        in the graph is marked so (``mark_propagated_dynamic``): when it
        feeds the next compiled graph (after a graph break), dynamo treats
        those dims as dynamic at once instead of specializing them and
        recompiling when they change.  The mark is not guarded on."""
        src = self.src
        for i, info in enumerate(self.sig.outputs):
            if info.kind in (OutputKind.CONSTANT, OutputKind.IS_INPUT) or info.shape is None or \
                    info.dtype is None:
                continue
            dims = {k for k, d in enumerate(info.shape) if not isinstance(d, int)}
            if dims:
                src(f"{src.bind(mark_propagated_dynamic, 'mark_dynamic')}(u{i}, {dims!r})")

    def _rebuild(self, i: int) -> None:
        info, src = self.sig.outputs[i], self.src
        kind = info.kind
        base = (f"i{info.base}" if kind is OutputKind.ALIAS_OF_INPUT else
                f"u{info.base}" if kind is OutputKind.ALIAS_OF_OUTPUT else
                f"o{self.first_base + info.base}")
        graph_base = (f"o{self.graph_pos[info.base]}" if kind is OutputKind.ALIAS_OF_OUTPUT else
                      f"o{self.first_base + info.base}"
                      if kind is OutputKind.ALIAS_OF_INTERMEDIATE else "None")
        plan = self.plans.get(i)
        if plan is not None and info.is_view and info.requires_grad and \
                not info.no_grad_view and not info.via_detached_alias:
            src(f"u{i} = {_replay_source(base, plan, src)}")  # rebuild_alias, specialised
            return
        plan_src = src.bind(plan, 'plan')
        if plan is not None and has_size_args(plan.steps):  # Note [Sizes in replay plans]
            n_in = len(self.sig.inputs)
            plan_src = f"{src.bind(_resolved_plan, 'resolved_plan')}({plan_src}, " \
                f"({''.join(f'i{k}, ' for k in range(n_in))}))"
        src(f"u{i} = {src.bind(rebuild_alias, 'rebuild_alias')}({base}, o{self.graph_pos[i]}, "
            f"{src.bind(info, 'info')}, {plan_src}, {graph_base})")


def _resolved_plan(plan: AliasPlan, inputs: tuple) -> AliasPlan:
    """``plan`` with its sizes computed from the call's inputs (views.SizeArg)."""
    return AliasPlan(resolved(plan.steps, inputs), plan.from_original_input)


def _replay_source(base: str, plan: AliasPlan, src: Any) -> str:
    """``views.replay(base, plan.steps)`` as one expression."""
    expr = base
    for target, args, kwargs in plan.steps:
        if target is operator.getitem:
            expr = f"{expr}[{args[0]!r}]"
            continue
        fn = target._op if isinstance(target, _torch.OpOverload) else target
        parts = [expr] + [_literal(a, src) for a in args] + \
            [f"{k}={_literal(v, src)}" for k, v in kwargs.items()]
        expr = f"{src.bind(fn, getattr(target, '_opname', 'view'))}({', '.join(parts)})"
    return expr


def _literal(value: Any, src: Any) -> str:
    if type(value) in (int, bool, type(None)):
        return repr(value)
    if isinstance(value, SizeArg):  # Note [Sizes in replay plans] (views.py)
        return value.source()
    if type(value) in (list, tuple) and any(isinstance(v, SizeArg) for v in value):
        items = ", ".join(_literal(v, src) for v in value)
        return f"[{items}]" if type(value) is list else f"({items}{',' if len(value) == 1 else ''})"
    return src.bind(value, "arg")


def _spec_source(spec: Any, leaves: Any, src: Any) -> str:
    """An expression building the pytree ``spec`` from ``u0 ...``."""
    if spec.is_leaf():
        return f"u{next(leaves)}"
    children = _torch.spec_children(spec)
    if spec.type in (tuple, list):
        items = [_spec_source(c, leaves, src) for c in children]
        if spec.type is list:
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    names = [f"u{next(leaves)}" for _ in range(spec.num_leaves)]
    return f"{src.bind(pytree.tree_unflatten, 'tree_unflatten')}([{', '.join(names)}], " \
        f"{src.bind(spec, 'spec')})"


def rebuild_alias(base: torch.Tensor, value: torch.Tensor, info: OutputInfo,
                  plan: AliasPlan | None, graph_base: torch.Tensor | None = None) -> torch.Tensor:
    """Note [Rebuilding aliased outputs]: the graph computed ``value`` as an
    alias of ``base``; the user must get a tensor autograd knows is a view of
    ``base`` (so in-place ops on either, and gradients, behave as in eager).
    With a view-replay plan the view ops that made ``value`` run again on
    ``base`` (grad_fns as in eager); otherwise ``as_strided`` with the
    metadata the analysis recorded (or ``value``'s, when it shares ``base``'s
    storage, or its offset relative to ``graph_base``, the graph's value of
    ``base``).  An eager output that did not require grad is rebuilt under
    no_grad (a view) or detached (not a view, e.g. ``.detach()``)."""
    if info.via_detached_alias:
        base = base.detach()  # eager's view chain went through .detach()
    grad_ctx = torch.no_grad() if info.no_grad_view or not info.requires_grad \
        else contextlib.nullcontext()
    with grad_ctx:
        if plan is not None:
            out = replay(base, plan.steps)
        else:
            if info.alias_meta is not None:
                size, stride, offset = info.alias_meta
            elif _same_storage(base, value):
                size, stride, offset = value.size(), value.stride(), value.storage_offset()
            elif graph_base is not None and _same_storage(graph_base, value):
                size, stride = value.size(), value.stride()
                offset = base.storage_offset() + value.storage_offset() - graph_base.storage_offset()
            else:
                raise RuntimeError(
                    "aotgrad: the compiled graph returned an output that should alias one of "
                    "its inputs or outputs but does not share its storage; the compiler broke "
                    "aliasing. Use a compiler that preserves output aliasing, or return a copy "
                    "(.clone()).")
            out = _like(base, value, info.dtype).as_strided(size, stride, offset)
            if value.is_conj() != out.is_conj():
                out = out.conj()
            if value.is_neg() != out.is_neg():
                out = torch._neg_view(out)
    if not info.is_view and out._is_view():
        out = out.detach()  # e.g. eager's .detach(): shares storage, not a view
    return out


def _like(base: torch.Tensor, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``base`` seen with the output's dtype (``x.view(torch.int32)``), whose
    units the recorded sizes, strides and offset are in; as_strided keeps
    its base's dtype (and conj / neg bits: set after it)."""
    dtype = dtype or value.dtype
    return base if base.dtype == dtype else base.view(dtype)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return subclass.storage_ptr(a) == subclass.storage_ptr(b)


def mark_propagated_dynamic(t: torch.Tensor, dims: set[int]) -> None:
    """Note [Dynamic dims of outputs] (outputs.py): dynamo's unguarded mark
    of dims found dynamic by a compiled graph, read when ``t`` is an input
    of the next one."""
    old = getattr(t, "_dynamo_propagated_dynamic_indices", None)
    t._dynamo_propagated_dynamic_indices = dims | old if old else set(dims)  # type: ignore
