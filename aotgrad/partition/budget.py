"""A memory budget for the min-cut partitioner: save at most a fraction of
the runtime-optimal saved bytes, recomputing as little work as possible.

Note [Memory budget]
--------------------
``config.activation_memory_budget = b`` (in [0, 1]) asks for a partition
whose saved activation bytes (``activation_bytes``: storages beyond the
inputs) are at most ``b * B``, where ``B`` is what the plain min-cut saves
(cheap ops recomputed, no matmul, reduction or other costly op: the
runtime-optimal partition; ``b = 1`` is the plain min-cut).  Meeting a
smaller budget takes recomputing costly ops (``NodeRole.COSTLY``), priced
by ``recompute_cost`` (problem.py): the time to recompute a node on a roofline — its
FLOPs (matmuls, convolutions; an fp32 FLOP costs more than a bf16 one) or
the bytes it reads and writes, whichever takes longer (``COST_PER_BYTE``,
``COST_PER_FLOP``).

For a price ``lam`` (bytes per FLOP), the network of
Note [Min-cut rematerialization] with an edge ``source -> v_in`` of capacity
``lam * cost(v)`` for every costly ``v`` has as minimum cut the saved set
minimizing ``bytes + lam * cost`` — exactly (``RematProblem.solve``).  As
``lam`` falls, the optimal bytes never rise (for optimal cuts X1 at lam1 >
lam2 and X2 at lam2, adding the two optimality inequalities gives cost(X1) <=
cost(X2), then bytes(X2) <= bytes(X1)).  The budget takes, among these
optimal cuts, the cheapest one within ``b * B``: the vertices of the
lower convex hull of (bytes, cost) are found by Eisner-Severance search —
intersect the lines of the two current endpoints, solve there, keep the new
vertex on the side it falls — a handful of max-flows.  Hence the three
guarantees the tests check:

* saved bytes never increase as the budget decreases (the hull vertex
  chosen moves monotonically, and its bytes with it);
* random ops are never recomputed (they are BANNED, never COSTLY);
* saved bytes never exceed the plain min-cut's, which never exceed
  ``default_partition``'s (the budget starts from it), which is what eager
  autograd keeps for the same graph.

When even ``lam = 0`` (everything deterministic may be recomputed) cannot
meet the budget, that minimum is used.  The chosen point is optimal for its
price; between hull vertices a knapsack choice could be cheaper — an
NP-hard refinement we leave for monotonicity and speed.
"""


from __future__ import annotations

from typing import Callable

import torch.fx as fx

from .. import _torch
from .mincut import Cut, RematProblem, min_cut_saved_values
from .problem import NodeRole, RecomputePolicy, activation_bytes, default_roles, forward_nodes, \
    is_cheap_to_recompute, joint_roles, recompute_cost, tensor_bytes


MAX_SEARCH_STEPS = 32
MAX_REFINE_STEPS = 4


def budget_saved_values(joint_gm: fx.GraphModule, num_fwd_outputs: int, budget: float,
                        recompute_policy: RecomputePolicy = is_cheap_to_recompute,
                        role_of: Callable[[fx.Node], NodeRole] | None = None,
                        cost: Callable[[fx.Node], int] = recompute_cost) -> list[fx.Node]:
    """The values the forward saves under ``budget`` (Note [Memory budget])."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"aotgrad: activation_memory_budget must be in [0, 1], not {budget}")
    roles = joint_roles(joint_gm, num_fwd_outputs)
    fwd = forward_nodes(roles)
    plain = min_cut_saved_values(joint_gm, num_fwd_outputs, recompute_policy, role_of, fwd)
    if budget >= 1.0:
        return plain
    problem = RematProblem(joint_gm, roles, fwd, role_of or default_roles(recompute_policy),
                           with_costly=True, costs=cost)
    plain_bytes = activation_bytes(plain, problem.storages)
    limit = budget * plain_bytes
    # no costly recompute: the plain cut (it needs no second max-flow)
    hi = Cut(tuple(n for n in plain if not _torch.is_sym_node(n)), plain_bytes, 0)
    lo = problem.solve(0.0)                            # fewest bytes, then fewest recomputes
    if lo is None:
        return plain
    if hi.saved_bytes <= limit:
        best = hi
    elif lo.saved_bytes > limit:
        best = lo                                      # the budget cannot be met: the minimum
    else:
        best = _refine(problem, *_search(problem, hi, lo, limit), limit, cost)
    # never more than the plain min-cut keeps
    return problem.finish(best) if best.saved_bytes <= plain_bytes else plain


def _search(problem: RematProblem, hi: Cut, lo: Cut, limit: float) -> tuple[Cut, Cut]:
    """Eisner-Severance: ``hi`` over the limit (cheaper), ``lo`` within it;
    returns the adjacent hull vertices around the limit."""
    for _ in range(MAX_SEARCH_STEPS):
        d_cost = lo.recompute_cost - hi.recompute_cost
        if d_cost <= 0:
            return hi, lo
        lam = (hi.saved_bytes - lo.saved_bytes) / d_cost
        mid = problem.solve(lam)
        if mid is None:
            return lo
        line = lo.saved_bytes + lam * lo.recompute_cost
        if mid.saved_bytes + lam * mid.recompute_cost >= line - 1e-9 * max(1.0, line) or \
                (mid.saved_bytes, mid.recompute_cost) in ((hi.saved_bytes, hi.recompute_cost),
                                                          (lo.saved_bytes, lo.recompute_cost)):
            return hi, lo                              # no hull vertex between the two
        if mid.saved_bytes <= limit:
            lo = mid
        else:
            hi = mid
    return hi, lo


def _refine(problem: RematProblem, hi: Cut, lo: Cut, limit: float,
            cost: Callable[[fx.Node], int]) -> Cut:
    """Note [Between hull vertices]: ``lo`` may recompute much more than the
    limit needs.  The costly nodes ``lo`` recomputes beyond ``hi`` are ranked
    (most bytes per FLOP first); allowing a longer prefix of them can only
    lower the bytes, so a binary search finds the shortest prefix within the
    limit.  Its result is kept only if it saves at least ``lo``'s bytes, which
    keeps the choice monotone in the budget (the next budget down starts
    from ``lo`` or below)."""
    extra = sorted(lo.recomputed_costly - hi.recomputed_costly,
                   key=lambda n: (-(tensor_bytes(n) or 0) / max(1, cost(n)), n.name))
    if len(extra) < 2:
        return lo
    best, low, high = lo, 0, len(extra)        # invariant: prefix `high` is within the limit
    for _ in range(MAX_REFINE_STEPS):          # a cut-short search is still monotone
        if high - low <= 1:
            break
        mid = (low + high) // 2
        cut = problem.solve(0.0, hi.recomputed_costly | frozenset(extra[:mid]))
        if cut is not None and cut.saved_bytes <= limit:
            high, best = mid, cut
        else:
            low = mid
    if best is lo or best.saved_bytes < lo.saved_bytes or \
            best.recompute_cost >= lo.recompute_cost:
        return lo
    return best
