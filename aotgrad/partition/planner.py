"""A budget in bytes of peak memory: the plan of least estimated time that fits.

Note [Peak budget]
~~~~~~~~~~~~~~~~~~
``memory_budget`` (``config.memory_budget``, the min-cut partitioner's
keyword, ``MemoryPolicy.memory_budget``) bounds the estimated peak of a whole
training step -- parameters, inputs, activations, saved values, recomputed
temporaries, reloaded offloads, gradients (Note [Peak of a step], peak.py) --
not the saved bytes that ``config.activation_memory_budget`` bounds (Note
[Memory budget]): saving fewer bytes does not always lower the peak (rebuilding
one early activation can recompute a long chain that is then held at once).
It is bytes (``6 * 2**30``, ``"6GiB"``, ``"512MB"``) or a float in (0, 1]: a
fraction of the estimated peak of the plain min-cut plan.

The plans considered are a fixed set, the same for every budget:

* the saved sets: the vertices of the lower convex hull of (saved bytes,
  recompute cost) found by Eisner-Severance search over the price of
  recomputing costly ops (``RematProblem.solve``, at most ``MAX_HULL``
  max-flows), the plain min-cut first;
* for each, the backward's order: recomputation just in time (Note
  [Recompute just in time]), or *per use* (``recompute_per_use``): a
  recomputed value is recomputed again for a use more than ``REUSE_WINDOW``
  anchored nodes after its previous one, so a long chain is not held across
  the backward -- the saved values are its checkpoints;
* on a device (not on the CPU, where there is nothing to offload to), for
  each, the largest saved activations offloaded to CPU memory (Note
  [Offload], offload.py): the first tenth, quarter, half, three quarters or
  all of their bytes.

Each plan is built (the graphs as they would run) and measured: its peak by
``step_timeline`` and its estimated time -- the cost (``recompute_cost``'s
units) of every backward node that does not read a tangent (recomputations
and work on saved values), plus the time the compute waits for offload
copies (Note [Copies in time], copies.py: the copies overlap the compute;
the blocks they read stay in the timeline until read).  The plan chosen is the first, in the order (estimated
time, candidate), whose peak is within the budget.  The order does not
depend on the budget, hence the guarantees the tests check: as the budget
falls the chosen plan's estimated time never falls and its peak never rises
(a smaller budget picks the same plan or a later one, whose peak is within
the smaller budget).  Plans are built lazily, cheapest bound first (the
costly recompute cost plus the offload cost is a lower bound on the
estimated time), so a budget the plain plan meets costs one build.

Random ops are recomputed only when their RNG state is replayed (Note
[Replayed random ops]); collectives and impure ops never (their roles are
BANNED; ``recompute_per_use`` copies only pure nodes).  When no plan fits, the
error names the lowest estimated peak reached and the plan that reaches it.

Note [A bound on the peak]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Building a plan (its graphs, then ``step_timeline``) is most of the
planner's time, so a plan is built only when two cheap bounds, each at most
its measured figure, do not already rule it out.  The peak: at the first
step of the backward the parameters and inputs (primals), every saved value
kept on the device (not a forward output, not offloaded, not replaced by its
sizes: ``sizes_instead_of_tensors``) and the tangents are all alive, so the
bytes of their distinct storages are at most the step's peak.  It holds only
when the timeline measures one device whatever the plan
(``timeline_device``) and the backward has a step (a node reading a tangent
that a gradient needs); otherwise the bound is 0.  A plan whose bound is
above the limit is skipped; when no plan fits, the skipped ones whose bound
is at most the lowest peak found are built after all, so the error reports
the same lowest peak as building every plan.

Note [A bound on the time]
~~~~~~~~~~~~~~~~~~~~~~~~~~
The estimated time of a plan is at least the cost of the backward nodes
that read no tangent when each runs once -- the joint's ancestors of the
gradients, stopping at the saved values and tangents, minus the tangents'
side: the copies' waits are at least 0, and recomputing per use only adds
copies (so a per-use plan is not built when the same cut just in time fits:
it takes no less time).  Random ops are left out of the sum, and a cut whose
recomputation reaches an impure op counts 0.  A queue entry moves from
the coarse bound (the cut's recompute cost) to this one before its plan is
built.  ``config.debug_assert`` checks both bounds against every plan built,
and ``EXHAUSTIVE`` builds every plan (tests/test_peak_budget.py: the same
choices at every budget).
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx

from .. import _torch, config
from ..descriptors import DESC, Tangent
from ..rng import replay_random_ops
from .apply import build_partition, inputs_first
from .copies import timeline as copies_timeline
from .offload import insert_offload
from .mincut import Cut, RematProblem, min_cut_saved_values
from .peak import Timeline, known_storages_bytes, timeline_device
from .plan import may_save_sizes
from .problem import NodeRole, RecomputePolicy, activation_bytes, ancestors, forward_nodes, \
    impure_calls, is_random_or_mutating, joint_roles, tensor_bytes

MAX_HULL = 6
FILL_STEPS = 8
REUSE_WINDOW = 16
REUSE_COPIES = 4
OFFLOAD_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
#: Build every candidate, as if the bounds pruned nothing (tests: they change no choice).
EXHAUSTIVE = False

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


@dataclass(frozen=True)
class PeakBudget:
    """Note [Peak budget]: ``nbytes`` or a ``fraction`` of the plain plan's peak."""
    text: str
    nbytes: int | None = None
    fraction: float | None = None

    def limit(self, plain_peak: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.fraction * plain_peak)


