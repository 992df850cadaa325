"""Effect tokens: how the graphs aotgrad hands out order their effects.

Note [Effect tokens in export]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
aotgrad's own graphs (the joint, the partitioned ones before compilation)
record an effectful op as the op itself (Note [Effect tokens], record.py).
Graphs that leave aotgrad -- exported ones, and the ones its compilers get
(Note [Effect tokens in compiled graphs]) -- order effects by data
dependence, as PyTorch's do: each effectful op becomes
``with_effects(token, op, *args)``, which returns the next token and the
op's results, so the effects form one chain::

    _print = torch.ops.aten._print.default('hello')      # aotgrad's graph

becomes, with the token lifted (``config.unlift_effect_tokens=False``, the
default), a graph input before every other and a graph output before every
other (``GraphSignature.input_tokens`` / ``output_tokens`` name them)::

    def forward(self, arg0_1, arg1_1):
        with_effects = torch.ops.higher_order.with_effects(arg0_1, torch.ops.aten._print.default, 'hello')
        getitem = with_effects[0]
        ...
        return (getitem, ...)

or, unlifted (``unlift_effect_tokens=True``), made and consumed in the
graph, the calling convention unchanged::

    _make_token_default = torch.ops.prims._make_token.default()
    with_effects = torch.ops.higher_order.with_effects(_make_token_default, ...)
    getitem = with_effects[0]
    ...
    _sink_tokens_default = torch.ops.prims._sink_tokens.default([getitem])

Either way the other inputs are numbered as if the token were the first
(``arg1_1 ...``), as torch's are.  One token: torch 2.13 has one kind of
effect (ordered).  The effectful op may be a higher-order one
(``torch._higher_order_ops.print``, ``invoke_leaf_function`` of
``torch._dynamo.decorators.leaf_function``): in aotgrad's graphs it is a
node of its own whose value is what the operator returns (None or a tuple),
in the chain ``with_effects(token, torch.ops.higher_order.print, ...)``.

Note [Effect tokens in compiled graphs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A compiler may reorder what has no data dependence: inductor's scheduler
orders its kernels by their buffers, and two effects that read nothing of
each other (two prints) have none.  Its lowering of ``with_effects`` chains
the effects of one kind (each kernel depends on the one before), which is
why torch hands inductor graphs with tokens.  So each graph aotgrad compiles
-- forward, backward, inference -- reaches its compiler with its effects
chained through a token made in the graph (``_make_token`` ...
``_sink_tokens``, the unlifted form above: torch's, for inductor), so that
the calling convention of Note [Calling convention] stays as it is.
(torch's aot_eager lifts the tokens to graph inputs and outputs instead, and
its runtime passes None for them: the same chain, one more input and output
per graph.)  The compiler gets a threaded copy (``threading``): the graphs
the runtime is built from, the partitioned ones, keep the ops themselves,
so that the analyses of their outputs (which tangents a gradient reads, the
views to replay) do not see the token's dependences, which are no data.

Note [Effects in the backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An effect the backward runs -- a custom autograd.Function's backward that
prints, an effectful custom op whose derivative calls another -- must run
in the backward graph, once per backward, after the forward's effects.  A
partitioner that places nodes by what they read puts an effect that reads
no tangent (``_print("in backward")``) in the forward, and drops one that
no gradient needs.  The joint trace marks the effects recorded while
autograd traced the backward (``backward_effects_marked``: the node meta
``BACKWARD_EFFECT``, as torch's joint trace tags nodes "is_backward"); the
partitioners run them, and what they need, in the backward.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _torch
from .descriptors import DESC, EffectToken

#: ``node.meta`` key: an effect recorded while the backward was traced
#: (Note [Effects in the backward])
BACKWARD_EFFECT = "aotgrad_backward_effect"


def _is_effect_target(target: Any) -> bool:
    return isinstance(target, (_torch.OpOverload, _torch.HigherOrderOperator)) and \
        target is not torch.ops.higher_order.with_effects and _torch.has_effects(target)


def is_effect(n: fx.Node) -> bool:
    return n.op == "call_function" and _is_effect_target(n.target)


def effects_of(graph: fx.Graph) -> list[fx.Node]:
    """The effectful op nodes of ``graph`` (recorded as the ops themselves), in
    order; the effect tables are read once per target."""
    verdicts: dict[Any, bool] = {}
    found = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        target = n.target
        try:
            effect = verdicts.get(target)
        except TypeError:  # an unhashable target
            effect = None
        if effect is None:
            effect = _is_effect_target(target)
            try:
                verdicts[target] = effect
            except TypeError:
                pass
        if effect:
            found.append(n)
    return found


def has_effects(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` runs an effectful op (recorded as the op itself)."""
    return bool(effects_of(gm.graph))


