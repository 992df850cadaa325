"""Min-cut rematerialization: save fewer bytes by recomputing cheap ops.

``min_cut_rematerialization_partition`` (policy.py) has the partitioner signature of
``aotgrad.partition`` and differs from ``default_partition`` in one choice:
*which* forward values the backward keeps.  The rest (building the two graphs,
recomputing in the backward whatever it needs and was not saved) is
``apply.build_partition``.

Note [Min-cut rematerialization]
--------------------------------
The backward needs some values of the joint graph.  Each is either saved by
the forward or recomputed by the backward from saved values.  A saved set is
*valid* when every path from a primal to a value the backward reads crosses a
saved value, and *allowed* when all the backward would recompute is cheap
(``is_cheap_to_recompute``, problem.py: the tables ``CHEAP_TAGS``,
``CHEAP_NON_POINTWISE_OPS``, ``NEVER_RECOMPUTE_TAGS``) or is backward work
anyway.  We want an allowed valid set of fewest bytes: a minimum cut.

The joint's nodes fall in three groups:

* forward nodes ``F`` (``problem.forward_nodes``): the forward computes them;
* backward nodes ``B``: they depend on a tangent, only the backward can run them;
* free nodes ``U``: the rest of what the gradients need.  They depend on
  primals only (``cos_1 = cos(primals_1)`` below), so either side may compute
  them; ``default_partition`` runs them in the backward.

The network has a vertex pair ``v_in -> v_out`` for every tensor node of ``F``
and ``U`` that the backward needs, directly or through other such nodes.
Cutting ``v_in -> v_out`` means "save v" and costs v's bytes
(``tensor_bytes``; a hint for symbolic sizes); a node that is not a tensor (the
tuple of a multi-output op) cannot be saved: infinite capacity.  Data edges
``u_out -> v_in`` are infinite.  The source feeds ``v_in`` (infinitely) for
every primal and every ``F`` node the policy does not allow to recompute —
matmuls, reductions, random ops, anything not in the tables — so a cut saves
such a node or something after it, never passes through it.  Whatever a ``B``
node reads, and every gradient that is not a ``B`` node, feeds the sink::

    source ==> primals_1_in -> primals_1_out ==> sin_in -> sin_out ==> mul_in -> mul_out
                                 ||                                       ||
                                 ++==> cos_1_in -> cos_1_out ==> sink <==++   (sin_1 reads mul)

A finite cut is exactly an allowed valid saved set, and max-flow (Dinic's,
``FlowNetwork``) finds one of fewest bytes.  Vertices that still reach the
sink in the residual network are on the backward side: this is the cut nearest
the sink, which among equally small cuts recomputes least.  Capacities are
``bytes * K + 1`` (``K`` > number of vertices), and ``bytes * K`` for forward
outputs, which are alive anyway: an equal-bytes tie goes to them.  Primals and
views of them (``t(weight)``) cost no bytes: they keep no memory of their own
alive (``StorageCache``).

Symbolic ints stay out of the network: those the backward reads and cannot
compute from tangents are saved (a few bytes each).  When the cut does not save
fewer ``tensor_bytes`` than ``default_partition``, the default set is used:
recomputing must buy memory.

Before and after, for ``f(x) = (x.sin() * 2).cos().sum()`` (the cut above is
``primals_1``: one tensor instead of two)::

    joint:     sin = sin(primals_1); mul = mul(sin, 2); cos = cos(mul); sum_1 = sum(cos)
               expand = expand(tangents_1, [3]); sin_1 = sin(mul); neg = neg(sin_1)
               mul_1 = mul(expand, neg); mul_2 = mul(mul_1, 2)
               cos_1 = cos(primals_1); mul_3 = mul(mul_2, cos_1)
               return (sum_1, mul_3)
    default:   fw: ... return (sum_1, primals_1, mul)          # saves primals_1, mul
               bw: (primals_1, mul, tangents_1) -> expand ... mul_3
    min-cut:   fw: ... return (sum_1, primals_1)               # saves primals_1
               bw: (primals_1, tangents_1) -> sin = sin(primals_1); mul = mul(sin, 2)
                   expand ... mul_3                            # sin, mul recomputed
"""


from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .. import _torch, config
from ..bans import recompute_bans
from ..views import is_view_op
from .problem import JointRoles, NodeRole, RecomputePolicy, StorageCache, activation_bytes, \
    ancestors, backward_uses, default_roles, descendants, forward_nodes, is_cheap_to_recompute, \
    is_fusible, joint_roles, tensor_bytes


# ---------------------------------------------------------------- max-flow


