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
by ``recompute_cost``: the time to recompute a node on a roofline — its
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

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from . import _torch, config
from .mincut import Cut, NodeRole, RecomputePolicy, RematProblem, activation_bytes, \
    default_roles, is_cheap_to_recompute, min_cut_saved_values, size_hint, tensor_bytes
from .partition import TAG_META, backward_uses, build_partition, \
    eliminate_common_subexpressions, forward_nodes, gc_paused, has_recompute_marks, joint_roles
from .rng import replay_random_ops
from .policy import insert_offload, node_roles, offloaded

MAX_SEARCH_STEPS = 32
MAX_REFINE_STEPS = 4


#: Roofline costs, in time units of one low-precision matmul FLOP (an H100 or
#: H200: ~1000 TFLOP/s in bf16/fp16, ~60 in fp32 without TF32, ~4 TB/s of
#: memory): per byte moved, and per FLOP by dtype.
COST_PER_BYTE = 200
COST_PER_FLOP = {torch.float32: 16, torch.float64: 32}


def _flop_cost(node: fx.Node) -> int:
    val = node.meta.get("val")
    return COST_PER_FLOP.get(getattr(val, "dtype", None), 1)


def flops(node: fx.Node) -> int:
    """FLOPs of ``node`` by torch's formulas (matmuls, convolutions), else 0."""
    target = getattr(node.target, "overloadpacket", None)
    formula = flop_registry.get(target) if target is not None else None
    if formula is None:
        return 0
    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a
    args = torch.utils._pytree.tree_map(val, node.args)
    kwargs = torch.utils._pytree.tree_map(val, node.kwargs)
    try:
        return int(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except Exception:  # a formula that does not take these arguments
        return 0


def recompute_cost(node: fx.Node) -> int:
    """Time to recompute ``node`` on a roofline (Note [Memory budget])."""
    moved = (tensor_bytes(node) or 0) + sum(tensor_bytes(a) or 0 for a in node.all_input_nodes)
    return max(1, flops(node) * _flop_cost(node), COST_PER_BYTE * moved)


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


def min_cut_rematerialization_partition(
        joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
        recompute_policy: RecomputePolicy = is_cheap_to_recompute,
        memory_budget: float | None = None,
        recompute_cost: Callable[[fx.Node], int] | None = None,
        **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save a minimum-byte set of forward values; recompute cheap ops in the backward.

    ``recompute_policy(node) -> bool`` says which forward nodes the backward
    may recompute for free (default ``is_cheap_to_recompute``).  With a
    ``memory_budget`` below 1 (default: ``config.activation_memory_budget``)
    costly ops may be recomputed too, priced by ``recompute_cost`` (default:
    ``config.activation_memory_budget_runtime_estimator``, ``configured_cost``:
    the roofline estimate ``recompute_cost``; ``profiled_cost()`` times the ops
    instead; Note [Memory budget]).  ``config.cse`` merges repeated
    computations first (Note [CSE before partitioning]); the options of
    Note [Recompute bans] (bans.py) restrict what is recomputed for free.  Checkpoint regions are honoured (Note
    [Checkpoint regions], policy.py).  Other keyword arguments (``compiler=``,
    ``static_lifetime_input_indices=`` ...) are accepted and ignored.  See
    Note [Min-cut rematerialization].
    """
    return policy_partition(joint_gm, num_fwd_outputs, None, recompute_policy, memory_budget,
                            recompute_cost)


@dataclass(frozen=True)
class MemoryPolicy:
    """What to save, recompute or offload, by tag name or by op; also a partitioner.

    ``save``: never recompute these (save them if the backward needs them);
    ``recompute``: never save these (the backward recomputes them);
    ``offload``: save these in CPU memory (pinned, copied without blocking on
    CUDA) and copy them back at the start of the backward.  Entries are tag
    names (``aotgrad.tag``) or ops (``torch.ops.aten.mm`` or an overload).
    ``budget`` is a memory budget for the rest (Note [Memory budget]; default
    ``config.activation_memory_budget``), with ``recompute_cost`` pricing
    recomputation (default: a roofline estimate; ``budget.profiled_cost()``
    times the ops).  Pass the policy as ``partition_fn``.
    """
    save: Sequence[Any] = ()
    recompute: Sequence[Any] = ()
    offload: Sequence[Any] = ()
    budget: float | None = None
    recompute_policy: RecomputePolicy = is_cheap_to_recompute
    recompute_cost: Callable[[fx.Node], int] | None = None

    def __post_init__(self) -> None:
        for field in ("save", "recompute", "offload"):
            items = tuple(getattr(self, field))
            for item in items:
                if not isinstance(item, (str, _torch.OpOverload, _torch.OpOverloadPacket)):
                    raise TypeError(
                        f"aotgrad.MemoryPolicy: {field} entries are tag names or aten ops "
                        f"(torch.ops.aten.mm), not {item!r}")
            object.__setattr__(self, field, items)
        both = (set(self.save) | set(self.offload)) & set(self.recompute)
        if both:
            raise ValueError(f"aotgrad.MemoryPolicy: {sorted(map(str, both))} is both kept "
                             "(save/offload) and recomputed")

    def choice(self, node: fx.Node) -> str | None:
        """"offload", "recompute", "save" or None for this node."""
        keys = set(node.meta.get(TAG_META, ()))
        if isinstance(node.target, _torch.OpOverload):
            keys |= {node.target, node.target.overloadpacket}
        for name in ("offload", "recompute", "save"):
            if keys.intersection(getattr(self, name)):
                return name
        return None

    def __call__(self, joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
                 **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
        return policy_partition(joint_gm, num_fwd_outputs, self)


def default_partition(joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
                      **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save every forward value the backward uses; recompute nothing — unless
    the program marks values to recompute (checkpoint regions) or names them
    (tags): then the min-cut partitioner honours the marks (Note [Checkpoint
    regions], policy.py)."""
    if has_recompute_marks(joint_gm):
        return min_cut_rematerialization_partition(joint_gm, joint_inputs,
                                                   num_fwd_outputs=num_fwd_outputs,
                                                   memory_budget=1.0)
    with gc_paused():
        roles = joint_roles(joint_gm, num_fwd_outputs)
        fwd = forward_nodes(roles)
        return build_partition(joint_gm, roles, backward_uses(joint_gm, roles, fwd))


def policy_partition(joint_gm: fx.GraphModule, num_fwd_outputs: int,
                     policy: MemoryPolicy | None,
                     recompute_policy: RecomputePolicy = is_cheap_to_recompute,
                     memory_budget: float | None = None,
                     cost: Callable[[fx.Node], int] | None = None,
                     ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The partition for a ``MemoryPolicy`` (or none): roles, budget, offload."""
    if policy is not None:
        recompute_policy = policy.recompute_policy
        memory_budget = policy.budget if memory_budget is None else memory_budget
        cost = policy.recompute_cost if cost is None else cost
    budget = config.activation_memory_budget if memory_budget is None else memory_budget
    with gc_paused():
        if config.cse:  # Note [CSE before partitioning] (partition.py)
            eliminate_common_subexpressions(joint_gm)
        roles = joint_roles(joint_gm, num_fwd_outputs)
        saved = budget_saved_values(joint_gm, num_fwd_outputs, float(budget), recompute_policy,
                                    node_roles(policy, recompute_policy),
                                    cost or configured_cost())
        fw_gm, bw_gm = build_partition(joint_gm, roles, saved)
        replay_random_ops(fw_gm, bw_gm, num_fwd_outputs)   # Note [Replayed random ops]
        insert_offload(fw_gm, bw_gm, [n.name for n in offloaded(policy, saved)])
    return fw_gm, bw_gm


#: The unit of a callable estimator's estimates (milliseconds, say) in cost units.
ESTIMATE_SCALE = 10 ** 6


def configured_cost() -> Callable[[fx.Node], int]:
    """The recompute cost ``config.activation_memory_budget_runtime_estimator``
    names: "flops" (the roofline estimate, ``recompute_cost``), "profile"
    (``profiled_cost()``: time each op), "testing" (1 per op), or a callable
    ``node -> float`` (scaled by ``ESTIMATE_SCALE`` to integer costs)."""
    estimator = config.activation_memory_budget_runtime_estimator
    if estimator == "flops":
        return recompute_cost
    if estimator == "profile":
        return profiled_cost()
    if estimator == "testing":
        return lambda node: 1
    if callable(estimator):
        return lambda node: max(1, round(float(estimator(node)) * ESTIMATE_SCALE))
    raise ValueError(
        "aotgrad.config.activation_memory_budget_runtime_estimator must be 'flops', "
        f"'profile', 'testing' or a callable node -> float, not {estimator!r}")


def profiled_cost(device: str | torch.device | None = None,
                  repeats: int = 3) -> Callable[[fx.Node], int]:
    """A ``recompute_cost`` that times each op (nanoseconds) on random inputs
    of the node's shapes and dtypes, on ``device`` (default: where the
    node's values live).  Timings are cached by op, shapes and dtypes; an op
    that cannot be run this way is priced by the roofline estimate."""
    cache: dict[Any, int] = {}

    def cost(node: fx.Node) -> int:
        key = (node.target, _signature(node.args), _signature(tuple(node.kwargs.items())))
        if key not in cache:
            try:
                cache[key] = _time_node(node, device, repeats)
            except Exception:  # an op that random inputs cannot drive
                cache[key] = recompute_cost(node)
        return cache[key]

    return cost


def _signature(args: Any) -> Any:
    def sig(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                return ("t", tuple(size_hint(s) for s in val.shape), val.dtype, val.device)
            return ("v", repr(val))
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        return repr(a)
    return sig(args)


def _time_node(node: fx.Node, device: Any, repeats: int) -> int:
    def real(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                dev = torch.device(device) if device is not None else val.device
                shape = [size_hint(s) for s in val.shape]
                if val.dtype.is_floating_point or val.dtype.is_complex:
                    return torch.randn(shape, dtype=val.dtype, device=dev)
                return torch.zeros(shape, dtype=val.dtype, device=dev)
            if isinstance(val, _torch.sym_types):
                return size_hint(val)
            raise TypeError(f"cannot make an input for {a.format_node()}")
        if isinstance(a, (list, tuple)):
            return type(a)(real(x) for x in a)
        return a

    args, kwargs = real(node.args), {k: real(v) for k, v in node.kwargs.items()}
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda
               for t in torch.utils._pytree.tree_leaves((args, kwargs)))
    with torch.no_grad():
        node.target(*args, **kwargs)                       # warm up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter_ns()
        for _ in range(repeats):
            node.target(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    return max(1, (time.perf_counter_ns() - start) // repeats)
