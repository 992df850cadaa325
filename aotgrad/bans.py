"""Recompute bans: heuristics that keep cheap ops out of the backward.

Note [Recompute bans]
---------------------
The min-cut (Note [Min-cut rematerialization], partition/mincut.py) treats every cheap
forward op as free to recompute.  It is not always: a recomputed op that
cannot be fused with its neighbours costs a full read and write of memory,
and a long chain of them is a long detour.  These rules, each switched by an
option of ``aotgrad.config`` (named as in torch's functorch config),
mark cheap forward nodes as *banned*; the min-cut then saves a banned node
(or something after it) rather than recompute it, and a memory budget may
still recompute it at its cost (``NodeRole.COSTLY``).

* ``ban_recompute_materialized_backward``: a value some backward op that
  cannot fuse it (a matmul, a reduction) reads, directly or through views —
  the backward would write the recomputed value out in full anyway.
* ``ban_recompute_used_far_apart``: a value ``v`` computed from ``u`` when
  ``u`` also feeds a fusible group that ends in an unfusible op *before*
  ``v``: recomputing ``v`` would keep ``u`` alive across that op.
* ``ban_recompute_long_fusible_chains``: in a chain of fusible forward ops
  more than ``LONG_CHAIN`` ops long, the node where it gets too long.
* ``max_dist_from_bw``: forward nodes more than that many uses away from the
  backward (ignored at 1000 and above, as torch does).
* ``ban_recompute_reductions`` (size rule): an op whose output is more than
  four times smaller than its inputs (the reduction ops themselves are
  handled by the recompute policy, ``partition.is_cheap_to_recompute``).

``aggressive_recomputation`` switches all of them off but the reduction rule.
Views and ``getitem`` are never banned (recomputing them is free).  Before
and after, for ``y = relu(x); out = mm(y, w)`` (the backward's ``mm(g, y^T)``
reads ``y`` and cannot fuse it)::

    no bans:  fw saves x, w      bw: y = relu(x); mm(t(w)...); mm(..., t(y))
    bans:     fw saves y, w      bw: mm(t(w)...); mm(..., t(y))
"""

from __future__ import annotations

import heapq
import operator
from typing import Callable, Iterable

import torch
import torch.fx as fx

from . import config
from .views import is_view_op

aten = torch.ops.aten

#: A chain of fusible forward ops longer than this is cut.
LONG_CHAIN = 100
#: ``max_dist_from_bw`` at or above this disables the distance rule.
NO_DISTANCE_LIMIT = 1000
#: The size rule: output bytes times this below the input bytes is a reduction.
REDUCTION_RATIO = 4


def recompute_bans(graph_nodes: list[fx.Node], fwd: set[fx.Node],
                   candidates: Iterable[fx.Node], fusible: Callable[[fx.Node], bool],
                   nbytes: Callable[[fx.Node], int | None]) -> set[fx.Node]:
    """The nodes among ``candidates`` (cheap forward nodes) that the options
    ban from being recomputed (Note [Recompute bans]).  ``fusible(n)``: may
    ``n`` join a fusion with its neighbours; ``nbytes(n)``: the bytes of a
    tensor node (None when unknown)."""
    candidates = {n for n in candidates if _bannable(n)}
    if not candidates:
        return set()
    aggressive = config.aggressive_recomputation
    order = {n: i for i, n in enumerate(graph_nodes)}

    def fuses(a: fx.Node, b: fx.Node) -> bool:
        if getattr(b.target, "overloadpacket", None) is aten.cat:
            return True           # a cat is written in place by its producers
        return fusible(a) and fusible(b)

    banned: set[fx.Node] = set()
    if config.ban_recompute_reductions:
        banned |= {n for n in candidates if _shrinks(n, nbytes)}
    if config.ban_recompute_materialized_backward and not aggressive:
        banned |= {n for n in candidates if _materialized_backward(n, fwd, fuses)}
    if not aggressive and config.max_dist_from_bw < NO_DISTANCE_LIMIT:
        dist = _distance_from_backward(graph_nodes, fwd)
        banned |= {n for n in candidates
                   if config.max_dist_from_bw < dist[n] < NO_DISTANCE_LIMIT}
    if config.ban_recompute_used_far_apart and not aggressive:
        banned |= _used_far_apart(graph_nodes, fwd, order, fuses, banned) & candidates
    if config.ban_recompute_long_fusible_chains and not aggressive:
        banned |= _long_chains(graph_nodes, fwd, order, fuses, banned) & candidates
    return banned


