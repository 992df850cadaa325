"""The backward of a program when autograd gives no gradient for some outputs.

Note [Missing tangents]
~~~~~~~~~~~~~~~~~~~~~~~
When an output of a compiled program is not used (``a, b = f(x)`` and only
``b`` reaches the loss), autograd gives its node no gradient for it.  Eager
treats the missing gradient as *absent*: the backward formulas it would flow
through are skipped, and where it meets a gradient that is there (an ``add``)
it contributes nothing.  The compiled backward takes one tensor per tangent,
so the runtime passes zeros -- the same values as eager wherever the zeros
only travel through views, sums and additions, but not where they meet
another value in a product: ``f(x) = (x.log(), 2 * x)`` at ``x = 0`` gives
eager's ``x.grad == 2`` but ``0 / 0 + 2 = nan`` from the zeros.

The rule: a backward is linear in its tangents (every value on the tangents'
side of the graph is a sum of products of one tangent with forward values).
So a node whose tangent-side inputs are all zeros is zero -- what eager's
skipped formula leaves -- whatever its other inputs hold.  Per program, at
compile time (``absorbing_tangents``, one pass): the tangents whose zeros
would meet another tensor that way (``mul`` by a saved value, ``div``,
``mm``, the ``*_backward`` ops, ...).  When one of those is missing, the
runtime calls a backward specialised to the missing set (``without``,
compiled at the first call that misses that set, by the same compiler,
cached): the missing tangents are symbolic zeros propagated through the graph
(through functional ATen ops with floating outputs; ``add``/``sub`` with a
zero is the other argument; a gradient that is all zero is None, as eager
leaves it: Note [Gradients that eager leaves None]) and materialised as zeros
only before an op that also reads a non-zero tangent-side value (``cat`` of
the pieces of a ``split``'s gradient) or has no such rule.  The specialised
graph keeps every placeholder (the calling convention does not change; the
missing tangents' zeros are passed and read only where materialised).  Fewer
ops run, too: the double backward of a program whose unwanted gradients come
back unused (Note [Wanted gradients]) pushes no zeros through them.

When no missing tangent's zeros meet another tensor, the zeros go
through the backward as compiled (no second compilation: the values are
eager's).  A zero is materialised with ``full`` (contiguous; symbolic sizes
read off the value the graph computes there).

Eager's own formulas skip an undefined gradient, and they are linear in the
gradient.  A custom ``autograd.Function``'s backward need be neither: it gets
zeros for an undefined gradient (``materialize_grads``, the default) and may
compute anything from them (``x + ga * x``, ``ga.cos()``).  So a program whose
joint backward ran a custom Function's backward (an ``autograd.Function``
node in the traced autograd graph: ``custom_backwards``, which also counts
higher-order ops built on one) is not specialised: the runtime's zeros are
what eager passes such a backward (``CUSTOM_BACKWARD_META`` on the backward
graph, set by the trace; absent, e.g. a graph loaded from the cache that may
hold such a Function, it counts as set).

Note [Tangents that reach no custom backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Such a program still specialises, per missing set, for the missing tangents
whose gradient reaches no custom node that runs: the traced autograd graph
(``AutogradReach``, Note [Gradients that eager leaves None]) says which nodes
the engine runs (those reached from a given root) and which nodes each
tangent's root reaches.  The zeros of such a tangent meet only built-in
formulas, which are linear, and custom nodes that do not run, whose whole
contribution eager leaves out -- so they may be symbolic zeros, exactly as
above, through the custom backward's ATen ops too.  Two silent wrong values
go: ``f(x) = (x.log(), CF.apply(x))`` with the log unused at ``x = 0``
(eager 3, the zeros nan), and a custom backward that eager does not run
computing from a missing tangent into a gradient that is there
(``g.cos()``: it added ones).  The specialisation is made when a missing
tangent's zeros would meet another value or go through an op that need not
keep them zero (``absorbing_tangents(custom=True)``).  The other missing
tangents get the runtime's zeros, as a running custom backward gets them in
eager (a node that does not run but is also reached from such a tangent
still adds what it computes from zeros), and a custom backward that eager
does not run still adds what it computes from no tangent at all (``ones``,
or ``ones_like`` of the zeros autograd makes for an output of the Function
the program never returns): shared with torch's aot_function.  The
specialised graph returns its all-zero gradients as zeros (``whole``):
which are None is the AutogradReach's to say.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch
from .descriptors import DESC, Tangent
from .partition import descendants
from .views import is_view_op

aten = _torch.aten

_ADDITIVE = {aten.add.Tensor, aten.sub.Tensor}

#: ``bw_gm.meta`` key: whether the backward ran a custom autograd.Function's backward
CUSTOM_BACKWARD_META = "aotgrad_custom_backward"
#: ``bw_gm.meta`` key: its AutogradReach, when it did
REACH_META = "aotgrad_autograd_reach"
#: ``bw_gm.meta`` key: one of them is dynamo's (``custom_backwards``)
DYNAMO_FUNCTION_META = "aotgrad_dynamo_function"


def custom_backwards(outputs) -> tuple[bool, bool]:
    """Whether the autograd graph of ``outputs`` holds a custom
    ``autograd.Function`` node (Note [Missing tangents]), and whether one is
    dynamo's ``autograd_function_apply``: its backward is a graph dynamo
    traced with grad mode off, so the gradients it gives are not
    differentiable (Note [Higher-order backward] refuses them)."""
    custom = graph_only = False
    for fn in _torch.autograd_nodes([t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]):
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            custom = True
            cls = getattr(fn, "_forward_cls", None)
            graph_only = graph_only or "AutogradFunctionApply" in getattr(cls, "__qualname__", "")
    return custom, graph_only

_ZERO, _KEEP = "zero", "keep"


def _tangent_index(n: fx.Node) -> int | None:
    desc = n.meta.get(DESC)
    return desc.index if isinstance(desc, Tangent) else None


def _is_tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def _linear(n: fx.Node) -> bool:
    """Whether ``n`` may be taken as linear in the tangents it reads (Note
    [Missing tangents]: a backward is): a functional ATen op whose outputs
    are floating tensors."""
    target = n.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return bool(vals) and all(isinstance(v, torch.Tensor) and
                              (v.is_floating_point() or v.is_complex()) for v in vals)


def _rule(n: fx.Node, zero: set, side: set, custom: bool = False) -> tuple[Any, bool]:
    """What zero inputs (``zero``, on the tangents' ``side``) make of ``n``:
    ``_ZERO``, ``_KEEP`` or an input that stands for it; and whether the
    zeros meet another tensor (the value then depends on the specialisation).
    ``custom``: a custom backward may add a gradient that reads no tangent
    (Note [Tangents that reach no custom backward]), so a sum is zero only
    when all its terms are."""
    if n.target is operator.getitem:
        return (_ZERO, False) if n.args[0] in zero else (_KEEP, False)
    inputs = n.all_input_nodes
    summed = custom and n.target in _ADDITIVE and any(
        _is_tensor(a) and a not in zero for a in n.args[:2])
    if not summed and all(a in zero for a in inputs if a in side) and _linear(n):
        return _ZERO, any(_is_tensor(a) and a not in zero for a in inputs)
    if n.target in _ADDITIVE and len(n.args) >= 2:
        a, b = n.args[0], n.args[1]
        if b in zero and isinstance(a, fx.Node) and _same_meta(n, a):
            return a, False
        if a in zero and n.target is aten.add.Tensor and isinstance(b, fx.Node) and \
                n.kwargs.get("alpha", 1) == 1 and _same_meta(n, b):
            return b, False
    return _KEEP, False


def _tangent_side(graph: fx.Graph) -> set:
    """The nodes that read a tangent, directly or not."""
    return descendants(n for n in graph.find_nodes(op="placeholder")
                       if _tangent_index(n) is not None)


def _same_meta(n: fx.Node, other: fx.Node) -> bool:
    """Whether ``other`` may stand for ``n``: the same sizes, strides, dtype
    and device (symbolic sizes compared as expressions: no guard is added)."""
    a, b = n.meta.get("val"), other.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
        a.dtype == b.dtype and a.device == b.device and \
        _same_ints(a.shape, b.shape) and _same_ints(a.stride(), b.stride())


def _same_ints(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x == y if isinstance(x, int) and isinstance(y, int) else str(x) == str(y)
        for x, y in zip(xs, ys))


#: ops whose value is zero when their tangent-side inputs are (first argument
#: only, for ``div``); in a program with a custom backward, a zero through any
#: other op may differ from the symbolic one (``ones_like(g)``, ``g.cos()``)
_ZERO_PRESERVING = {aten.mul.Tensor, aten.mul.Scalar, aten.neg.default, aten.mm.default,
                    aten.bmm.default, aten.sum.default, aten.sum.dim_IntList, aten.mean.dim,
                    aten.clone.default, aten._to_copy.default, aten.cat.default,
                    aten.stack.default, aten.add.Tensor, aten.sub.Tensor}


def _keeps_zero(n: fx.Node, zero: set) -> bool:
    """Whether ``n`` is zero where its ``zero`` inputs are, as computed."""
    target = n.target
    if target is operator.getitem or is_view_op(target):
        return True
    if target in (aten.div.Tensor, aten.div.Scalar):
        return n.args[0] in zero and not (len(n.args) > 1 and n.args[1] in zero)
    if target in (aten.add.Tensor, aten.sub.Tensor):
        return all(isinstance(a, fx.Node) for a in n.args[:2])   # no scalar added
    return target in _ZERO_PRESERVING or (
        isinstance(target, torch._ops.OpOverload) and
        target._schema.name.endswith("_backward") and bool(n.args) and n.args[0] in zero)


def absorbing_tangents(bw_gm: fx.GraphModule, custom: bool = False) -> frozenset[int]:
    """Note [Missing tangents]: the tangents whose zeros meet another value
    (``custom``: or go through an op that may not keep them zero: Note
    [Tangents that reach no custom backward]).  One pass: per node, the
    tangents that make it zero when missing alone."""
    graph = bw_gm.graph
    side = _tangent_side(graph)
    zero_when: dict[fx.Node, frozenset[int]] = {}
    absorbing: set[int] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            j = _tangent_index(n)
            if j is not None:
                zero_when[n] = frozenset((j,))
            continue
        if n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        candidates = frozenset().union(*(zero_when.get(a, frozenset()) for a in inputs))
        made = []
        for j in candidates:
            zero = {a for a in inputs if j in zero_when.get(a, ())}
            kind, meets = _rule(n, zero, side, custom)
            if meets or (custom and kind is _ZERO and not _keeps_zero(n, zero)):
                absorbing.add(j)
            if kind is _ZERO:
                made.append(j)
        if made:
            zero_when[n] = frozenset(made)
    return frozenset(absorbing)


def without(bw_gm: fx.GraphModule, missing: frozenset[int],
            whole: bool = False, custom: bool = False) -> fx.GraphModule | None:
    """Note [Missing tangents]: the backward graph with the ``missing`` tangents
    absent (None where no graph can be made: a zero to materialise is not
    strided).  ``whole``: a gradient that is all zero is returned as zeros,
    not None -- a tensor subclass's gradient is rebuilt from all its plain
    tensors (Note [Gradients that eager leaves None] then says which are None).
    ``custom``: the program has a custom backward (``_rule``)."""
    graph = fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(bw_gm.graph, env))
    side = _tangent_side(graph)
    zero: set = set()
    for n in list(graph.nodes):
        if n.op == "placeholder":
            if _tangent_index(n) in missing:
                zero.add(n)
            continue
        zeros_in = [a for a in n.all_input_nodes if a in zero]
        if not zeros_in:
            continue
        if n.op == "output":
            if whole:
                made = {a: _zeros_like(graph, n, a) for a in zeros_in}
                if None in made.values():
                    return None
                n.args = (fx.node.map_arg(n.args[0], lambda a: made.get(a, a)),)
            else:
                n.args = (fx.node.map_arg(n.args[0], lambda a: None if a in zero else a),)
            continue
        kind, _ = _rule(n, zero, side, custom)
        if kind is _ZERO:
            zero.add(n)
        elif isinstance(kind, fx.Node):
            n.replace_all_uses_with(kind)
        else:   # materialise the zeros it reads
            made = {}
            for a in zeros_in:
                z = _zeros_like(graph, n, a)
                if z is None:
                    return None
                made[a] = z
            n.args = fx.node.map_arg(n.args, lambda a: made.get(a, a))
            n.kwargs = fx.node.map_arg(n.kwargs, lambda a: made.get(a, a))
    graph.eliminate_dead_code()
    graph.lint()
    gm = fx.GraphModule(bw_gm, graph)
    gm.meta.update({k: v for k, v in bw_gm.meta.items()
                    if k != _torch.DONATED_INPUTS_META})
    return gm


def _zeros_like(graph: fx.Graph, before: fx.Node, like: fx.Node) -> fx.Node | None:
    """Zeros of ``like``'s sizes, dtype and device (contiguous), before
    ``before``: ``full``, which every backend lowers (inductor decomposes
    ``zeros``, and refuses it in a graph given to it); a symbolic size is
    read off ``like`` as the graph computes it (its values, perhaps nan, are
    not read)."""
    if like.op == "placeholder":
        return like    # the runtime passes zeros for it
    val = like.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.layout != torch.strided:
        return None
    with graph.inserting_before(before):
        sizes = []
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                sizes.append(size)
                continue
            sizes.append(graph.call_function(aten.sym_size.int, (like, d)))
            sizes[-1].meta["val"] = size
        z = graph.call_function(aten.full.default, (sizes, 0),
                                {"dtype": val.dtype, "device": val.device})
    z.meta["val"] = val.new_empty(val.shape)
    return z


class MissingTangents:
    """Per missing set, the backward to call (Note [Missing tangents])."""

    def __init__(self, absorbing: frozenset[int],
                 make: Callable[[frozenset[int], bool], Callable | None]):
        self.absorbing = absorbing
        self._make = make
        self._made: dict[tuple, Callable] = {}

    def __call__(self, missing: tuple, backward: Callable, whole: bool = False) -> Callable:
        """The backward for ``missing`` (``backward``: the one otherwise called;
        ``whole``: see ``without``)."""
        if not self.absorbing.intersection(missing):
            return backward
        made = self._made.get((missing, whole))
        if made is None:
            made = self._made[missing, whole] = \
                self._make(frozenset(missing), whole) or backward
        return made


# Note [Gradients that eager leaves None]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Eager leaves a gradient None when no gradient reaches it: autograd runs
# the nodes reachable from the outputs that have a gradient, a built-in
# formula whose incoming gradients are all absent gives absent gradients, and
# a custom Function's backward, once its node runs, gives what it returns --
# tensors, even where it was handed zeros for an absent gradient
# (``materialize_grads``).  The compiled backward computes all of them (from
# zeros, or symbolic zeros), so the runtime returns None for those eager
# leaves None:
#
# * no custom Function's backward in the program: the backward is linear in
#   its tangents, so a gradient that reads tangents, all missing, is one of
#   them.  A gradient that reads no tangent at all cannot come from such a
#   backward; it is kept as computed.
# * a custom Function's backward in the program: it may return values that
#   read no tangent (a mixture-of-experts auxiliary loss's backward returns
#   ``ones``) or zeros made from a missing tangent (``return g0`` for an input
#   of an unused output: eager's gradient is zeros, not None), so the values
#   cannot tell.  The trace keeps the shape of the autograd graph it
#   differentiated (``AutogradReach``: its nodes, which are custom, their
#   edges, the gradient edges ``autograd.grad`` captures -- a non-leaf
#   input's too -- and, from a hook on each custom node during the trace's
#   backward, the inputs its backward returns None for); per missing set the
#   runtime replays on it which nodes run and which edges carry a gradient,
#   as the engine does.  (A graph loaded from the disk cache has no such
#   record: its gradients are kept as computed.)  What a custom node that
#   eager would not run adds to a gradient that is there from a missing
#   tangent is taken back by the missing set's specialisation, what it adds
#   from no tangent is not: Note [Tangents that reach no custom backward].


@dataclass(frozen=True)
class AutogradReach:
    """Note [Gradients that eager leaves None]: the traced autograd graph's
    shape.  Edge targets are node indices, or ``-1 - m`` for the m-th input
    differentiated; ``order``: each node after every node with an edge to it."""
    custom: tuple[bool, ...]
    edges: tuple[tuple[int, ...], ...]
    roots: tuple[tuple[int, ...], ...]     # per (plain) tangent
    order: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]  # per input differentiated, its backward outputs

    def left_none(self, missing: frozenset[int]) -> frozenset[int]:
        given = [r for j, rs in enumerate(self.roots) if j not in missing for r in rs]
        ran = self._ran(missing)
        reached = {r for r in given if r >= 0}     # nodes given a gradient
        inputs = {-1 - r for r in given if r < 0}  # inputs given a gradient
        for k in self.order:
            if k in ran and (self.custom[k] or k in reached):
                for e in self.edges[k]:
                    if e >= 0:
                        reached.add(e)
                    else:
                        inputs.add(-1 - e)
        return frozenset(p for m, ps in enumerate(self.positions) if m not in inputs
                         for p in ps)

    def _ran(self, missing: frozenset[int]) -> set[int]:
        """The nodes the engine runs: those reached from a given root."""
        ran, stack = set(), [r for j, rs in enumerate(self.roots) if j not in missing
                             for r in rs if r >= 0]
        while stack:
            k = stack.pop()
            if k not in ran:
                ran.add(k)
                stack.extend(e for e in self.edges[k] if e >= 0)
        return ran

    def symbolic(self, missing: frozenset[int]) -> frozenset[int]:
        """Note [Tangents that reach no custom backward]: the ``missing``
        tangents whose roots reach no custom node that runs."""
        ran = self._ran(missing)
        out = set()
        for j in missing:
            seen, stack = set(), [r for r in self.roots[j] if r >= 0]
            while stack:
                k = stack.pop()
                if k in seen:
                    continue
                seen.add(k)
                if self.custom[k] and k in ran:
                    break
                stack.extend(e for e in self.edges[k] if e >= 0)
            else:
                out.add(j)
        return frozenset(out)


class ReachRecorder:
    """Note [Gradients that eager leaves None]: the AutogradReach of
    ``outputs``' autograd graph, differentiated with respect to ``wrt``.  Made
    before the trace's ``autograd.grad`` runs: a hook on each custom node
    records which of its inputs its backward returns None for (no gradient
    flows there); ``finish`` after it."""

    def __init__(self, outputs: list, wrt: list):
        sinks: dict[tuple[int, int], int] = {}   # (node, output) autograd.grad captures
        self._kept = []                          # what the ids stand for
        for m, t in enumerate(wrt):
            edge = torch.autograd.graph.get_gradient_edge(t)
            self._kept.append(edge.node)
            sinks[id(edge.node), edge.output_nr] = m
        leaves = {id(t): m for m, t in enumerate(wrt) if t.is_leaf}
        index: dict[int, int] = {}
        nodes: list = []
        edges: list[list[tuple[int, int]]] = []   # per node: (position, target)

        def target(fn, nr: int) -> int | None:
            if fn is None:
                return None
            m = sinks.get((id(fn), nr))
            if m is None and _torch.is_leaf_accumulator(fn):
                m = leaves.get(id(fn.variable))
                if m is None:
                    return None
            if m is not None:
                return -1 - m
            k = index.get(id(fn))
            if k is None:
                k = index[id(fn)] = len(nodes)
                nodes.append(fn)
                edges.append([])
            return k

        self.roots = []
        for t in outputs:
            if not isinstance(t, torch.Tensor) or not t.requires_grad:
                self.roots.append(())
                continue
            edge = torch.autograd.graph.get_gradient_edge(t)
            r = target(edge.node, edge.output_nr)
            self.roots.append(() if r is None else (r,))
        k = 0
        while k < len(nodes):                  # nodes are numbered as found
            for i, (fn, nr) in enumerate(nodes[k].next_functions):
                e = target(fn, nr)
                if e is not None:
                    edges[k].append((i, e))
            k += 1
        self.custom = [isinstance(fn, torch.autograd.function.BackwardCFunction)
                       for fn in nodes]
        self.edges = edges
        self.returned_none: dict[int, tuple[bool, ...]] = {}
        self._hooks = [fn.register_hook(functools.partial(self._record, k))
                       for k, fn in enumerate(nodes) if self.custom[k]]
        self._kept.extend(nodes)

    def _record(self, k: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
        self.returned_none[k] = tuple(g is None for g in grad_inputs)

    def finish(self, positions: list, tangents: list[int] | None = None) -> AutogradReach:
        """The AutogradReach; ``positions``: per input of ``wrt``, its backward
        outputs; ``tangents``: per output, how many plain tangents it has (a
        tensor subclass's: one per plain tensor; the runtime's missing sets
        count those)."""
        for h in self._hooks:
            h.remove()
        edges = []
        for k, es in enumerate(self.edges):   # a custom backward's None carries nothing
            none = self.returned_none.get(k, ())
            edges.append(tuple(e for i, e in es if not (i < len(none) and none[i])))
        # each node after those with an edge to it: reversed post-order
        order, done = [], set()
        for start in range(len(edges)):
            if start in done:
                continue
            stack = [(start, False)]
            while stack:
                k, expanded = stack.pop()
                if expanded:
                    order.append(k)
                    continue
                if k in done:
                    continue
                done.add(k)
                stack.append((k, True))
                stack.extend((e, False) for e in edges[k] if e >= 0 and e not in done)
        order.reverse()
        self._kept.clear()
        roots = self.roots if tangents is None else \
            [r for r, count in zip(self.roots, tangents) for _ in range(count)]
        return AutogradReach(tuple(self.custom), tuple(edges), tuple(roots), tuple(order),
                             tuple(map(tuple, positions)))


def _tangent_deps(bw_gm: fx.GraphModule) -> tuple[frozenset[int], ...]:
    """Per backward output, the tangents (by index) it reads."""
    deps: dict[fx.Node, frozenset[int]] = {}
    for n in bw_gm.graph.nodes:
        j = _tangent_index(n) if n.op == "placeholder" else None
        deps[n] = frozenset((j,)) if j is not None else \
            frozenset().union(*(deps.get(a, frozenset()) for a in n.all_input_nodes))
    return tuple(deps[o] if isinstance(o, fx.Node) else frozenset()
                 for o in bw_gm.graph.output_node().args[0])


class GradientsLeftNone:
    """Note [Gradients that eager leaves None]: per missing set (a tuple of
    tangent indices), the backward outputs that are None."""

    def __init__(self, bw_gm: fx.GraphModule):
        custom = bw_gm.meta.get(CUSTOM_BACKWARD_META, True)
        self._reach = bw_gm.meta.get(REACH_META) if custom else None
        self._custom = custom
        self._deps = None if custom else _tangent_deps(bw_gm)
        self._known: dict[tuple, frozenset[int]] = {}

    def __call__(self, missing: tuple) -> frozenset[int]:
        none = self._known.get(missing)
        if none is None:
            gone = frozenset(missing)
            if not self._custom:
                none = frozenset(k for k, d in enumerate(self._deps) if d and d <= gone)
            elif self._reach is not None:
                none = self._reach.left_none(gone)
            else:   # a graph from the disk cache: kept as computed
                none = frozenset()
            self._known[missing] = none
        return none
