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
node in the traced autograd graph: ``has_custom_backward``, which also counts
higher-order ops built on one) is not specialised: the runtime's zeros are
what eager passes such a backward (``CUSTOM_BACKWARD_META`` on the backward
graph, set by the trace; absent, e.g. a graph loaded from the cache that may
hold such a Function, it counts as set).
"""

from __future__ import annotations

import operator
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


def has_custom_backward(outputs) -> bool:
    """Whether the autograd graph of ``outputs`` holds a custom
    ``autograd.Function`` node (Note [Missing tangents])."""
    return any(isinstance(fn, torch.autograd.function.BackwardCFunction) for fn in
               _torch.autograd_nodes([t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]))

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


def _rule(n: fx.Node, zero: set, side: set) -> tuple[Any, bool]:
    """What zero inputs (``zero``, on the tangents' ``side``) make of ``n``:
    ``_ZERO``, ``_KEEP`` or an input that stands for it; and whether the
    zeros meet another tensor (the value then depends on the specialisation)."""
    if n.target is operator.getitem:
        return (_ZERO, False) if n.args[0] in zero else (_KEEP, False)
    inputs = n.all_input_nodes
    if all(a in zero for a in inputs if a in side) and _linear(n):
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


def absorbing_tangents(bw_gm: fx.GraphModule) -> frozenset[int]:
    """Note [Missing tangents]: the tangents whose zeros meet another value.
    One pass: per node, the tangents that make it zero when missing alone."""
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
            kind, meets = _rule(n, {a for a in inputs if j in zero_when.get(a, ())}, side)
            if meets:
                absorbing.add(j)
            if kind is _ZERO:
                made.append(j)
        if made:
            zero_when[n] = frozenset(made)
    return frozenset(absorbing)


def without(bw_gm: fx.GraphModule, missing: frozenset[int]) -> fx.GraphModule | None:
    """Note [Missing tangents]: the backward graph with the ``missing`` tangents
    absent (None where no graph can be made: a zero to materialise is not
    strided)."""
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
            n.args = (fx.node.map_arg(n.args[0], lambda a: None if a in zero else a),)
            continue
        kind, _ = _rule(n, zero, side)
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
                 make: Callable[[frozenset[int]], Callable | None]):
        self.absorbing = absorbing
        self._make = make
        self._made: dict[tuple, Callable] = {}

    def __call__(self, missing: tuple, backward: Callable) -> Callable:
        """The backward for ``missing`` (``backward``: the one otherwise called)."""
        if not self.absorbing.intersection(missing):
            return backward
        made = self._made.get(missing)
        if made is None:
            made = self._made[missing] = self._make(frozenset(missing)) or backward
        return made


# Note [Gradients that eager leaves None]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Eager leaves a gradient None when no gradient reaches it: every path to it
# starts at an output autograd gave no gradient for.  The compiled backward
# computes all of them (from zeros, or symbolic zeros), so the runtime returns
# None for those it can tell are made from the missing tangents alone:
#
# * no custom Function's backward in the program: the backward is linear in
#   its tangents, so a gradient that reads tangents, all missing, is one of
#   them.  A gradient that reads no tangent at all cannot come from such a
#   backward; it is kept as computed.
# * a custom Function's backward may add values that read no tangent (a
#   mixture-of-experts auxiliary loss's backward returns ``ones`` for the
#   loss, whatever the gradient): eager runs it, with zeros for the missing
#   tangents (``materialize_grads``), whenever autograd reaches its node, and
#   what it adds reaches the inputs.  Reading a missing tangent is then not
#   enough: a gradient is None only where a pass that knows which ops keep a
#   zero a zero (products, views, sums, additions of zeros, the ``*_backward``
#   formulas in their gradient argument) proves it zero; any other op of a
#   zero (``cos``, ``x + 1``, a constant added) makes a value that is kept.


def _tangent_deps(bw_gm: fx.GraphModule) -> tuple[frozenset[int], ...]:
    """Per backward output, the tangents (by index) it reads."""
    deps: dict[fx.Node, frozenset[int]] = {}
    for n in bw_gm.graph.nodes:
        j = _tangent_index(n) if n.op == "placeholder" else None
        deps[n] = frozenset((j,)) if j is not None else \
            frozenset().union(*(deps.get(a, frozenset()) for a in n.all_input_nodes))
    return tuple(deps[o] if isinstance(o, fx.Node) else frozenset()
                 for o in bw_gm.graph.output_node().args[0])


_SUMS = {aten.sum.default, aten.sum.dim_IntList, aten.mean.dim, aten.neg.default,
         aten.clone.default, aten._to_copy.default, aten.repeat.default}
_PRODUCTS = {aten.mul.Tensor, aten.mm.default, aten.bmm.default, aten.matmul.default,
             aten.mul.Scalar, aten.div.Scalar}


def _stays_zero(n: fx.Node, zero: set, side: set) -> bool:
    """Note [Gradients that eager leaves None]: whether ``n`` is zero when
    its inputs in ``zero`` are (its other tangent-side inputs not proven
    zero), by ops known to keep a zero a zero."""
    target = n.target
    if target is operator.getitem:
        return n.args[0] in zero
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    first = n.args[0] if n.args else None
    tensors = [a for a in n.args if isinstance(a, fx.Node)]
    if target in _PRODUCTS:
        return any(a in zero for a in tensors)
    if target is aten.div.Tensor or target in _SUMS or is_view_op(target):
        return first in zero
    if target in _ADDITIVE:
        return bool(tensors) and all(a in zero for a in tensors) and len(tensors) == 2
    if target._schema.name.endswith("_backward"):   # linear in its gradient argument
        return first in zero and all(a in zero for a in n.all_input_nodes if a in side)
    return False


def _proven_zero(bw_gm: fx.GraphModule, missing: frozenset[int]) -> frozenset[int]:
    graph = bw_gm.graph
    side = _tangent_side(graph)
    zero: set = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if _tangent_index(n) in missing:
                zero.add(n)
        elif n.op == "call_function" and any(a in zero for a in n.all_input_nodes) and \
                _stays_zero(n, zero, side):
            zero.add(n)
    return frozenset(k for k, o in enumerate(graph.output_node().args[0]) if o in zero)


class GradientsLeftNone:
    """Note [Gradients that eager leaves None]: per missing set (a tuple of
    tangent indices), the backward outputs that are None."""

    def __init__(self, bw_gm: fx.GraphModule):
        self._custom = bw_gm.meta.get(CUSTOM_BACKWARD_META, True)
        self._graph = bw_gm if self._custom else None
        self._deps = None if self._custom else _tangent_deps(bw_gm)
        self._known: dict[tuple, frozenset[int]] = {}

    def __call__(self, missing: tuple) -> frozenset[int]:
        none = self._known.get(missing)
        if none is None:
            gone = frozenset(missing)
            if self._custom:
                none = _proven_zero(self._graph, gone)
            else:
                none = frozenset(k for k, d in enumerate(self._deps) if d and d <= gone)
            self._known[missing] = none
        return none