def parse_memory_budget(value: object) -> PeakBudget | None:
    """``memory_budget`` as the user gave it (None: no peak budget)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"aotgrad: memory_budget must be bytes (an int or a string such as "
                        f"'6GiB') or a fraction in (0, 1], not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"aotgrad: memory_budget must be a positive number of bytes, "
                             f"not {value}")
        return PeakBudget(f"{value} bytes", nbytes=value)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"aotgrad: memory_budget={value!r}: a float is a fraction in (0, 1] of the "
                "estimated peak of the plain min-cut plan; give bytes as an int or a string "
                "such as '6GiB' or '512MB'")
        return PeakBudget(f"{value:g} of the plain plan's peak", fraction=value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None or float(m.group(1)) <= 0:
            raise ValueError(
                f"aotgrad: memory_budget={value!r} is not a size: write a positive number and "
                "a unit, such as '6GiB', '512MiB', '1.5GB' or '800000000' (bytes); KiB/MiB/GiB "
                "(and K/M/G) are powers of 1024, KB/MB/GB powers of 1000")
        return PeakBudget(value.strip(), nbytes=int(float(m.group(1)) * unit))
    raise TypeError(f"aotgrad: memory_budget must be bytes (an int or a string such as "
                    f"'6GiB') or a fraction in (0, 1], not {type(value).__name__}")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Candidate:
    """One plan of Note [Peak budget]: a hull cut, the backward's order, offloads."""
    cut: int                # index into the hull, cheapest first
    per_use: bool           # recompute per use (else just in time)
    offload: int            # index into OFFLOAD_FRACTIONS + 1 (0: none)

    def describe(self) -> str:
        parts = [f"hull cut {self.cut}", "recompute per use" if self.per_use else
                 "recompute just in time"]
        if self.offload:
            parts.append(f"offload {OFFLOAD_FRACTIONS[self.offload - 1]:.0%} of saved bytes")
        return ", ".join(parts)


@dataclass(frozen=True)
class PlanPoint:
    """A built candidate: its estimated peak and time."""
    candidate: Candidate
    peak: int
    time: int
    saved_bytes: int
    offloaded_bytes: int


@dataclass
class PeakPlan:
    """What the planner chose, and what it measured on the way (for reports)."""
    budget: PeakBudget
    limit: int
    plain_peak: int
    chosen: PlanPoint
    timeline: Timeline
    points: list[PlanPoint] = field(default_factory=list)


#: ``fw_gm.meta`` key of the PeakPlan a planned partition carries.
PLAN_META = "aotgrad_peak_plan"