class FlowNetwork:
    """A flow network with integer capacities; Dinic's max-flow, no recursion.

    Edges live in flat arrays (edge ``e ^ 1`` is the reverse of ``e``); the
    adjacency is built once, in compressed form, when the flow is computed.
    ``cap`` holds the residual capacities: ``max_flow`` augments whatever flow
    they already carry (a warm start, ``RematProblem.solve``).
    """

    def __init__(self, num_vertices: int):
        self.num_vertices = num_vertices
        self.to: list[int] = []
        self.cap: list[int] = []
        self._start: list[int] = []   # edges of u: _edges[_start[u]:_start[u + 1]]
        self._edges: list[int] = []

    def add_edge(self, u: int, v: int, cap: int) -> None:
        self.to += (v, u)
        self.cap += (cap, 0)

    def copy(self) -> "FlowNetwork":
        """The same edges and capacities (to add more edges, or set capacities,
        and solve); the adjacency, once built, is shared while no edge is added."""
        net = FlowNetwork(self.num_vertices)
        net.to, net.cap = list(self.to), list(self.cap)
        if self._built():
            net._start, net._edges = self._start, self._edges
        return net

    def _built(self) -> bool:
        """Whether the adjacency is that of the edges now."""
        return bool(self._start) and len(self._edges) == len(self.to)

    def _build_adjacency(self) -> None:
        to, n = self.to, self.num_vertices
        count = [0] * (n + 1)
        for v in to:                   # the tail of e is to[e ^ 1]
            count[v + 1] += 1
        for u in range(n):
            count[u + 1] += count[u]
        fill = count[:-1]
        edges = [0] * len(to)
        for e in range(len(to)):
            tail = to[e ^ 1]
            edges[fill[tail]] = e
            fill[tail] += 1
        self._start, self._edges = count, edges

    def max_flow(self, s: int, t: int) -> int:
        """The flow added from ``s`` to ``t`` until it is maximal."""
        if not self._built():
            self._build_adjacency()
        start, edges, to, cap = self._start, self._edges, self.to, self.cap
        n = self.num_vertices
        flow = 0
        while True:
            level = [-1] * n
            level[s] = 0
            queue = deque([s])
            while queue:
                u = queue.popleft()
                for k in range(start[u], start[u + 1]):
                    e = edges[k]
                    if cap[e] > 0 and level[to[e]] < 0:
                        level[to[e]] = level[u] + 1
                        queue.append(to[e])
            if level[t] < 0:
                return flow
            it = start[:]               # current-arc pointers
            path: list[int] = []        # edges from s to u
            u = s
            while True:
                if u == t:
                    pushed = min(cap[e] for e in path)
                    flow += pushed
                    k = len(path)
                    for i, e in enumerate(path):
                        cap[e] -= pushed
                        cap[e ^ 1] += pushed
                        if cap[e] == 0 and i < k:
                            k = i       # retreat to the first saturated edge
                    del path[k:]
                    u = to[path[-1]] if path else s
                    continue
                k, end, next_level = it[u], start[u + 1], level[u] + 1
                while k < end:
                    e = edges[k]
                    if cap[e] > 0 and level[to[e]] == next_level:
                        break
                    k += 1
                it[u] = k
                if k < end:
                    path.append(edges[k])
                    u = to[edges[k]]
                elif path:              # dead end: prune u, step back
                    level[u] = -1
                    e = path.pop()
                    u = to[e ^ 1]
                    it[u] += 1
                else:
                    break

    def reaches(self, t: int) -> list[bool]:
        """Vertices with a residual path to ``t`` (after ``max_flow``)."""
        start, edges, to, cap = self._start, self._edges, self.to, self.cap
        seen = [False] * self.num_vertices
        seen[t] = True
        queue = deque([t])
        while queue:
            v = queue.popleft()
            for k in range(start[v], start[v + 1]):
                e = edges[k]
                u = to[e]                # edge e ^ 1 goes u -> v
                if not seen[u] and cap[e ^ 1] > 0:
                    seen[u] = True
                    queue.append(u)
        return seen


# ---------------------------------------------------------------- choosing what to save


@dataclass(frozen=True)
class Cut:
    saved: tuple[fx.Node, ...]      # tensors; RematProblem.finish adds symbolic ints
    saved_bytes: int                # bytes of the saved tensors that are not primals
    recompute_cost: int             # total cost of the COSTLY nodes the backward recomputes
    recomputed_costly: frozenset = frozenset()   # those nodes


