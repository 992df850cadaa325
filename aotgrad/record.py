"""The tracer: records the ATen ops a function runs into an ``fx.Graph``.

Note [A light tracer]
~~~~~~~~~~~~~~~~~~~~~
``record`` does what ``make_fx(fn, decomposition_table)(*args)`` does for a
program over fake tensors with static shapes, at a fraction of its cost: one
dispatch mode appends one node per op.  It takes make_fx's own slot (an infra
mode under the PROXY key): below autograd, user modes and functionalization,
above the fake mode, so it sees the functional ATen ops.  (Or, for most
programs, with no functionalization above it: it then records the functional
variants of their mutations itself, Note [Functional already] in trace.py.)  Torch code that
looks for make_fx's mode finds this one and reads what it reads of make_fx's
tracer (``_Tracked``).  A tensor subclass among the arguments unwraps itself
first (the mode declines), as under make_fx.  Tensors are tracked by
identity: every tensor the trace sees is kept alive until it ends, so an
``id`` never stands for two tensors.  An in-place op's output is the tensor it
mutated, so later uses of that tensor read the new node, as under make_fx.

make_fx's generality costs more than the ops: pytree flattening of every
call, proxies, symbolic-size tracking, torch-function modes, tensor metadata
for every node.  8-layer transformer joint: the fake-tensor run alone takes
about 0.3 s, make_fx over it 0.7-0.9 s, this tracer 0.36 s.

What it does not handle it refuses by raising ``NeedsMakeFx``; the caller
then traces the program again with make_fx, which handles everything
(tracing has no effect but the graph; the counter
``aotgrad.traced_by_make_fx`` counts these):

* symbolic sizes (inputs with them, symbolic ints as inputs, or an op
  producing them: ``nonzero``),
* tensors the trace did not create and was not given: constants such as
  ``torch.tensor(2.0)`` (make_fx interns and constant-folds them),
* data-dependent ops (``item``, ``is_nonzero``), opaque objects,
* checkpoint regions (the tracer checks for one at every op; under make_fx
  ``policy.CheckpointRegionMarker`` marks them): selective checkpointing
  changes what it does when it finds make_fx's mode.

A refusal is remembered: a user ``except`` that swallows it cannot leave a
half-recorded graph.  It is raised once where it happens and again when the
run ends; ops in between run untraced (raising again from every op could
raise from where Python exceptions cannot pass: cleanup run by C++ while the
first one unwinds, as in a checkpoint region).

Decompositions apply as under make_fx: an op in the table runs its
decomposition, traced; a CompositeImplicitAutograd op that reaches the tracer
(autograd did not decompose it, as under ``no_grad`` for some ops) is
decomposed when the device has no kernel of its own.

Note [Effect tokens]
~~~~~~~~~~~~~~~~~~~
Functionalization orders ops with a side effect (``aten._print``, the error
check of linalg ops, ``aten._linalg_check_errors``, custom ops registered
with an effect) by threading a token through them: it runs
``with_effects(token, op, *args) -> (new token, *results)``, a higher-order
op.  The first time it meets an effect it makes the token itself, and under
a proxy mode it asks that mode's tracer for a graph input for it
(``create_proxy("placeholder", "tangents_token")``) that aotgrad's
signature does not have.  aotgrad's own passes do not reorder effects
(the partitioner keeps the order of the joint graph), so the tracer records
``op(*args)`` itself, where the effect happened: ``Node.is_impure`` is true
for it, so neither dead-code elimination nor the partitioner drops it (each
side runs its own effects: Note [Effects in the backward], tokens.py).  The
graphs that leave aotgrad get their tokens back (Note [Effect tokens in
compiled graphs], tokens.py).  Tokens are tracked by one node that is never
put in the graph and that no recorded node uses.  (A ``with_effects`` node would
not do: its token result is unused and fx deems the higher-order op pure,
so the joint graph's dead-code elimination dropped the error check.)  Other
higher-order ops go to make_fx (Note [Higher-order operators], hops.py).

Note [Straight to the fake mode]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Once the tracer has recorded an op it must run it on the fake tensors.
``func(*args)`` goes back through the dispatcher (and the Python dispatcher)
to reach the next mode on the stack, which is the fake mode: the tracer is
the lowest mode but one.  That trip is most of what a dispatch mode costs (a
passthrough mode over a fake forward+backward: +2.1 ms on the MLP, +6.9 ms on
the CNN; calling the fake mode directly: +0.3 / +0.2 ms).  So the tracer
calls the fake mode's ``dispatch`` itself, with the mode's slot unset as the
dispatcher leaves it (``_torch.fake_dispatcher``).  The dispatcher would do
something else only for an op with a rule of its own for the mode (a
``python_key_table`` entry, ``torch.library.register_torch_dispatch``): those
still take ``func(*args)``; so do all ops when the next mode is not the
tracer's fake mode (``fake_dispatcher`` checks at each call).
"""

