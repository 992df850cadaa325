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
    """Raised by a runtime whose mutated inputs alias other inputs."""

    def __init__(self, groups: tuple[tuple[int, ...], ...]):
        super().__init__(f"aliased graph inputs {groups}")
        self.groups = groups


def alias_groups(inputs: Sequence[Any]) -> tuple[tuple[int, ...], ...]:
    """Groups (of 2+) of graph-input indices whose tensors share storage."""
    by_storage: dict[int, list[int]] = {}
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            by_storage.setdefault(subclass.storage_ptr(t), []).append(i)
    return tuple(tuple(g) for g in by_storage.values() if len(g) > 1)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._is_view() else t


@dataclass(frozen=True)
class Rebasing:
    groups: tuple[tuple[int, ...], ...]     # aliased graph-input indices, per base
    others: tuple[int, ...]                 # graph inputs kept as they are
    member_meta: tuple[tuple | None, ...]   # per member (size, stride, offset), group order;
                                            # None: the member is the base itself


def plan_rebasing(graph_inputs: Sequence[Any], groups) -> Rebasing:
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
    return Rebasing(tuple(groups), others, tuple(meta))


def rebased_inputs(r: Rebasing, graph_inputs: Sequence[Any]) -> list:
    return [graph_inputs[i] for i in r.others] + [_root(graph_inputs[g[0]]) for g in r.groups]


class RebasedFunction:
    """The program over ``(*other inputs, *bases)``: re-slices the aliased
    inputs from their base, runs the user's flat function, and returns its
    output leaves followed by the aliased inputs as they end (their metadata)."""

    def __init__(self, flat_fn: Callable, r: Rebasing, num_inputs: int):
        self.flat_fn = flat_fn
        self.r = r
        self.num_inputs = num_inputs
        self.out_spec: Any = None
        self.num_user_leaves = 0
        self.output_is_member: dict[int, int] = {}   # user leaf -> graph input index

    def __call__(self, *xs: Any) -> list:
        r = self.r
        args: list = [None] * self.num_inputs
        for i, x in zip(r.others, xs):
            args[i] = x
        meta = iter(r.member_meta)
        members = []
        for g, base in zip(r.groups, xs[len(r.others):]):
            for i in g:
                m = next(meta)
                args[i] = base if m is None else base.as_strided(*m)
                members.append(i)
        leaves = self.flat_fn(*args)
        self.out_spec = self.flat_fn.out_spec
        self.num_user_leaves = len(leaves)
        self.output_is_member = {k: i for k, o in enumerate(leaves) for i in members
                                 if o is args[i]}
        return list(leaves) + [args[i] for i in members]


def rebased_runtime(r: Rebasing, fn: RebasedFunction, inner: Callable[[list], Any],
                    graph_leaf: Sequence[int]) -> Callable[[list], Any]:
    """The runtime of the rebased program, over the call's leaves."""
    members = [i for g in r.groups for i in g]

    def call(leaves: list) -> Any:
        graph_inputs = [leaves[i] for i in graph_leaf]
        if alias_groups(graph_inputs) != r.groups:
            raise AliasedMutatedInputs(alias_groups(graph_inputs))
        out = inner(rebased_inputs(r, graph_inputs))
        n = fn.num_user_leaves
        user, ends = list(out[:n]), out[n:]
        for i, end in zip(members, ends):
            t = graph_inputs[i]
            if (t.shape, t.stride(), t.storage_offset()) != \
                    (end.shape, end.stride(), end.storage_offset()):
                t.as_strided_(end.shape, end.stride(), end.storage_offset())
        for k, i in fn.output_is_member.items():
            user[k] = graph_inputs[i]
        return pytree.tree_unflatten(user, fn.out_spec)

    return call