class RematProblem:
    """The flow network of Note [Min-cut rematerialization], built once.

    ``solve(lam)`` finds the saved set minimizing ``bytes + lam * cost``,
    where ``cost`` is the recompute cost (``costs``) of the COSTLY nodes the
    backward recomputes; ``lam=None`` forbids recomputing them (the plain
    min-cut).  Primals cost no bytes (they are alive anyway).
    """

    def __init__(self, joint_gm: fx.GraphModule, roles: JointRoles, fwd: set,
                 role_of: Callable[[fx.Node], NodeRole], *, with_costly: bool,
                 costs: Callable[[fx.Node], int] | None = None):
        self.roles = roles
        self.graph_nodes = list(joint_gm.graph.nodes)
        # Note [Effects in the backward] (tokens.py): its effects are backward nodes
        tangent_side = descendants(list(roles.tangents) + list(roles.bwd_effects))
        needed = ancestors(roles.bwd_roots)
        backward = needed & tangent_side
        primals = set(roles.primals)
        self.tangent_side, self.fwd = tangent_side, fwd
        syms = {n for n in needed | fwd if _torch.is_sym_node(n)}

        def candidate(n: fx.Node) -> bool:   # in F or U, and not a symbolic int
            return (n in fwd or n in needed) and n not in tangent_side and n not in syms

        role = {}
        # Note [Recompute bans] (bans.py): cheap forward nodes the options keep
        # out of the backward become COSTLY (a budget may still recompute them)
        cheap = [n for n in self.graph_nodes if n in fwd and n not in primals
                 and role_of(n) is NodeRole.CHEAP]
        banned = recompute_bans(self.graph_nodes, fwd, cheap, is_fusible, tensor_bytes)

        def role_in_fwd(n: fx.Node) -> NodeRole:
            if n not in role:
                r = role_of(n) if n in fwd or n in primals else NodeRole.CHEAP
                if r is NodeRole.CHEAP and n in banned:
                    r = NodeRole.COSTLY
                if r is NodeRole.COSTLY and not with_costly:
                    r = NodeRole.BANNED
                role[n] = NodeRole.BANNED if n in primals else r
            return role[n]
        self.role = role_in_fwd

        # Sink side: what B nodes read, and gradients that are not B nodes.
        to_sink: dict[fx.Node, None] = {}
        for b in backward:
            for u in b.all_input_nodes:
                if candidate(u):
                    to_sink[u] = None
        for g in roles.bwd_outputs:
            if isinstance(g, fx.Node) and candidate(g):
                to_sink[g] = None
        self.empty = not to_sink

        # The nodes of the network: ancestors of the sink-side nodes, stopping at banned ones.
        members: set[fx.Node] = set()
        stack = list(to_sink)
        while stack:
            n = stack.pop()
            if n in members:
                continue
            members.add(n)
            if role_in_fwd(n) is not NodeRole.BANNED:
                stack.extend(u for u in n.all_input_nodes if candidate(u))
        order = [n for n in self.graph_nodes if n in members]
        index = {n: i for i, n in enumerate(order)}
        self.order = order

        # Capacities: bytes, scaled so that ties break toward saving forward
        # outputs (alive anyway); None: cannot be saved.
        scale = len(order) + 1
        alive = {n for n in roles.fwd_outputs if isinstance(n, fx.Node)}
        self.storages = storages = StorageCache(joint_gm)
        free = primals - storages.priced_primals
        self.bytes = [0 if n in free or storages.on_input(n) else tensor_bytes(n)
                      for n in order]
        views_unsaved = config.recompute_views   # views are always recomputed
        caps = [None if b is None or role_in_fwd(n) is NodeRole.NO_SAVE or
                (views_unsaved and n.op == "call_function" and is_view_op(n.target))
                else b * scale + (n not in alive and n not in primals)
                for n, b in zip(order, self.bytes)]
        self.inf = inf = sum(c for c in caps if c is not None) + 1   # more than any finite cut
        self.scale = scale
        net = FlowNetwork(2 * len(order) + 2)
        self.source, self.sink = source, sink = 2 * len(order), 2 * len(order) + 1
        self.costly: list[tuple[int, int]] = []   # (vertex, cost) of COSTLY nodes
        for i, n in enumerate(order):
            net.add_edge(2 * i, 2 * i + 1, inf if caps[i] is None else caps[i])
            r = role_in_fwd(n)
            if r is NodeRole.BANNED:
                net.add_edge(source, 2 * i, inf)
                continue
            if r is NodeRole.COSTLY:
                self.costly.append((i, max(1, costs(n) if costs is not None else 1)))
            for u in n.all_input_nodes:
                j = index.get(u)
                if j is not None:
                    net.add_edge(2 * j + 1, 2 * i, inf)
            if n in to_sink:
                net.add_edge(2 * i + 1, sink, inf)
        for n in to_sink:  # banned sink-side nodes: saved whole
            i = index[n]
            if role_in_fwd(n) is NodeRole.BANNED:
                net.add_edge(2 * i + 1, sink, inf)
        # the source's edges to COSTLY nodes: their capacities are set per solve
        self._costly_edges = []
        for i, _ in self.costly:
            self._costly_edges.append(len(net.to))
            net.add_edge(source, 2 * i, 0)
        net._build_adjacency()    # once: every solve's copy shares it
        self.net = net
        self._flows: list[tuple[list[int], list[int], int]] = []   # of the solves so far

    def solve(self, lam: float | None, allowed: frozenset[fx.Node] | None = None) -> Cut | None:
        """The optimal cut for ``lam`` (None: COSTLY nodes are not recomputed);
        with ``allowed``, only those COSTLY nodes may be.  None when no finite
        cut exists."""
        if self.empty:
            return Cut((), 0, 0)
        caps = []
        for i, cost in self.costly:
            banned = lam is None or (allowed is not None and self.order[i] not in allowed)
            caps.append(self.inf if banned else max(1, round(lam * cost * self.scale)))
        # Warm start: the largest flow of an earlier solve that these capacities
        # still carry (the other edges are the same).  Any maximum flow leaves
        # the same vertices reaching the sink, so the cut is the one a cold
        # start finds.
        edges, net, start = self._costly_edges, self.net.copy(), 0
        warm = max((f for f in self._flows if all(
            old - f[0][e] <= cap for e, old, cap in zip(edges, f[1], caps))),
            key=lambda f: f[2], default=None)
        if warm is not None:
            residual, old_caps, start = warm
            net.cap = list(residual)
            for e, old, cap in zip(edges, old_caps, caps):
                net.cap[e] += cap - old
        else:
            for e, cap in zip(edges, caps):
                net.cap[e] = cap
        flow = start + net.max_flow(self.source, self.sink)
        self._flows.append((net.cap, caps, flow))
        if flow >= self.inf:
            return None
        recomputed = net.reaches(self.sink)
        order = self.order
        saved = {n for i, n in enumerate(order) if not recomputed[2 * i] and recomputed[2 * i + 1]}
        cost = sum(c for i, c in self.costly if recomputed[2 * i])
        costly = frozenset(order[i] for i, _ in self.costly if recomputed[2 * i])
        saved_nodes = tuple(n for n in order if n in saved)
        return Cut(saved_nodes, activation_bytes(saved_nodes, self.storages), cost, costly)

    def finish(self, cut: Cut) -> list[fx.Node]:
        """The cut's saved values with the symbolic ints the backward needs,
        in joint graph order (and a check of the cut: ``_symints_to_save``)."""
        saved = set(cut.saved)
        saved |= _symints_to_save(self.roles, saved, self.tangent_side, self.fwd, self.role)
        return [n for n in self.graph_nodes if n in saved]


