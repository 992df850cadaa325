"""Stage 3 — rebase: inputs that alias each other, when one of them is mutated.

Functionalization sees each graph input as its own tensor, so a mutation of
one input that shares storage with another would not show in the other.
When a program mutates an input that aliases another input of the call, the
aliased inputs are replaced by their common base (a *synthetic base*): the
graph takes the base and re-slices each aliased input from it
(``as_strided``), so functionalization sees one tensor and every alias sees
every mutation.  The runtime hands the base in, writes its new value back
(which updates every alias, since they are views of it), replays metadata
mutations on the aliased inputs themselves, and gives back the caller's own
tensors for outputs that are those inputs::

    def f(a, b):          # called as f(x[0], x[0])
        a.mul_(2); b.t_(); return a * b
    graph input:  x (the base) -> a = x.as_strided(...), b = x.as_strided(...)
    runtime:      x.copy_(x_new); b.as_strided_(b_new metadata)

Only aliased inputs that are views of one common tensor (or that tensor
itself) can be rebased; for others the error says so.

The need is found at run time: the runtime of a program that mutates inputs
checks whether those inputs alias others (Note [Aliased mutated inputs],
runtime.py) and raises ``AliasedMutatedInputs``; the caller then compiles
the rebased program for that aliasing pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import subclass
from ._torch import pytree


class AliasedMutatedInputs(Exception):
    """Raised by a runtime whose mutated inputs (graph-input indices
    ``mutated``) alias other inputs: ``groups``, from ``alias_groups``."""

    def __init__(self, groups: tuple[tuple[int, ...], ...], mutated: frozenset[int]):
        super().__init__(f"aliased graph inputs {groups}")
        self.groups = groups
        self.mutated = mutated


def alias_groups(inputs: Sequence[Any],
                 mutated: frozenset[int]) -> tuple[tuple[int, ...], ...]:
    """Groups (of 2+) of graph-input indices whose tensors overlap in memory,
    one of them ``mutated``.

    Note [Only overlapping inputs are merged]: two inputs that share a
    storage but not a byte (``x[:2]`` and ``x[2:]``) are independent:
    writing one never changes the other, so functionalization may treat
    them apart, as PyTorch's AOTAutograd does (no synthetic base); so are
    inputs that overlap but that the program does not write.  Inputs
    overlap when the memory spans they can address meet; a tensor subclass
    is taken to span its whole storage."""
    by_storage: dict[int, list[int]] = {}
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            by_storage.setdefault(subclass.storage_ptr(t), []).append(i)
    groups = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        spans = sorted((_span(inputs[i]), i) for i in members)
        group, end = [spans[0][1]], spans[0][0][1]
        for (start, stop), i in spans[1:]:
            if start < end:                  # meets the group so far
                group.append(i)
                end = max(end, stop)
                continue
            if len(group) > 1:
                groups.append(tuple(sorted(group)))
            group, end = [i], stop
        if len(group) > 1:
            groups.append(tuple(sorted(group)))
    return tuple(sorted(g for g in groups if any(i in mutated for i in g)))


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The element offsets ``[start, stop)`` of ``t`` in its storage."""
    if subclass.is_subclass(t):
        return 0, 1 << 62
    if t.numel() == 0:
        return t.storage_offset(), t.storage_offset()  # meets nothing
    start = t.storage_offset()
    return start, start + 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._is_view() else t


@dataclass(frozen=True)
class Rebasing:
    """The program's inputs are the synthetic bases, then the other graph
    inputs (the order of PyTorch's)."""
    groups: tuple[tuple[int, ...], ...]     # aliased graph-input indices, per base
    others: tuple[int, ...]                 # graph inputs kept as they are
    member_meta: tuple[tuple | None, ...]   # per member (size, stride, offset), group order;
                                            # None: the member is the base itself
    mutated: frozenset[int] = frozenset()   # graph inputs the program mutates