from __future__ import annotations

import contextlib
import logging
import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from . import _torch, fakes, hops, node_meta, tokens


_log = logging.getLogger(__name__)


class NeedsMakeFx(Exception):
    """The program uses something the light tracer leaves to make_fx."""


class NotFunctional(Exception):
    """A trace without functionalization met an op that mutates or has an
    effect (Note [Functional already], trace.py): trace it functionalized."""


#: ``GraphModule.meta`` key: which tracer recorded the graph, and why (explain shows it)
TRACER_META = "aotgrad_tracer"
_HANDLED = frozenset((_torch.FakeTensor, torch.Tensor, torch.nn.Parameter))

_PLAIN_ARGS = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device,
                         torch.memory_format, torch.layout))

_SIZE_QUERIES = frozenset({_torch.aten.size.default, _torch.aten.stride.default,
                           _torch.aten.storage_offset.default})


class _Tracked:
    """What torch's code reads of a make_fx tracer: ``tracer.graph`` and
    ``tracer.tensor_tracker[t].proxy.node`` (Note [A light tracer]); and
    what functionalization asks of it for an effect token (Note [Effect
    tokens]): ``create_proxy`` and ``tensor_tracker[t] = ...``."""

    def __init__(self, node_of: dict[int, fx.Node], graph: fx.Graph):
        self.graph = graph
        self.tensor_tracker = self
        self.node_of = node_of
        self.enable_thunkify = False
        self.track: Callable[[torch.Tensor, fx.Node], None] | None = None
        self.recorder: "_Recorder | None" = None
        self.token = fx.Node(graph, "token", "call_function", _torch.aten._make_dep_token.default,
                             (), {})  # Note [Effect tokens]: never in the graph

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     name: str | None = None, *rest: Any, **more: Any) -> fx.Proxy:
        """Note [Effect tokens]: the one proxy torch's code makes itself under
        the tracer, for a token functionalization meets for the first time
        (``tangents_token``): a node outside the graph, which no recorded
        node uses."""
        if kind != "placeholder" or not str(target).endswith("token") or args or kwargs:
            self.recorder.refuse(f"a proxy made by torch's code ({kind} {target})")
        return fx.Proxy(self.token, self)

    def __setitem__(self, t: torch.Tensor, tracked: Any) -> None:
        self.track(t, tracked.proxy.node)

    def __getitem__(self, t: torch.Tensor) -> "_Entry":
        return _Entry(self.node_of[id(t)])

    def __contains__(self, t: object) -> bool:
        return id(t) in self.node_of

    def get(self, t: object, default: Any = None) -> Any:
        node = self.node_of.get(id(t))
        return default if node is None else _Entry(node)


class _Entry:
    def __init__(self, node: fx.Node):
        self.node = node
        self.proxy = self