def _returns_tuple(op: Any, results: Sequence) -> bool:
    """Whether ``op(*args)`` returns a tuple (of ``results``, what
    ``with_effects`` returns after the token) rather than one value (or None)."""
    if isinstance(op, _torch.OpOverload):
        return len(op._schema.returns) > 1
    if op.name() == "call_torchbind":  # a method's schema: only the object knows it
        raise NotImplementedError(
            "aotgrad: a method of a TorchScript object called with an effect (call_torchbind) "
            "is not supported in the graphs aotgrad traces. Call the method outside the "
            "compiled function, or wrap it in a torch.library.custom_op registered with an "
            "effect.")
    # the effectful higher-order ops (print, invoke_leaf_function) return None or a tuple
    return not (len(results) == 1 and results[0] is None)


def _results(n: fx.Node) -> tuple:
    """The values ``with_effects`` returns after the token, for the plain
    effect node ``n`` (one per result of the op; one, None, when it has none)."""
    op, val = n.target, n.meta.get("val")
    if isinstance(op, _torch.OpOverload):
        k = len(op._schema.returns)
        return (None,) if k == 0 else (val,) if k == 1 else tuple(val or (None,) * k)
    return tuple(val) if isinstance(val, (tuple, list)) else (val,)


def token_value(gm: fx.GraphModule):
    """A fake empty tensor in ``gm``'s fake mode, the value of a token (as torch's)."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    mode = _torch.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return None if mode is None else mode.from_tensor(torch.empty(0))


class Chain:
    """Note [Effect tokens in export]: one token through the effectful ops of
    a graph being built, in the order they are copied into it (so that the
    nodes are named in the order a trace names them).  ``lifted``: the token
    is a placeholder ``name`` (made first: before the other placeholders)
    and the first output; else it is made after the placeholders
    (``begin``) and sunk before the output (``end``)."""

    def __init__(self, graph: fx.Graph, *, lifted: bool, name: str, val=None):
        self.graph, self.lifted, self.val = graph, lifted, val
        self.token: fx.Node | None = None
        if lifted:
            self.token = graph.placeholder(name)
            self.token.meta[DESC] = EffectToken(0)
            self._set_val(self.token, val)

    @staticmethod
    def _set_val(node: fx.Node, val) -> None:
        if val is not None:
            node.meta["val"] = val

    def begin(self) -> None:
        if not self.lifted:
            self.token = self.graph.call_function(torch.ops.prims._make_token.default, ())
            self._set_val(self.token, self.val)

    def effect(self, n: fx.Node, args: tuple, kwargs: dict) -> list[fx.Node]:
        """``n`` (``op(*args)``, its arguments already in the new graph) as
        ``with_effects(token, op, *args)``: the nodes of its results (one per
        result of the op; one, for None, when it has none), as torch's trace
        makes them.  Those nobody reads are swept by dead-code elimination."""
        op = n.target
        graph = self.graph
        node = graph.call_function(torch.ops.higher_order.with_effects,
                                   (self.token, op, *args), kwargs)
        node.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        results = _results(n)
        node.meta["val"] = (self.val, *results)
        items = [graph.call_function(operator.getitem, (node, k))
                 for k in range(1 + len(results))]
        self._set_val(items[0], self.val)
        for item, r in zip(items[1:], results):
            self._set_val(item, r)
        self.token = items[0]
        return items[1:]

    def end(self, values: list) -> list:
        """The graph's output values, the token first when lifted."""
        if self.lifted:
            return [self.token, *values]
        self.graph.call_function(torch.ops.prims._sink_tokens.default, ([self.token],))
        return values


def returns_tuple(n: fx.Node) -> bool:
    """Whether the plain effect node ``n``'s value is a tuple its users index."""
    return _returns_tuple(n.target, _results(n))


def thread(gm: fx.GraphModule) -> bool:
    """Note [Effect tokens in compiled graphs]: the effectful ops of ``gm``
    chained, in place, through a token made in the graph (unlifted)::

        _print = torch.ops.aten._print.default('hello')
        sin = torch.ops.aten.sin.default(primals_1)

    becomes::

        _make_token_default = torch.ops.prims._make_token.default()
        with_effects = torch.ops.higher_order.with_effects(_make_token_default, torch.ops.aten._print.default, 'hello')
        getitem = with_effects[0]
        sin = torch.ops.aten.sin.default(primals_1)
        ...
        _sink_tokens_default = torch.ops.prims._sink_tokens.default([getitem])

    Returns whether the graph had effects."""
    graph = gm.graph
    effects = effects_of(graph)
    if not effects:
        return False
    chain = Chain(graph, lifted=False, name="", val=token_value(gm))
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        chain.begin()
    for n in effects:
        as_tuple = returns_tuple(n)
        with graph.inserting_before(n):
            items = chain.effect(n, n.args, n.kwargs)
        if as_tuple:
            for user in list(n.users):
                if user.target is not operator.getitem:
                    raise AssertionError(f"aotgrad: the results of {n.format_node()} are read "
                                         f"by {user.format_node()}, not indexed")
                user.replace_all_uses_with(items[user.args[1]])
                graph.erase_node(user)
        else:
            n.replace_all_uses_with(items[0])
        graph.erase_node(n)
        for item in items:
            if not item.users:
                graph.erase_node(item)
    with graph.inserting_before(graph.output_node()):
        chain.end([])
    gm.recompile()
    return True


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph, gm.__class__.__name__)
    new.meta.update(gm.meta)
    return new