def _bannable(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is not operator.getitem and \
        not is_view_op(n.target)


def _shrinks(n: fx.Node, nbytes: Callable[[fx.Node], int | None]) -> bool:
    def size(a: fx.Node) -> int:
        return (nbytes(a) or 0) if isinstance(a.meta.get("val"), torch.Tensor) else 0

    return size(n) * REDUCTION_RATIO < sum(size(a) for a in n.all_input_nodes)


def _materialized_backward(node: fx.Node, fwd: set[fx.Node], fuses) -> bool:
    """Some op outside the forward reads ``node`` (or a view of it) unfused."""
    stack, seen = [node], {node}
    while stack:
        cur = stack.pop()
        for user in cur.users:
            if user not in fwd and not fuses(cur, user):
                return True
            if user.op == "call_function" and is_view_op(user.target) and user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def _distance_from_backward(graph_nodes: list[fx.Node], fwd: set[fx.Node]) -> dict:
    """Uses between each forward node and the nearest node outside the forward."""
    far = 10 ** 9
    dist: dict[fx.Node, int] = {}
    for n in reversed(graph_nodes):
        if n not in fwd:
            dist[n] = 0
        else:
            dist[n] = min((dist.get(u, far) + 1 for u in n.users), default=far)
    return dist


def _first_unfusible(starts: list[fx.Node], fwd: set[fx.Node], order: dict, fuses,
                     limit: int) -> int:
    """Position of the earliest forward op reached from ``starts`` through
    fusible ops whose own input edge is not fusible (``limit`` if none)."""
    heap = [(order[n], 1, order[n]) for n in starts]
    heapq.heapify(heap)
    by_pos = {order[n]: n for n in starts}
    pushed = set(heap)
    while heap:
        pos, fusible_edge, _ = heapq.heappop(heap)
        if not fusible_edge:
            return pos
        node = by_pos[pos]
        for user in node.users:
            upos = order.get(user)
            if user in fwd and upos is not None and upos <= limit:
                entry = (upos, int(fuses(node, user)), upos)
                if entry not in pushed:
                    pushed.add(entry)
                    by_pos[upos] = user
                    heapq.heappush(heap, entry)
    return limit


def _used_far_apart(graph_nodes, fwd, order, fuses, banned) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for used in graph_nodes:
        if used not in fwd:
            continue
        users = [u for u in used.users if u in fwd]
        if not users:
            continue
        first = _first_unfusible(users, fwd, order, fuses, max(order[u] for u in users))
        out.update(u for u in users if order[u] > first and fuses(used, u) and u not in banned)
    return out


def _long_chains(graph_nodes, fwd, order, fuses, banned) -> set[fx.Node]:
    out: set[fx.Node] = set()
    visited: set[fx.Node] = set()
    for start in graph_nodes:
        if start not in fwd or start in visited:
            continue
        heap = [(order[start], start.name)]
        by_name = {start.name: start}
        while heap:
            pos, name = heapq.heappop(heap)
            cur = by_name[name]
            if cur in visited:
                continue
            visited.add(cur)
            if pos > order[start] + LONG_CHAIN and not heap:
                out.add(cur)
                break
            for user in cur.users:
                if user in fwd and user not in banned and user not in out and fuses(cur, user):
                    by_name[user.name] = user
                    heapq.heappush(heap, (order[user], user.name))
    return out