def plan_for_peak(joint_gm: fx.GraphModule, num_fwd_outputs: int, budget: PeakBudget,
                  recompute_policy: RecomputePolicy, role_of: Callable[[fx.Node], NodeRole],
                  cost: Callable[[fx.Node], int],
                  offload_of: Callable[[list[fx.Node]], list[str]] = lambda saved: [],
                  ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Note [Peak budget]: the forward and backward graphs of the plan chosen."""
    costs: dict[object, int] = {}    # by the joint's node (backward copies carry its meta)
    storages: dict = {}              # the values' storages, for every timeline (peak.py)
    raw_cost = cost

    def cost(n: fx.Node, as_copy: bool = False) -> int:
        """``as_copy``: the cost of a backward copy of the joint's node ``n``."""
        key = n.meta.get("val", n) if as_copy or n.graph is not joint_gm.graph else n
        key = id(key)
        if key not in costs:
            costs[key] = raw_cost(n)
        return costs[key]

    roles = joint_roles(joint_gm, num_fwd_outputs)
    fwd = forward_nodes(roles)
    plain = min_cut_saved_values(joint_gm, num_fwd_outputs, recompute_policy, role_of, fwd)
    problem = RematProblem(joint_gm, roles, fwd, role_of, with_costly=True, costs=cost)
    cuts = _hull(problem, plain)
    device = _device(roles)
    saved_sets = [plain] + [problem.finish(c) for c in cuts[1:]]
    num_offloads = len(OFFLOAD_FRACTIONS) if device.type != "cpu" else 0
    fw_names = {n.name for n in fwd}

    def plan_graphs(c: Candidate) -> tuple[fx.GraphModule, fx.GraphModule, int]:
        """The graphs of ``c``'s cut and offloads, recomputing just in time."""
        saved = saved_sets[c.cut]
        fw_gm, bw_gm = build_partition(joint_gm, roles, saved)
        replay_random_ops(fw_gm, bw_gm, num_fwd_outputs)   # Note [Replayed random ops]
        moved = _offload_choice(saved, problem, c.offload)
        insert_offload(fw_gm, bw_gm,
                       list(dict.fromkeys(offload_of(saved) + [n.name for n in moved])))
        return fw_gm, bw_gm, sum(tensor_bytes(n) or 0 for n in moved)

    bound_device = timeline_dev = timeline_device(joint_gm, roles.primals)
    if not any(isinstance(g, fx.Node) and g.op == "call_function" and g in problem.tangent_side
               for g in roles.bwd_outputs):
        bound_device = None    # the backward may have no step: no bound
    fwd_outputs = set(roles.fwd_outputs)
    bounds: dict[tuple[int, int], int] = {}

    def peak_bound(c: Candidate) -> int:
        """Note [A bound on the peak]: at most the peak of ``c``'s graphs."""
        if bound_device is None:
            return 0
        if (c.cut, c.offload) not in bounds:
            saved = saved_sets[c.cut]
            away = set(offload_of(saved)) | {n.name for n in
                                             _offload_choice(saved, problem, c.offload)}
            held = [n for n in saved if n.op != "placeholder" and n not in fwd_outputs and
                    n.name not in away and not may_save_sizes(n)]
            bounds[c.cut, c.offload] = known_storages_bytes(
                [*roles.primals, *held, *roles.tangents], bound_device, storages)
        return bounds[c.cut, c.offload]

    impure = impure_calls(joint_gm.graph)
    work: dict[int, int] = {}

    def time_bound(c: Candidate, bound: int) -> int:
        """Note [A bound on the time]: at most ``c``'s estimated time, and at least ``bound``."""
        if c.cut not in work:
            saved = saved_sets[c.cut]
            stop = frozenset(saved) | frozenset(roles.tangents)
            run = ancestors(roles.bwd_roots, stop=stop) - stop - problem.tangent_side
            work[c.cut] = 0 if run & impure else sum(
                cost(n, as_copy=True) for n in run if n.op == "call_function" and
                isinstance(n.meta.get("val"), torch.Tensor) and not _random(n))
        return max(bound, work[c.cut])

    COARSE, UNBUILT, BUILT = 2, 1, 0    # what a queue entry's first item is for its candidate
    queue = []
    for k, cut in enumerate(cuts):
        for per_use in (False, True):
            for off in range(num_offloads + 1):
                c = Candidate(k, per_use, off)
                heapq.heappush(queue, (cut.recompute_cost, _key(c), COARSE, c))
    points: dict[Candidate, PlanPoint] = {}
    latest: dict[Candidate, tuple] = {}    # graphs and timeline of the latest build, by candidate
    kept: dict[Candidate, tuple] = {}      # those of the plans measured within the limit

    def measure(c: Candidate) -> PlanPoint:
        if c in points:
            return points[c]
        jit = dataclasses.replace(c, per_use=False)
        if c.per_use and jit in latest and jit not in kept:   # rewrite the JIT plan's graphs
            fw_gm, bw_gm, moved_bytes, timeline = latest[jit]
        else:
            (fw_gm, bw_gm, moved_bytes), timeline = plan_graphs(c), None
        latest.clear()
        if c.per_use and not recompute_per_use(bw_gm, fw_names) and timeline is not None:
            points[c] = dataclasses.replace(points[jit], candidate=c)   # the JIT plan's graphs
        else:
            recomputed = frozenset(n.name for n in bw_gm.graph.nodes
                                   if n.op == "call_function" and n.name in fw_names)
            timeline, copies = copies_timeline(fw_gm, bw_gm, recomputed, cost, storages,
                                               timeline_dev)
            time = _backward_work(bw_gm, cost) + copies.stall
            points[c] = PlanPoint(c, timeline.peak, time, cuts[c.cut].saved_bytes, moved_bytes)
        if config.debug_assert and (peak_bound(c) > points[c].peak or
                                    time_bound(c, 0) > points[c].time):
            raise AssertionError(
                f"aotgrad planner: the bounds {peak_bound(c)}, {time_bound(c, 0)} on the peak "
                f"and time of {c} exceed them: {points[c]} (Note [Peak budget])")
        latest[c] = (fw_gm, bw_gm, moved_bytes, timeline)
        return points[c]

    plain_peak = measure(Candidate(0, False, 0)).peak
    limit = budget.limit(plain_peak)
    skipped: list[Candidate] = []     # not built: their bound is above the limit
    while queue:
        bound, _, state, c = heapq.heappop(queue)
        if state != BUILT:
            if c in points:
                point = points[c]
            elif EXHAUSTIVE:
                point = measure(c)
            elif c.per_use and dataclasses.replace(c, per_use=False) in kept:
                continue    # the JIT plan fits, at no more time (Note [Peak budget])
            elif peak_bound(c) > limit:
                skipped.append(c)
                continue
            elif state == COARSE and time_bound(c, bound) > bound:
                heapq.heappush(queue, (time_bound(c, bound), _key(c), UNBUILT, c))
                continue
            else:
                point = measure(c)
            if point.peak <= limit:    # within the budget: ordered by its true time
                kept[c] = latest.get(c)    # None: built over since
                heapq.heappush(queue, (point.time, _key(c), BUILT, c))
            continue
        if kept[c] is None:
            del points[c]
            measure(c)
            kept[c] = latest[c]
        fw_gm, bw_gm, _, timeline = kept[c]
        fw_gm.meta[PLAN_META] = PeakPlan(budget, limit, plain_peak, points[c], timeline,
                                         list(points.values()))
        return fw_gm, bw_gm

    # No plan fits: the lowest peak, building the skipped plans whose bound does not exceed it.
    def order(p: PlanPoint) -> tuple:
        return p.peak, p.time, _key(p.candidate)

    best = min(points.values(), key=order)
    for c in sorted(skipped, key=lambda c: (peak_bound(c), _key(c))):
        if peak_bound(c) > best.peak:
            break
        best = min(best, measure(c), key=order)
    raise ValueError(
        f"aotgrad: no plan fits memory_budget ({budget.text}: {format_bytes(limit)}, {limit} "
        f"bytes, of estimated peak). The lowest estimated peak of this training step is "
        f"{format_bytes(best.peak)} ({best.peak} bytes; {best.candidate.describe()}); the "
        f"plain min-cut plan "
        f"peaks at {format_bytes(plain_peak)}. Raise the budget"
        + ("" if num_offloads else ", run on a device to offload saved values to CPU memory")
        + ", or make the step smaller (batch, sequence length); Note [Peak budget].")


def _key(c: Candidate) -> tuple:
    return (c.cut, c.per_use, c.offload)


def _device(roles) -> torch.device:
    for p in roles.primals:
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type != "cpu":
            return val.device
    return torch.device("cpu")


def _hull(problem: RematProblem, plain: list[fx.Node]) -> list[Cut]:
    """The lower convex hull's vertices of (saved bytes, recompute cost),
    cheapest first: Eisner-Severance, breadth first, ``MAX_HULL`` solves."""
    tensors = tuple(n for n in plain if not _torch.is_sym_node(n))
    hi = Cut(tensors, activation_bytes(tensors, problem.storages), 0)
    lo = problem.solve(0.0)
    if lo is None or lo.saved_bytes >= hi.saved_bytes:
        return [hi]
    vertices = [hi, lo]
    pending = [(hi, lo)]
    solves = 1
    while pending and solves < MAX_HULL:
        a, b = pending.pop(0)
        d_cost = b.recompute_cost - a.recompute_cost
        if d_cost <= 0 or a.saved_bytes <= b.saved_bytes:
            continue
        lam = (a.saved_bytes - b.saved_bytes) / d_cost
        mid = problem.solve(lam)
        solves += 1
        if mid is None:
            continue
        line = b.saved_bytes + lam * b.recompute_cost
        if mid.saved_bytes + lam * mid.recompute_cost >= line - 1e-9 * max(1.0, line) or \
                any((mid.saved_bytes, mid.recompute_cost) == (v.saved_bytes, v.recompute_cost)
                    for v in vertices):
            continue
        vertices.append(mid)
        pending += [(a, mid), (mid, b)]
    return _fill(problem, sorted(vertices, key=lambda c: (c.recompute_cost, -c.saved_bytes)))


def _fill(problem: RematProblem, vertices: list[Cut]) -> list[Cut]:
    """The hull's vertices and cuts spread between its two ends: on a stack of
    equal layers the hull has only its ends (the points between are
    collinear), and a peak budget needs the points between.  The costly nodes
    the cheapest end (``lo``) recomputes beyond the plain cut are allowed in
    graph order (layer by layer: an early layer is rebuilt from fewer values),
    ``FILL_STEPS - 1`` evenly spaced prefixes."""
    hi, lo = vertices[0], min(vertices, key=lambda c: (c.saved_bytes, c.recompute_cost))
    index = {n: i for i, n in enumerate(problem.graph_nodes)}
    extra = sorted(lo.recomputed_costly - hi.recomputed_costly, key=index.__getitem__)
    out = list(vertices)
    seen = {(c.saved_bytes, c.recompute_cost) for c in out}
    for q in range(1, FILL_STEPS):
        k = len(extra) * q // FILL_STEPS
        if k in (0, len(extra)):
            continue
        cut = problem.solve(0.0, hi.recomputed_costly | frozenset(extra[:k]))
        if cut is not None and (cut.saved_bytes, cut.recompute_cost) not in seen and \
                lo.saved_bytes < cut.saved_bytes < hi.saved_bytes:
            seen.add((cut.saved_bytes, cut.recompute_cost))
            out.append(cut)
    out.sort(key=lambda c: (c.recompute_cost, -c.saved_bytes))
    return out


def _offload_choice(saved: Sequence[fx.Node], problem: RematProblem, k: int) -> list[fx.Node]:
    """The largest saved activations holding ``OFFLOAD_FRACTIONS[k - 1]`` of their bytes."""
    if k == 0:
        return []
    acts = [n for n in saved if isinstance(n.meta.get("val"), torch.Tensor) and
            n.op != "placeholder" and not problem.storages.on_input(n)]
    acts.sort(key=lambda n: (-(tensor_bytes(n) or 0), n.name))
    total = sum(tensor_bytes(n) or 0 for n in acts)
    goal, moved, out = OFFLOAD_FRACTIONS[k - 1] * total, 0, []
    for n in acts:
        if moved >= goal:
            break
        out.append(n)
        moved += tensor_bytes(n) or 0
    return out


def _anchored(graph: fx.Graph, impure: set[fx.Node] | None = None) -> set[fx.Node]:
    """Backward nodes that read a tangent (or are impure, or the output): the
    ones whose order Note [Recompute just in time] keeps."""
    anchored = {p for p in graph.find_nodes(op="placeholder")
                if isinstance(p.meta.get(DESC), Tangent)}
    impure = impure_calls(graph) if impure is None else impure
    for n in graph.nodes:
        if n.op == "output" or n in impure or any(a in anchored for a in n.all_input_nodes):
            anchored.add(n)
    return anchored


def _backward_work(bw_gm: fx.GraphModule, cost: Callable[[fx.Node], int]) -> int:
    """The cost of the backward's nodes that do not read a tangent."""
    anchored = _anchored(bw_gm.graph)
    return sum(cost(n) for n in bw_gm.graph.nodes
               if n.op == "call_function" and n not in anchored and
               isinstance(n.meta.get("val"), torch.Tensor))


def recompute_per_use(bw_gm: fx.GraphModule, fw_names: set[str],
                      window: int = REUSE_WINDOW) -> bool:
    """Note [Peak budget]: recompute a forward value again for a use more than
    ``window`` anchored nodes after its previous use (the graph has its
    recomputations just in time).  Only pure nodes are copied: never a random
    op (Note [Replayed random ops] replays the one the forward ran), an
    impure op or a collective, nor aotgrad's own ops (reloads of offloaded
    values) or higher-order ops (a replayed random op).  Returns whether it
    changed the graph."""
    graph = bw_gm.graph
    impure = impure_calls(graph)
    anchored = _anchored(graph, impure)

    memo: dict[fx.Node, bool] = {}

    def copyable(n: fx.Node) -> bool:
        if n not in memo:
            memo[n] = _copyable(n)
        return memo[n]

    def _copyable(n: fx.Node) -> bool:
        plain_op = (isinstance(n.target, _torch.OpOverload) and
                    n.target.namespace != "aotgrad") or n.target is operator.getitem
        return n.op == "call_function" and plain_op and n not in anchored and \
            n not in impure and not is_random_or_mutating(n) and not _random(n)

    latest: dict[fx.Node, tuple[fx.Node, int]] = {}   # original -> (copy in use, last anchor)
    changed = False
    anchors = [n for n in graph.nodes if n in anchored and n.op != "placeholder"]
    # at most REUSE_COPIES copies of a value: the window grows with the backward
    window = max(window, len(anchors) // REUSE_COPIES)
    for step, anchor in enumerate(anchors):
        result: dict[fx.Node, fx.Node] = {}
        stack = [(a, False) for a in anchor.all_input_nodes]
        while stack:                        # inputs before users, without recursion
            v, inputs_done = stack.pop()
            if v in result:
                continue
            if not copyable(v):
                result[v] = v
                continue
            current = latest.get(v)
            if current is not None and step - current[1] <= window:
                latest[v] = (current[0], step)
                result[v] = current[0]
                continue
            if not inputs_done:
                stack.append((v, True))
                stack.extend((a, False) for a in v.all_input_nodes if a not in result)
                continue
            if current is None:             # the original, placed before its first anchor
                _read_from(v, result)
                node = v
            else:
                with graph.inserting_before(anchor):
                    node = graph.node_copy(v, result.__getitem__)
                node.meta = dict(v.meta)
                changed = True
            latest[v] = (node, step)
            result[v] = node
        _read_from(anchor, result)
    if changed:
        _place_inputs_first(graph)
        # dead copies and originals: pure by construction (``copyable``); the
        # graph's impure nodes were found above (fx's own pass asks each node)
        for n in reversed(graph.nodes):
            if n.op == "call_function" and not n.users and n not in impure and \
                    not is_random_or_mutating(n):
                graph.erase_node(n)
        if config.debug_assert:
            graph.lint()
        bw_gm.recompile()
    return changed


def _read_from(n: fx.Node, result: dict[fx.Node, fx.Node]) -> None:
    """``n`` reads ``result[a]`` for each input ``a`` it has there (setting a
    node's arguments costs as much as making one: only when one changes)."""
    if all(result.get(a, a) is a for a in n.all_input_nodes):
        return
    n.args = fx.node.map_arg(n.args, lambda a: result.get(a, a))
    n.kwargs = fx.node.map_arg(n.kwargs, lambda a: result.get(a, a))


def _random(n: fx.Node) -> bool:
    return isinstance(n.target, _torch.OpOverload) and \
        torch.Tag.nondeterministic_seeded in n.target.tags


def _place_inputs_first(graph: fx.Graph) -> None:
    """Order the nodes so each comes after its inputs, otherwise as they are
    (a copy inserted before an anchor can be the input of an original placed
    earlier)."""
    order = inputs_first(list(graph.nodes), set())
    for prev, m in zip(order, order[1:]):
        if prev.next is not m:
            prev.append(m)