def min_cut_saved_values(joint_gm: fx.GraphModule, num_fwd_outputs: int,
                         recompute_policy: RecomputePolicy = is_cheap_to_recompute,
                         role_of: Callable[[fx.Node], NodeRole] | None = None,
                         fwd: set[fx.Node] | None = None) -> list[fx.Node]:
    """The values the forward saves (joint graph order), by Note [Min-cut rematerialization].

    Falls back to ``default_partition``'s choice when the cut is not smaller
    (and no role forbids saving a value).  ``fwd``: ``forward_nodes``, when known.
    """
    roles = joint_roles(joint_gm, num_fwd_outputs)
    fwd = forward_nodes(roles) if fwd is None else fwd
    role_of = role_of or default_roles(recompute_policy)
    problem = RematProblem(joint_gm, roles, fwd, role_of, with_costly=False)
    cut = problem.solve(None)
    default_saved = backward_uses(joint_gm, roles, fwd)
    if any(role_of(n) is NodeRole.NO_SAVE for n in default_saved):
        if cut is None:
            raise RuntimeError("aotgrad min-cut: the values the policy forbids saving cannot "
                               "all be recomputed")
        return problem.finish(cut)
    if cut is None:
        return default_saved
    if cut.saved_bytes >= activation_bytes(default_saved, problem.storages) and not (
            config.recompute_views and any(n.op == "call_function" and is_view_op(n.target)
                                           for n in default_saved)):
        return default_saved
    return problem.finish(cut)


def _symints_to_save(roles, saved: set, tangent_side: set, fwd: set,
                     role: Callable[[fx.Node], NodeRole]) -> set[fx.Node]:
    """Symbolic ints the backward reads that it cannot compute from tangents and ``saved``.

    Also checks the cut: the backward recomputes no primal and no forward node
    whose role forbids it.
    """
    syms: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [n for n in roles.bwd_roots if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen or n in saved:
            continue
        seen.add(n)
        if n not in tangent_side:
            if _torch.is_sym_node(n):
                syms.add(n)
                continue
            if n.op == "placeholder" or (n in fwd and role(n) is NodeRole.BANNED):
                raise AssertionError(
                    "aotgrad min-cut: the backward would recompute "
                    f"{n.format_node()}, which the recompute policy forbids; this is a bug "
                    "in aotgrad.partition.mincut (use default_partition meanwhile)")
        stack.extend(n.all_input_nodes)
    return syms