def threading(compiler: Callable) -> Callable:
    """``compiler``, given a copy of each graph with effects chained through a
    token (Note [Effect tokens in compiled graphs]); graphs without effects
    reach it as they are.  ``__wrapped__`` is ``compiler`` (which is how
    aotgrad recognises ``nop`` behind a wrapper)."""
    @functools.wraps(compiler)
    def compile_threaded(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if effects_of(gm.graph):
            gm = _copy(gm)
            thread(gm)
        return compiler(gm, example_inputs)

    return compile_threaded


@contextlib.contextmanager
def backward_effects_marked():
    """Note [Effects in the backward]: the effects recorded into the graph
    being traced while in this context (the backward of a joint trace) are
    marked ``BACKWARD_EFFECT``."""
    graph = _torch.current_trace_graph()
    start = len(graph.nodes) if graph is not None else 0
    try:
        yield
    finally:
        if graph is not None:
            for n in itertools.islice(graph.nodes, start, None):
                if is_effect(n) or (n.op == "call_function" and
                                    n.target is torch.ops.higher_order.with_effects):
                    n.meta[BACKWARD_EFFECT] = True


def inline_node(graph: fx.Graph, n: fx.Node, dead: set[fx.Node]) -> fx.Node:
    """``with_effects(token, op, *args)`` (``n``, made by functionalization)
    as ``op(*args)``, inserted before it and returned: readers of its
    results read the new node (or its items, for an op of several results);
    ``n`` and the readers of the next token go into ``dead``, for the caller
    to erase."""
    _, op, *args = n.args
    val = n.meta.get("val")
    results = tuple(val[1:]) if isinstance(val, (list, tuple)) else (None,)
    as_tuple = _returns_tuple(op, results)
    with graph.inserting_before(n):
        name = graph._target_to_str(getattr(op, "overloadpacket", None) or op.name())
        new = _torch.add_node(graph, "call_function", op, tuple(args), dict(n.kwargs),
                              name=name)
    new.meta.update({k: v for k, v in n.meta.items() if k != "val"})
    if isinstance(val, (list, tuple)):
        new.meta["val"] = tuple(results) if as_tuple else results[0]
    for user in list(n.users):
        if user.target is not operator.getitem:
            raise AssertionError(f"aotgrad: an effect not made by functionalization: "
                                 f"{n.format_node()}")
        k = user.args[1]
        if k == 0:  # the next token: it only feeds later effects
            dead.add(user)
        elif not as_tuple:
            user.replace_all_uses_with(new)
            dead.add(user)
        else:
            user.args = (new, k - 1)
    dead.add(n)
    return new


def inline(gm: fx.GraphModule) -> None:
    """``with_effects(token, op, *args)`` nodes of a graph make_fx traced
    under functionalization become ``op(*args)`` (aotgrad's form, Note
    [Effect tokens], record.py), and the token functionalization made for
    the first one (a tensor constant, lifted and detached) goes::

        _tensor_constant0 = self._tensor_constant0
        lift_fresh_copy = torch.ops.aten.lift_fresh_copy.default(_tensor_constant0)
        detach_ = torch.ops.aten.detach_.default(lift_fresh_copy)
        with_effects = torch.ops.higher_order.with_effects(detach_, torch.ops.aten._print.default, 'hello')
        getitem = with_effects[0]

    becomes ``_print = torch.ops.aten._print.default('hello')``."""
    graph = gm.graph
    effects = graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    if not effects:
        return
    dead: set[fx.Node] = set()
    sources: list[fx.Node] = []
    for n in effects:
        token = n.args[0]
        if not isinstance(n.args[1], (_torch.OpOverload, _torch.HigherOrderOperator)):
            raise AssertionError(f"aotgrad: an effect not made by functionalization: "
                                 f"{n.format_node()}")
        if not (token.op == "call_function" and token.target is operator.getitem and
                token.args[0] in effects):
            sources.append(token)
        inline_node(graph, n, dead)
    for n in reversed(list(graph.nodes)):  # the token chain: only the chain reads it
        if n in dead:
            graph.erase_node(n)
    erased: set[fx.Node] = set()
    while sources:  # the first token and what made it, when nothing else reads them
        n = sources.pop()
        if n in erased or n.users or n.op == "placeholder":
            continue
        erased.add(n)
        inputs = n.all_input_nodes
        target = n.target if n.op == "get_attr" else None
        graph.erase_node(n)
        if target is not None and not graph.find_nodes(op="get_attr", target=target) and \
                hasattr(gm, target):
            delattr(gm, target)
        sources.extend(inputs)
    gm.recompile()