def plan_rebasing(graph_inputs: Sequence[Any], groups,
                  mutated: frozenset[int] = frozenset()) -> Rebasing:
    meta = []
    for g in groups:
        if any(subclass.is_subclass(graph_inputs[i]) for i in g):
            raise RuntimeError(
                "Encountered aliased inputs that are mutated in the graph, but at least one of "
                "them is a tensor subclass (aotgrad: graph inputs "
                f"{g}, of types {[type(graph_inputs[i]).__name__ for i in g]}); a synthetic "
                "base cannot be made for subclass inputs. Clone the inputs before the call, "
                "or do the mutation outside the compiled function.")
        root = _root(graph_inputs[g[0]])
        for i in g:
            t = graph_inputs[i]
            if _root(t) is not root:
                raise RuntimeError(
                    "aotgrad: Encountered aliased inputs that are mutated in the graph, but "
                    "they are not views of one common tensor, so they cannot be merged into "
                    f"one input (graph inputs {g}). Pass views of a single tensor, or clone "
                    "the inputs before the call.")
            meta.append(None if t is root else
                        (tuple(t.shape), tuple(t.stride()), t.storage_offset()))
    members = {i for g in groups for i in g}
    others = tuple(i for i in range(len(graph_inputs)) if i not in members)
    return Rebasing(tuple(groups), others, tuple(meta), mutated)


def rebased_inputs(r: Rebasing, graph_inputs: Sequence[Any]) -> list:
    return [_root(graph_inputs[g[0]]) for g in r.groups] + [graph_inputs[i] for i in r.others]


class RebasedFunction:
    """The program over ``(*other inputs, *bases)``: re-slices the aliased
    inputs from their base, runs the user's flat function, and returns its
    output leaves followed by the aliased inputs whose metadata it changed
    (``t_()``), as they end: the runtime gives the caller's tensors that
    metadata.  (Returning the others too would only add outputs: the graph
    then reads as PyTorch's.)"""

    def __init__(self, flat_fn: Callable, r: Rebasing, num_inputs: int):
        self.flat_fn = flat_fn
        self.r = r
        self.num_inputs = num_inputs
        self.out_spec: Any = None
        self.num_user_leaves = 0
        self.output_is_member: dict[int, int] = {}   # user leaf -> graph input index
        self.reshaped: tuple[int, ...] = ()          # members returned: metadata changed

    def __call__(self, *xs: Any) -> list:
        r = self.r
        args: list = [None] * self.num_inputs
        for i, x in zip(r.others, xs[len(r.groups):]):
            args[i] = x
        meta = iter(r.member_meta)
        members, before = [], {}
        for g, base in zip(r.groups, xs):
            for i in g:
                m = next(meta)
                args[i] = base if m is None else base.as_strided(*m)
                members.append(i)
                before[i] = _layout(args[i])
        leaves = self.flat_fn(*args)
        self.out_spec = self.flat_fn.out_spec
        self.num_user_leaves = len(leaves)
        self.output_is_member = {k: i for k, o in enumerate(leaves) for i in members
                                 if o is args[i]}
        # a symbolic layout may have changed: returned (the runtime compares)
        self.reshaped = tuple(i for i in members
                              if before[i] is None or _layout(args[i]) != before[i])
        return list(leaves) + [args[i] for i in self.reshaped]


def _layout(t: torch.Tensor) -> tuple | None:
    """Sizes, strides and offset of ``t``; None when any is symbolic."""
    layout = (*t.shape, None, *t.stride(), None, t.storage_offset())
    return layout if all(type(d) is int or d is None for d in layout) else None


def rebased_runtime(r: Rebasing, fn: RebasedFunction, inner: Callable[[list], Any],
                    graph_leaf: Sequence[int]) -> Callable[[list], Any]:
    """The runtime of the rebased program, over the call's leaves."""
    def call(leaves: list) -> Any:
        graph_inputs = [leaves[i] for i in graph_leaf]
        groups = alias_groups(graph_inputs, r.mutated)
        if groups != r.groups:
            raise AliasedMutatedInputs(groups, r.mutated)
        out = inner(rebased_inputs(r, graph_inputs))
        n = fn.num_user_leaves
        user, ends = list(out[:n]), out[n:]
        for i, end in zip(fn.reshaped, ends):
            t = graph_inputs[i]
            if (t.shape, t.stride(), t.storage_offset()) != \
                    (end.shape, end.stride(), end.storage_offset()):
                t.as_strided_(end.shape, end.stride(), end.storage_offset())
        for k, i in fn.output_is_member.items():
            user[k] = graph_inputs[i]
        return pytree.tree_unflatten(user, fn.out_spec)

    return call