class _Recorder(_torch.ProxyTorchDispatchMode):
    """Sits where make_fx's proxy mode sits: an infra mode under the PROXY key,
    below functionalization (which runs after user modes) and above the fake
    mode, so it sees the functional ops.  Torch code that looks for make_fx's
    mode (selective checkpointing, functionalization's view replay) finds this
    one and reads ``tracer`` (``_Tracked``)."""

    #: to dynamo, an infra mode only while torch compiles a higher-order op's
    #: call (Note [Dynamo under aotgrad's modes], hops.py)
    is_infra_mode = hops.transparent_to_hop_compiles

    def __init__(self, fake_mode: Any, decompositions: Mapping | None, functional: bool):
        self.graph = fx.Graph()
        self.node_of: dict[int, fx.Node] = {}
        super().__init__(_Tracked(self.node_of, self.graph), "real")  # torch 2.11's arguments
        self.tracer.track, self.tracer.recorder = self._track, self
        self.fake_mode = fake_mode
        self.decompositions = decompositions or {}
        self._last_input: fx.Node | None = None
        self.alive: list[torch.Tensor] = []   # Note [A light tracer]: ids stay unique
        self._decomposes: dict[Any, bool] = {}  # (op, device), or op: False on every device
        self._names: dict[Any, str] = {}  # op -> its nodes' name before numbering
        self.refused: tuple[type[Exception], str] | None = None
        # Note [Functional already]: not under functionalization, every op
        # must be functional; {op: whether it is}
        self.check_functional = not functional
        self._functional_ops: dict[Any, bool] = {}
        self.mutated: dict[int, bool] = {}   # id -> all its mutations under no_grad
        self._sharing: dict[Any, set[int]] | None = None  # storage -> tensor ids
        # Note [Straight to the fake mode]
        self._to_fake = fakes.memoized(_torch.fake_dispatcher(fake_mode), fake_mode)
        self._direct: dict[Any, bool] = {}  # op -> whether it may go straight there
        self._outer: Any = None  # the op being decomposed by a table's rule

    def refuse(self, reason: str, error: type[Exception] = NeedsMakeFx):
        """Give the program to make_fx, or to a functionalized trace
        (remembered: Note [A light tracer])."""
        self.refused = self.refused or (error, reason)
        raise self.refused[0](self.refused[1])

    def _is_functional(self, func) -> bool:
        """Whether a trace without functionalization may record ``func`` as it
        is: not if it mutates, has an effect, or has a rule of its own for
        functionalization (Note [Functional already], trace.py)."""
        known = self._functional_ops.get(func)
        if known is None:
            known = self._functional_ops[func] = \
                not func._schema.is_mutable and not _torch.has_effects(func) and \
                not _torch.has_dispatch_rule(func, _torch.FunctionalTensorMode)
        return known

    def _functionalized(self, func, types, args, kwargs) -> Any:
        """Note [Functional already] (trace.py): a data mutation of tensors
        nothing else aliases, recorded as the op's functional variant."""
        variant = functional_variant(func)
        if variant is None:
            self.refuse(f"{func} mutates its arguments, has an effect or a rule for "
                        "functionalization", NotFunctional)
        op, mutable = variant
        targets = [args[i] if i < len(args) else kwargs[name] for i, name in mutable]
        if len({id(t) for t in targets}) < len(targets):
            self.refuse(f"{func} mutates one tensor through two arguments", NotFunctional)
        for t in targets:
            if not isinstance(t, torch.Tensor) or id(t) not in self.node_of or self._aliased(t):
                self.refuse(f"{func} mutates a tensor that has aliases", NotFunctional)
        out = self.__torch_dispatch__(op, types, args, kwargs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        news = outs[len(outs) - len(targets):]
        for t, new in zip(targets, news):
            if new.dtype != t.dtype and not torch.can_cast(new.dtype, t.dtype):
                # eager's in-place op refuses it; fake kernels may not (mul_)
                raise RuntimeError(f"result type {dtype_name(new.dtype)} can't be cast to "
                                   f"the desired output type {dtype_name(t.dtype)}")
            if (new.shape, new.stride(), new.storage_offset(), new.dtype, new.device) != \
                    (t.shape, t.stride(), t.storage_offset(), t.dtype, t.device):
                self.refuse(f"{func}'s new value has other metadata", NotFunctional)
        no_grad = not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        for t, new in zip(targets, news):
            self.node_of[id(t)] = self.node_of[id(new)]
            self.mutated[id(t)] = self.mutated.get(id(t), True) and no_grad
        if len(outs) == len(targets):  # an in-place op returns what it mutated
            return args[0] if len(targets) == 1 else tuple(targets)
        rest = outs[:len(outs) - len(targets)]
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _aliased(self, t: torch.Tensor) -> bool:
        """Whether another tensor of the trace shares ``t``'s storage."""
        if self._sharing is None:  # built at the first mutation, then kept up to date
            self._sharing = {}
            for a in self.alive:
                self._share(a)
        return len(self._sharing[_torch.live_storage_key(t)]) > 1

    def _share(self, t: torch.Tensor) -> None:
        # the tensors stay alive (self.alive), so their storages do
        self._sharing.setdefault(_torch.live_storage_key(t), set()).add(id(t))

    def placeholder(self, name: str, value: Any) -> None:
        """A graph input, after the others (also once ops are recorded)."""
        graph = self.graph
        first = self._last_input.next if self._last_input is not None else \
            next(iter(graph.nodes), None)
        # our names are snake case already: no name derivation (Graph.placeholder's)
        if first is None or first.op == "root":  # nothing after the inputs yet: append
            node = _torch.add_node(graph, "placeholder", name, (), {}, name=name)
        else:
            with graph.inserting_before(first):
                node = _torch.add_node(graph, "placeholder", name, (), {}, name=name)
        self._last_input = node
        node.meta["val"] = value
        if isinstance(value, torch.Tensor):
            self._track(self.checked(value), node)

    def _track(self, t: torch.Tensor, node: fx.Node) -> None:
        self.node_of[id(t)] = node
        self.alive.append(t)
        if self._sharing is not None:
            self._share(t)

    def arg(self, a: Any) -> Any:
        if type(a) in _PLAIN_ARGS:  # ints, floats ... (most arguments that are not tensors)
            return a
        if isinstance(a, torch.Tensor):
            node = self.node_of.get(id(a))
            if node is None:
                self.refuse(f"a tensor the trace did not create ({type(a).__name__})")
            return node
        if isinstance(a, (list, tuple)):
            return type(a)([self.arg(x) for x in a])
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        if isinstance(a, (torch.ScriptObject, torch.SymInt, torch.SymFloat, torch.SymBool)):
            self.refuse(f"an argument of type {type(a).__name__}")
        return a

    def _should_decompose(self, func, args) -> bool:
        if self._decomposes.get(func) is False:  # no op of it decomposes on any device
            return False
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        key = (func, device)
        known = self._decomposes.get(key)
        if known is None:
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            try:
                if func in _SIZE_QUERIES or not func._can_decompose():
                    self._decomposes[func] = False
                    return False
                known = _torch.autograd_would_have_decomposed(func, flat)
            except RuntimeError:  # ops the dispatcher does not list (prim::device)
                known = False
            self._decomposes[key] = known
        return known

    def _run(self, func, types, args, kwargs) -> Any:
        """``func(*args, **kwargs)`` one level down: in the fake mode (Note
        [Straight to the fake mode])."""
        direct = self._direct.get(func)
        if direct is None:
            direct = self._direct[func] = self._to_fake is not None and \
                not func.python_key_table and \
                not _torch.has_dispatch_rule(func, type(self.fake_mode))
        if direct:
            return self._to_fake(func, types, args, kwargs)
        return func(*args, **kwargs)

    #: higher-order ops come to ``__torch_dispatch__`` (Note [Effect tokens])
    supports_higher_order_operators = True

    def _higher_order(self, func, types, args, kwargs) -> Any:
        """Note [Effect tokens]: ``with_effects(token, op, *args)`` is recorded
        as ``op(*args)``; other higher-order ops (their bodies are graphs) go
        to make_fx."""
        if self.refused:
            return func(*args, **kwargs)
        if func is not torch.ops.higher_order.with_effects or \
                not isinstance(args[1], _torch.OpOverload):
            self.refuse(f"the higher-order op {func.name()}")
        op = args[1]
        node_args, node_kwargs = self.arg(args[2:]), self.arg(kwargs)
        out = func(*args, **kwargs)  # the fake mode's rule: the tracer's mode is unset
        self._track(out[0], self.tracer.token)
        results = out[1:]
        if len(op._schema.returns) == 1 and isinstance(results[0], torch.Tensor):
            self._track(results[0], self._node(op, node_args, node_kwargs, results[0]))
            return out
        node = self._node(op, node_args, node_kwargs, None if not op._schema.returns
                          else tuple(results))
        for i, o in enumerate(results):
            if isinstance(o, torch.Tensor):
                self._track(o, self._item(node, i, o))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, _torch.HigherOrderOperator):
            return self._higher_order(func, types, args, kwargs)
        if self.refused or func.namespace == "prim":
            # refused: the run goes on untraced (unwinding, or a user except);
            # prim: metadata queries (prim::device) asked by C++ code, which
            # an exception cannot cross; they record nothing
            return self._run(func, types, args, kwargs)
        if not _HANDLED.issuperset(types):
            return NotImplemented  # a subclass (FunctionalTensor ...) unwraps itself first
        if _torch.in_checkpoint_region():
            self.refuse("checkpoint regions")  # Note [A light tracer]
        if self.check_functional and not self._is_functional(func):
            return self._functionalized(func, types, args, kwargs)
        if func in self.decompositions:
            # Note [Node metadata]: the nodes of a decomposition keep the op
            # it replaces as ``original_aten``, as make_fx's do
            outer, self._outer = self._outer, self._outer or func
            try:
                with self:
                    r = self.decompositions[func](*args, **kwargs)
            finally:
                self._outer = outer
            if r is not NotImplemented:  # some decline (inductor's mm on small sizes)
                return r
        if self._should_decompose(func, args):
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        if torch.Tag.data_dependent_output in func.tags or \
                func is _torch.aten.is_nonzero.default:
            self.refuse(f"a data-dependent op ({func})")
        node_args, node_kwargs = self.arg(args), self.arg(kwargs)
        out = self._run(func, types, args, kwargs)
        if isinstance(out, torch.Tensor):
            node = self._node(func, node_args, node_kwargs, out)
            self._track(out, node)
        elif isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out):
            node = self._node(func, node_args, node_kwargs, out)
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self._track(o, self._item(node, i, o))
        elif out is None:
            self._node(func, node_args, node_kwargs, None)
        elif isinstance(out, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            self.refuse(f"{func} returned a symbolic value")
        return out

    def _node(self, func, args, kwargs, out) -> fx.Node:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = self.graph._target_to_str(
                getattr(func, "overloadpacket", func))
        node = _torch.add_node(self.graph, "call_function", func, args, kwargs, name=name)
        node.meta["val"] = self.checked(out) if isinstance(out, torch.Tensor) else out
        if node_meta.preserving():  # Note [Node metadata] (node_meta.py)
            node_meta.copy_current(node)
            node.meta["original_aten"] = self._outer or func
        return node

    def _item(self, node: fx.Node, i: int, value: torch.Tensor) -> fx.Node:
        item = _torch.add_node(self.graph, "call_function", operator.getitem, (node, i), {},
                               name="getitem")
        item.meta["val"] = self.checked(value)
        if node_meta.preserving():
            node_meta.copy_current(item)
            item.meta["original_aten"] = self._outer or node.target
        return item

    def checked(self, t: torch.Tensor) -> torch.Tensor:
        if t._has_symbolic_sizes_strides and (
                any(type(s) is not int for s in t.shape) or
                any(type(s) is not int for s in t.stride()) or
                type(t.storage_offset()) is not int):
            self.refuse("symbolic sizes")
        return t


_VARIANTS: dict[Any, tuple | None] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """As eager's messages name it: ``Float``, ``Long``, ``ComplexFloat``."""
    return torch.empty((), dtype=dtype, device="meta").type().rpartition(".")[2][:-len("Tensor")]


def functional_variant(func) -> tuple[Any, list[tuple[int, str]]] | None:
    """The functional variant of a mutating op and its mutated arguments
    (position, name): ``add_`` -> ``add``, ``_native_batch_norm_legit`` ->
    ``_native_batch_norm_legit_functional`` (which also returns the new
    values).  None when there is none with the same arguments, or the op
    changes metadata (``t_``) or writes an ``out=``."""
    if func in _VARIANTS:
        return _VARIANTS[func]
    schema = func._schema
    mutable = [(i, a.name) for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    found = None
    if mutable and torch.Tag.inplace_view not in func.tags and not _torch.has_effects(func):
        name = schema.name.split("::")[-1]
        base = name[:-1] if name.endswith("_") and [i for i, _ in mutable] == [0] \
            else name + "_functional"
        packet = getattr(getattr(torch.ops, func.namespace), base, None)
        op = getattr(packet, func._overloadname, None) if packet is not None else None
        if op is not None and _same_arguments(op._schema, schema) and \
                not op._schema.is_mutable and \
                len(op._schema.returns) == len(mutable) + sum(
                    r.alias_info is None for r in schema.returns):
            found = (op, mutable)
    _VARIANTS[func] = found
    return found


def _same_arguments(a, b) -> bool:
    return [(x.name, str(x.type), x.kwarg_only) for x in a.arguments] == \
        [(x.name, str(x.type), x.kwarg_only) for x in b.arguments]


def mutated_so_far() -> dict[int, bool]:
    """Tensors (by id) that the trace in progress functionalized itself
    (Note [Functional already]): whether all their mutations were under no_grad."""
    mode = _torch.current_proxy_mode()
    return dict(mode.mutated) if isinstance(mode, _Recorder) else {}


def recording() -> bool:
    """Whether the light tracer is tracing (it then refuses checkpoint
    regions itself: ``policy.CheckpointRegionMarker`` is not needed)."""
    return isinstance(_torch.current_proxy_mode(), _Recorder)


def functionalizing_itself() -> bool:
    """Whether the light tracer is tracing without torch's functionalization
    (Note [Functional already], trace.py; Note [Eager's errors], analyze.py)."""
    mode = _torch.current_proxy_mode()
    return isinstance(mode, _Recorder) and mode.check_functional


def record(fn: Callable, args: Sequence[Any], names: Sequence[str],
           decompositions: Mapping | None, functional: bool = True) -> fx.GraphModule:
    """``fn(*args)`` traced (Note [A light tracer]).

    ``args`` are fake tensors or lists of them; ``names`` the placeholder
    names, one per tensor in order.  The graph returns the pytree leaves of
    ``fn``'s result, as make_fx's does.  Raises ``NeedsMakeFx`` when the
    program needs make_fx.  ``functional=False``: ``fn`` does not
    functionalize; ``NotFunctional`` is raised if it needed to (Note
    [Functional already], trace.py)."""
    flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
    fake_mode = _torch.detect_fake_mode(flat)
    if fake_mode is None:
        raise NeedsMakeFx("no fake inputs")
    if any(isinstance(x, _torch.sym_types) for x in flat):
        # arithmetic on a symbolic int input asks make_fx's tracer for its symbols
        raise NeedsMakeFx("symbolic inputs")
    recorder = _Recorder(fake_mode, decompositions, functional)
    for name, value in zip(names, flat, strict=True):
        recorder.placeholder(name, value)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch.functorch_layers_restored())  # Note [Layers a failed run
        stack.enter_context(fake_mode)                           # leaves] (hops.py)
        stack.enter_context(_torch.enable_python_dispatcher())
        stack.enter_context(autocast_cache_disabled())
        stack.enter_context(recorder)
        if fake_mode.shape_env is not None:
            # an op making an unbacked symbol (nonzero, item) is refused, and
            # the run goes on untraced: make_fx, tracing next in the same
            # ShapeEnv, must not find the symbol pending
            stack.enter_context(fake_mode.shape_env.ignore_fresh_unbacked_symbols())
        result = fn(*args)
    if recorder.refused:
        raise recorder.refused[0](recorder.refused[1])
    leaves = _torch.pytree.tree_leaves(result)
    recorder.graph.output(tuple(recorder.arg(v) for v in leaves))
    return _torch.lazy_graph_module(torch.nn.Module(), recorder.graph)


@contextlib.contextmanager
def autocast_cache_disabled():
    """Autocast's cache of cast weights kept off while tracing: a cast made of a
    fake tensor must not be handed to a later real call."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def add_placeholders(names: Sequence[str], metas: Sequence[tuple],
                     strides: Sequence[Any] | None = None) -> list[torch.Tensor]:
    """New graph inputs of the trace in progress: fake tensors of the given
    (shape, dtype, device) and ``strides`` (None: contiguous), made outside
    the trace (Note [One pass], trace.py)."""
    mode = _torch.current_proxy_mode()
    if not isinstance(mode, _Recorder):
        raise NeedsMakeFx("inputs added during the trace")
    values = [_torch.empty_fake(mode.fake_mode, shape, stride, dtype, device)
              for (shape, dtype, device), stride in zip(metas, strides or [None] * len(metas))]
    for name, value in zip(names, values, strict=True):
        mode.placeholder(name, value)
    return values


def trace_graph(fn: Callable, args: Sequence[Any], names: Sequence[str],
                decompositions: Mapping | None, *, tracer: str = "any",
                functional: bool = True) -> fx.GraphModule:
    """``fn(*args)`` traced.  ``tracer``: "any" (``record``, or make_fx when it
    must be), "light" (``record`` only: ``NeedsMakeFx`` propagates) or
    "make_fx" (the light tracer already refused this program).
    ``functional=False``: see ``record`` (light tracer only)."""
    reason = "the light tracer refused it earlier"
    if not functional:
        gm = record(fn, args, names, decompositions, functional=False)
        gm.meta[TRACER_META] = "the light tracer, functionalizing by itself"
        return gm
    if tracer != "make_fx":
        try:
            gm = record(fn, args, names, decompositions)
            gm.meta[TRACER_META] = "the light tracer, under functionalization"
            return gm
        except NeedsMakeFx as e:
            if tracer == "light":
                raise
            reason = str(e)
            _log.debug("traced by make_fx: %s", e)
    _torch.bump_counter("aotgrad", "traced_by_make_fx")
    with _torch.lazy_graph_modules(), _torch.functorch_layers_restored():  # (hops.py)
        gm = _torch.make_fx(fn, decomposition_table=decompositions)(*args)
    inline_effects(gm.graph)
    gm.meta[TRACER_META] = f"make_fx ({reason})"
    return gm


def inline_effects(graph: fx.Graph) -> None:
    """Note [Effect tokens] for a graph make_fx traced: its token inputs
    (``tangents_token``) go, and ``with_effects(token, op, *args)`` becomes
    ``op(*args)``, as the light tracer records it::

        with_effects = with_effects(tangents_token, aten._linalg_check_errors, getitem_1, 'linalg.inv')
        getitem_2 = with_effects[0];  getitem_3 = with_effects[1]

    becomes ``_linalg_check_errors = aten._linalg_check_errors(getitem_1, 'linalg.inv')``
    (``tokens.inline_node``; the node's meta, Note [Effects in the backward]'s
    mark too, is kept)."""
    token_inputs = [n for n in graph.nodes if n.op == "placeholder" and
                    n.name.startswith("tangents_token")]
    if not token_inputs:
        return
    effects = [n for n in graph.nodes if n.op == "call_function" and
               n.target is torch.ops.higher_order.with_effects]
    if not all(isinstance(n.args[1], (_torch.OpOverload, _torch.HigherOrderOperator)) and
               all(u.target is operator.getitem for u in n.users) for n in effects):
        return  # not what functionalization makes: left as it is (the signature check says)
    dead = set(token_inputs)
    for n in effects:
        tokens.inline_node(graph, n, dead)
    if any(u not in dead for n in dead for u in n.users):
        raise AssertionError("an effect token is used by more than the effects")
    for n in reversed(list(graph.nodes)):
        if n in dead:
            graph.erase_node(n)
