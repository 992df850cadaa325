"""The one module of aotgrad that reaches into PyTorch's private internals.

Every import of a private torch module (``torch._subclasses``,
``torch.fx.experimental.proxy_tensor``, ``torch._C._functionalize_*`` ...)
goes through here, so that differences between the torch versions we support
(2.11 to 2.13) live in one place.  The rest of the package imports names from
this module and never from ``torch._*`` directly.

PyTorch's own AOTAutograd (its entry points, partitioners and compilers) is
never imported, here or anywhere else in the package.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree  # noqa: F401  (re-exported)
from torch._decomp import core_aten_decompositions, get_decompositions  # noqa: F401
from torch._dispatch.python import enable_python_dispatcher, no_python_dispatcher  # noqa: F401
from torch._prims_common import suggest_memory_format  # noqa: F401  (tangents.py)
from torch._subclasses.fake_tensor import (FakeTensor, FakeTensorMode,  # noqa: F401
                                           in_kernel_invocation_manager)
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, make_fx  # noqa: F401
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: F401
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: F401
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import (  # noqa: F401  (re-exported)
    TorchDispatchMode,
    _disable_current_modes as no_dispatch_modes,
    autograd_would_have_decomposed,
    is_traceable_wrapper_subclass,
)

TORCH_VERSION = torch.__version__

aten = torch.ops.aten

# Types that stand for symbolic sizes (SymInt, SymFloat, SymBool).
sym_types = (torch.SymInt, torch.SymFloat, torch.SymBool)


def is_traced_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor of a trace (fake, or functional over one)."""
    return isinstance(value, (FakeTensor, FunctionalTensor))


def detect_fake_mode(values) -> FakeTensorMode | None:
    """The fake mode of the first fake tensor among ``values`` (a flat list)."""
    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    from torch._guards import detect_fake_mode as _detect

    return _detect(values)


def has_effects(op: Any) -> bool:
    """Whether ``op`` has a side effect that functionalization orders with
    tokens (a custom op registered with an effect, ``aten._print``)."""
    from torch._higher_order_ops import effects

    try:
        return bool(effects.has_effects(op))
    except TypeError:  # torch versions whose has_effects takes (op, args, kwargs)
        return bool(effects.has_effects(op, (), {}))


def data_dependence_errors() -> tuple[type, ...]:
    """What tracing raises when the graph would depend on tensor values."""
    from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                               DynamicOutputShapeException)
    from torch.fx.experimental.symbolic_shapes import (GuardOnDataDependentSymNode,
                                                       PendingUnbackedSymbolNotFound)

    return (DataDependentOutputException, DynamicOutputShapeException,
            GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound)


def tensor_metadata(val: torch.Tensor) -> Any:
    """fx's ``TensorMetadata`` of a (fake) tensor, as make_fx records it."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata
    return _extract_tensor_metadata(val)


def is_wrapper_subclass(t: Any) -> bool:
    """A tensor subclass that flattens into inner tensors (TwoTensor, DTensor ...)."""
    return is_traceable_wrapper_subclass(t) and not isinstance(t, (FakeTensor, FunctionalTensor))


def new_fake_mode(dynamic: bool, shape_env: bool = False) -> FakeTensorMode:
    """A fresh fake mode, symbolic with ``dynamic``; static ones have no ShapeEnv
    (~2% of a compile) unless ``shape_env`` (Note [Fake rules that need a ShapeEnv],
    hops.py).  Note [A fake mode without its birth stack]."""
    with _no_stack_capture():
        if dynamic or shape_env:
            return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=not dynamic,
                                  allow_non_fake_inputs=False)
        return FakeTensorMode()


# Note [A fake mode without its birth stack]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``FakeTensorMode()`` records where it was made (``traceback.extract_stack``,
# shown only in an error about mixing fake modes).  That reads the source of
# every file on the stack not yet in ``linecache``: making the mode took
# 1.8-2.0 ms of the MLP's cold first call, 0.2-0.3 ms without.  aotgrad's
# fake modes never meet a user's, so the stack is not recorded:
# ``extract_stack`` honours ``sys.tracebacklimit``, set to 0 while the mode
# is made.  A lock keeps two threads from restoring each other's value.
_STACK_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_stack_capture():
    with _STACK_LIMIT_LOCK:
        missing = object()
        before = getattr(sys, "tracebacklimit", missing)
        sys.tracebacklimit = 0
        try:
            yield
        finally:
            if before is missing:
                del sys.tracebacklimit
            else:
                sys.tracebacklimit = before


is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # by vmap, grad, ...
unwrap_if_dead = torch._C._functorch.unwrap_if_dead  # the tensor a finished transform wrapped


def empty_fake(mode: FakeTensorMode, shape: Sequence[int], stride: Sequence[int] | None,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty_strided`` (contiguous if ``stride`` is None) under ``mode``
    (static sizes), without a dispatch: a meta tensor wrapped as the mode does."""
    with no_dispatch():
        meta = torch.empty(shape, dtype=dtype, device="meta") if stride is None else \
            torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return FakeTensor(mode, meta, torch.device(device))


def fake_view(mode: FakeTensorMode, base: torch.Tensor, shape: Sequence[int],
              stride: Sequence[int], offset: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A fake view (``shape``/``stride``/``offset``) of the fake ``base``'s storage,
    without a dispatch (as the fake mode's cache makes a view op's result)."""
    with no_dispatch():
        meta = torch.empty((0,), dtype=dtype, device="meta")
        meta.set_(base.untyped_storage(), offset, shape, stride)
    return FakeTensor(mode, meta, device)


def default_device() -> Any:
    """``torch.set_default_device``'s device (as the fake mode's cache keys it)."""
    return torch._C._get_default_device()


def fake_mode_is_next(mode: FakeTensorMode) -> bool:
    """Whether ops go to ``mode`` next (Note [Straight to the fake mode])."""
    return torch._C._get_dispatch_mode(_FAKE_KEY) is mode


def detached_fake(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``; of a static fake tensor, its meta kernel wrapped as the mode
    does, without a fake dispatch (6x cheaper; a compile detaches each input)."""
    mode = getattr(t, "fake_mode", None)
    if type(t) is not FakeTensor or mode is None or mode.shape_env is not None or \
            t.constant is not None:
        out = t.detach()
        # a scalar dynamo made of a Python float (dynamic=True) answers .item()
        # with its symbol: the detached copy must too
        memo = getattr(t, "item_memo", None)
        if memo is not None and isinstance(out, FakeTensor):
            out.item_memo = memo
        return out
    with in_kernel_invocation_manager(mode):
        meta = aten.detach.default(t)
    return FakeTensor(mode, meta, t.device)


_FAKE_KEY = torch._C._TorchDispatchModeKey.FAKE
# what FakeTensorMode.dispatch answers before anything else, without dispatching
from torch._subclasses.fake_tensor import _DISPATCH_META_HANDLERS as _FAKE_METADATA_QUERIES  # noqa: E402,E501


def fake_dispatcher(mode: FakeTensorMode) -> Callable[[Any, Any, Any, Any], Any] | None:
    """Note [Straight to the fake mode] (record.py): a function running
    ``func(*args, **kwargs)`` as the dispatcher would once it reaches
    ``mode`` -- the next mode on the stack -- without going through the
    dispatcher: ``mode.dispatch`` with the mode's slot unset during the call,
    as the dispatcher unsets it, and the result in the types the dispatcher
    returns (a tuple for several results, a list for a ``Tensor[]``: Python
    meta functions may return named tuples).  None for a fake mode of another
    type (its ``__torch_dispatch__`` may differ).  A metadata query the mode
    answers first thing (``prim::device``, asked by C++ of the fake tensors
    an op takes: two thirds of a trace's dispatches) is answered by the
    mode's own handler, as its ``dispatch`` would.  ``uncached``: with the
    mode's cache off for the op and the ops it runs (Note [A memo of fake
    results], fakes.py)."""
    if type(mode) is not FakeTensorMode:
        return None
    dispatch, unset, restore = mode.dispatch, torch._C._unset_dispatch_mode, \
        torch._C._set_dispatch_mode
    result_types: dict[Any, type | None] = {}

    def run(func: Any, types: Any, args: Any, kwargs: Any, uncached: bool = False) -> Any:
        query = _FAKE_METADATA_QUERIES.get(func)
        if query is not None and type(args[0]) is FakeTensor and args[0].fake_mode is mode:
            return query(args)
        current = unset(_FAKE_KEY)
        if current is not mode:  # not the next mode after all: the dispatcher's way
            if current is not None:
                restore(current)
            return func(*args, **kwargs)
        cached = mode.cache_enabled
        mode.cache_enabled = cached and not uncached
        try:
            out = dispatch(func, types, args, kwargs)
        finally:
            restore(mode)
            mode.cache_enabled = cached
        if isinstance(out, (tuple, list)):
            as_type = result_types.get(func, False)
            if as_type is False:
                as_type = result_types[func] = _result_type(func._schema.returns)
            if as_type is not None and type(out) is not as_type:
                out = as_type(out)
        return out

    return run


def _result_type(returns: Sequence[Any]) -> type | None:
    if len(returns) > 1:
        return tuple
    if len(returns) == 1 and isinstance(returns[0].type, torch.ListType):
        return list
    return None


def has_dispatch_rule(func: Any, mode_type: type) -> bool:
    """Whether ``torch.library.register_torch_dispatch`` gave ``func`` a rule
    for modes of ``mode_type`` (the dispatcher runs it instead of the mode)."""
    from torch._library.simple_registry import find_torch_dispatch_rule

    return find_torch_dispatch_rule(func, mode_type) is not None


def add_node(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: dict,
             name: str | None = None, type_expr: Any = None) -> fx.Node:
    """``graph.create_node(op, target, args, kwargs, name, type_expr)``, the
    arguments set after creation (``Node.args``/``Node.kwargs``, which do what
    the constructor does with them).  torch 2.13's ``create_node`` first walks
    the arguments with pytree to warn about raw symbolic values; aotgrad's
    graphs have none (the light tracer refuses them, make_fx records nodes),
    and the walk costs as much as the rest of making a node."""
    node = graph.create_node(op, target, (), None, name=name, type_expr=type_expr)
    if args:
        node.args = args
    if kwargs:
        node.kwargs = kwargs
    return node


# ---------------------------------------------------------------- functionalization

def functional_mode() -> FunctionalTensorMode:
    """The functionalization mode used by analysis and tracing.

    Views stay views (``aten.view``, not ``view_copy``), so graphs read like
    the user's program; mutations become their functional variants.
    """
    return FunctionalTensorMode(pre_dispatch=False, export=False, _allow_token_discovery=True)


def to_functional(t: Any) -> Any:
    """Wrap a tensor for functionalization (must run inside functional_mode)."""
    if isinstance(t, torch.Tensor):
        return FunctionalTensor.to_functional(t)
    return t


def mirror_autograd_meta(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Give ``dst`` the requires_grad and leafness of ``src`` (a non-leaf
    gets a grad_fn that raises if used: in-place ops are then allowed on it)."""
    torch._mirror_autograd_meta_to(src, dst)


def from_functional(t: Any) -> Any:
    """Unwrap a functional tensor, applying pending updates first."""
    if isinstance(t, FunctionalTensor):
        torch._sync(t)
        return torch._from_functional_tensor(t.elem)
    return t


def is_functional(t: Any) -> bool:
    return isinstance(t, FunctionalTensor)


def sync(t: FunctionalTensor) -> None:
    torch._sync(t)


def has_data_mutation(t: FunctionalTensor) -> bool:
    torch._sync(t)
    return torch._functionalize_has_data_mutation(t.elem)


def has_metadata_mutation(t: FunctionalTensor) -> bool:
    return torch._functionalize_has_metadata_mutation(t.elem)


def was_storage_changed(t: FunctionalTensor) -> bool:
    return torch._functionalize_was_storage_changed(t.elem)


def mutations_hidden_from_autograd(t: FunctionalTensor) -> bool:
    return torch._functionalize_are_all_mutations_hidden_from_autograd(t.elem)


def mutations_under_no_grad(t: FunctionalTensor) -> bool:
    return torch._functionalize_are_all_mutations_under_no_grad_or_inference_mode(t.elem)


def storage_of(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def live_storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage, for as long as the storage lives
    (the caller keeps a tensor of it alive): cheaper than ``storage_of``,
    which makes a weak reference."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def tracing_context(fake_mode: FakeTensorMode):
    """Enter fake mode and the Python dispatcher (for symbolic decompositions),
    with aotgrad's own fake kernels for that mode (Note [Own fake kernels], fakes.py)."""
    with fake_mode, enable_python_dispatcher(), own_fake_kernels(fake_mode):
        yield


FAKE_KERNELS: dict = {}  # op -> kernel(mode, *args, **kwargs): a result, or NotImplemented


@contextlib.contextmanager
def own_fake_kernels(mode: FakeTensorMode):
    """Note [Own fake kernels] (fakes.py): ``mode`` answers the ops of
    ``FAKE_KERNELS`` by aotgrad's kernel (else as before) while the context lasts."""
    if not FAKE_KERNELS or type(mode) is not FakeTensorMode or "dispatch" in vars(mode):
        yield
        return
    plain, kernels = mode.dispatch, FAKE_KERNELS

    def dispatch(func, types, args, kwargs):
        kernel = kernels.get(func)
        out = NotImplemented if kernel is None else kernel(mode, *args, **kwargs)
        return plain(func, types, args, kwargs) if out is NotImplemented else out

    mode.dispatch = dispatch
    try:
        yield
    finally:
        del mode.dispatch


def is_sym_node(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), sym_types)


def keeps_graph() -> bool:
    """Whether the running backward was called with retain_graph (or create_graph)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def autograd_nodes(roots) -> Iterator[Any]:
    """Each node of the autograd graph reachable from ``roots`` (grad_fns,
    None skipped), once.  Note [Ids of autograd nodes] (analyze.py): the
    walk holds every node it has yielded, so ids stand for one node."""
    seen: dict[int, Any] = {}
    stack = [r for r in roots if r is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        yield fn
        stack.extend(f for f, _ in fn.next_functions if f is not None)


def engine_uses(node: Any) -> bool:
    """Whether the running backward's graph task uses the gradient flowing
    into ``node`` (Note [Wanted gradients], higher_order.py).  For a leaf's
    accumulator under ``autograd.grad`` the engine answers False when the
    leaf is not one of the inputs asked for and raises when it is (~10 us,
    paid once per leaf asked for; a leaf not asked for saves its gradient's
    ops, a weight's convolution backward say)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        if type(node) is _AccumulateGrad:
            return True      # a leaf autograd.grad captures the gradient of
        raise


def is_leaf_accumulator(node: Any) -> bool:
    return type(node) is _AccumulateGrad


_AccumulateGrad = torch._C._functions.AccumulateGrad


# inductor's entry points: .inductor (re-exported)
from .inductor import (DONATED_INPUTS_META, inductor_compile, inductor_decompositions,  # noqa: E402,F401,E501
                       inductor_joint_passes, inductor_mode_options, inductor_pre_grad_passes)


def lazy_graph_module(root: Any, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is made on first use (codegen.py runs its own)."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    return _LazyGraphModule(root, graph)


@contextlib.contextmanager
def functorch_layers_restored():
    """Note [Layers a failed run leaves] (hops.py): functorch's layer stack
    and the dispatch-key sets as they were before, once the body is done."""
    depth = torch._C._functorch.get_dynamic_layer_stack_depth()
    try:
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                             torch._C._dispatch_tls_local_exclude_set()):
            yield
    finally:
        torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(depth)


def in_hop_compile() -> bool:
    """Whether dynamo compiles or runs a higher-order op's eager call (hops.py)."""
    from torch._higher_order_ops.utils import _in_hop_compile

    return _in_hop_compile()


def fake_rules_of_hops() -> frozenset:
    """The code of the higher-order ops' rules for fake modes (hops.py)."""
    from torch._ops import _higher_order_ops

    return frozenset(getattr(op.python_key_table.get(FakeTensorMode), "__code__", None)
                     for op in list(_higher_order_ops.values())) - {None}


def lazy_graph_modules():
    """Graph modules made in this context (by ``make_fx``) generate code lazily."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    return _use_lazy_graph_module(True)


# ---------------------------------------------------------------- counters and meta

def bump_counter(group: str, name: str) -> None:
    """Count an event where torch.compile users look for it (dynamo's counters)."""
    from torch._dynamo.utils import counters

    counters[group][name] += 1


def propagate_fake_values(gm: torch.fx.GraphModule, fake_inputs) -> None:
    """Fill ``node.meta["val"]`` of every node by running ``gm`` on fake inputs."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = detect_fake_mode(list(fake_inputs))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


# ---------------------------------------------------------------- TorchScript (compilers.ts_compile)

from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket  # noqa: E402,F401


@contextlib.contextmanager
def jit_autocast_disabled():
    """TorchScript's own autocast pass off while scripting (as functorch's ts_compile)."""
    old = torch._C._jit_set_autocast_mode(False)
    try:
        yield
    finally:
        torch._C._jit_set_autocast_mode(old)


# ---------------------------------------------------------------- saved-tensor hooks

def top_saved_tensor_hooks():
    """The innermost active ``saved_tensors_hooks`` (pack, unpack), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


@contextlib.contextmanager
def hide_saved_tensor_hooks():
    """Make autograd ignore saved-tensor hooks (while aotgrad traces)."""
    prior = torch._C._autograd._saved_tensors_hooks_set_tracing(True)
    try:
        yield
    finally:
        torch._C._autograd._saved_tensors_hooks_set_tracing(prior)


def in_checkpoint_region() -> bool:
    """Whether ``torch.utils.checkpoint`` (non-reentrant) is running its
    forward: its saved-tensor hook is the innermost one."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return hooks is not None and \
        getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


def current_proxy_mode() -> ProxyTorchDispatchMode | None:
    """make_fx's mode (or aotgrad's tracer in its place), if one is tracing."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode()


def current_trace_graph() -> torch.fx.Graph | None:
    """The graph being recorded into, if any (make_fx's or aotgrad's tracer's)."""
    mode = current_proxy_mode()
    return mode.tracer.graph if mode is not None else None


def read_recorded(func: Any, args: tuple, kwargs: dict) -> Any:
    """Under make_fx in real mode: the value ``func`` reads from real tensors,
    recorded as a node (make_fx itself refuses reads: Note [Values read while
    tracing], values.py)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_slot

    tracer = current_proxy_mode().tracer
    proxied = pytree.tree_map_only(torch.Tensor, lambda t: get_proxy_slot(t, tracer).proxy,
                                   (args, kwargs))
    with no_dispatch():
        out = func(*args, **kwargs)
    tracer.create_proxy("call_function", func, *proxied)
    return out


def selective_checkpoint_mark():
    """The CheckpointPolicy that a selective-checkpoint context left for the
    op being traced in ``fx.traceback.current_meta`` (torch 2.11 passes it only
    there; later versions also write it on the nodes), or None.  Taken out once
    read, so that it cannot leak to a later op."""
    import torch.fx.traceback as fx_traceback

    return fx_traceback.current_meta.pop("recompute", None)


def checkpoint_policies():
    """torch.utils.checkpoint.CheckpointPolicy (MUST_SAVE, PREFER_SAVE, ...)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy


# ---------------------------------------------------------------- autograd view metadata

def creation_meta_name(t: torch.Tensor) -> str | None:
    """How autograd created the view ``t`` ("DEFAULT", "MULTI_OUTPUT_NODE",
    "IN_CUSTOM_FUNCTION", "NO_GRAD_MODE", "INFERENCE_MODE"), None if not a view."""
    if not t._is_view():
        return None
    return torch._C._autograd._get_creation_meta(t).name


def unsafe_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharing ``t``'s storage that autograd does not treat as a view."""
    return aten._unsafe_view(t, t.shape)


# ---------------------------------------------------------------- autocast

@functools.cache
def autocast_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def autocast_state() -> tuple:
    """Per device type, False or the dtype autocast casts to (part of the
    guard key: a program traced under bfloat16 autocast is not float16's)."""
    if not any_autocast_enabled():
        return _AUTOCAST_OFF
    return tuple(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d)
                 for d in autocast_devices())


any_autocast_enabled = torch._C._is_any_autocast_enabled
_AUTOCAST_OFF = tuple(False for _ in autocast_devices())

def spec_children(spec: Any) -> list:
    """The child TreeSpecs of a pytree spec (the accessor was renamed in 2.13)."""
    return spec.children() if hasattr(spec, "children") else spec.children_specs


def function_apply_unchecked(function: type) -> Any:
    """Note [Guarded apply] (runtime.py): ``function.apply`` without the Python
    layer of ``autograd.Function.apply``, which binds default arguments for
    ``setup_context`` (ours has none) and unwraps dead functorch wrappers
    (plain tensors, checked by a guard, are none) before calling this."""
    return super(torch.autograd.Function, function).apply


functorch_transforms_active = torch._C._are_functorch_transforms_active
forward_ad_level = lambda: torch.autograd.forward_ad._current_level  # noqa: E731  (-1: none)
forward_grad_enabled = torch._C._is_fwd_grad_enabled


def functionalize_running() -> bool:
    """Whether the innermost functorch transform is ``torch.func.functionalize``."""
    from torch._functorch.pyfunctorch import TransformType, retrieve_current_functorch_interpreter

    return retrieve_current_functorch_interpreter().key() == TransformType.Functionalize


@contextlib.contextmanager
def jvp_in_open_dual_level():
    """``torch.func.jvp`` inside the caller's open ``forward_ad.dual_level``: it
    would open a second one, and forward AD does not nest (transforms.py)."""
    from torch._functorch import eager_transforms

    bump = int(forward_ad_level() >= 0 and eager_transforms.JVP_NESTING == 0)
    eager_transforms.JVP_NESTING += bump  # its own jvp then keeps the open level
    try:
        yield
    finally:
        eager_transforms.JVP_NESTING -= bump


# version counters moved by hand (Note [Versions of inputs written in the graph], runtime.py)
increment_version = torch.autograd.graph.increment_version

# grad mode without a context manager object (for generated code)
set_grad_enabled = torch._C._set_grad_enabled


def dynamo_disabled(fn):
    """``fn`` run with dynamo's frame evaluation off (nested calls included):
    a compiled backward that autograd runs inside a ``torch.compile``d
    function (``autograd.grad`` there) is not traced by dynamo.  Marked on its
    code object (skip it and what it calls), which costs nothing per call;
    ``torch._dynamo.disable``'s wrapper, where that mark is missing, costs ~4 us."""
    import torch._dynamo
    from torch._dynamo import eval_frame
    mark = getattr(eval_frame, "set_code_exec_strategy", None)
    strategy = getattr(eval_frame, "FrameExecStrategy", None)
    action = getattr(eval_frame, "FrameAction", None)
    if mark is None or strategy is None or action is None:
        return torch._dynamo.disable(fn, recursive=True)
    mark(fn.__code__, strategy(action.SKIP, action.SKIP))
    return fn


def autocast_disabled():
    """Autocast off (for running graphs whose autocast decisions are traced in)."""
    return torch._C._DisableAutocast()


# ---------------------------------------------------------------- shape guards (dynamic=True)

def shape_guard(fake_mode: FakeTensorMode, fake_inputs):
    """A predicate over real inputs: do they satisfy every assumption the
    trace made about symbolic sizes?  None when there is nothing to check."""
    env = fake_mode.shape_env
    if env is None:
        return None
    placeholders = [x for x in fake_inputs]
    code = env.produce_guards_expression(placeholders, ignore_static=False)
    if not code:
        return None
    return lambda inputs: env.evaluate_guards_expression(code, inputs)


# ---------------------------------------------------------------- fast guards

@contextlib.contextmanager
def aot_graph_name_in_tracing_context(names: list[str]):
    """Under torch.compile, the graph being compiled is named on dynamo's
    tracing context (``aot_graph_name``), which inductor reads for its logs."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    if ctx is None or not hasattr(ctx, "aot_graph_name"):
        yield
        return
    old, ctx.aot_graph_name = ctx.aot_graph_name, names
    try:
        yield
    finally:
        ctx.aot_graph_name = old


import torch.fx.traceback as fx_traceback  # noqa: E402  (Note [Node metadata], node_meta.py)
from torch.fx.proxy import _COPY_META_FIELDS as COPIED_META_FIELDS  # noqa: E402


def tensor_guard(examples: list) -> Any:
    """A C++ check ``check(*tensors) -> bool`` that tensors have the type,
    dispatch keys, dtype, device, requires_grad, sizes and strides of
    ``examples`` (dynamo's ``TensorGuards``), or None where this torch lacks it."""
    try:
        from torch._C._dynamo.guards import TensorGuards
        return TensorGuards(*examples, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
    except (ImportError, TypeError, RuntimeError):
        return None


# ---------------------------------------------------------------- Python bindings of ATen ops

VariableFunctions = torch._C._VariableFunctions
TensorBase = torch._C.TensorBase
torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled


class _NotOnlyTheStandIn(Exception):
    pass


class _RecordOps(TorchDispatchMode):
    def __init__(self, stand_in: tuple | None):
        super().__init__()
        self.ops: list = []
        self.stand_in = stand_in

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, args, kwargs or {}))
        if self.stand_in is not None:
            if len(self.ops) == 1 and func is self.stand_in[0]:
                return self.stand_in[1]
            raise _NotOnlyTheStandIn()  # the answer is known: stop here
        return func(*args, **(kwargs or {}))


def dispatched_calls(fn: Any, args: list, stand_in: tuple | None = None) -> list:
    """The ATen calls ``fn(*args)`` dispatches, in order: ``(overload, args,
    kwargs)`` as the dispatcher passed them.  ``stand_in``
    (an overload, its result): the question is whether ``fn`` dispatches
    that overload and nothing else.  If the first op dispatched is that
    overload, it returns that result instead of running (on a cold first
    call, running a meta kernel means running its Python decomposition);
    at any other op the run stops, the calls so far returned (they are not
    that overload alone)."""
    with torch.no_grad(), _RecordOps(stand_in) as record:
        try:
            fn(*args)
        except _NotOnlyTheStandIn:
            pass
    return record.ops


# ---------------------------------------------------------------- nn.Module hooks

# ---------------------------------------------------------------- RNG replay (rng.py)

def rng_replay_ops():
    """torch's operators that run an op after saving the generator state, and
    run it again from a saved state (Note [Replayed random ops], rng.py)."""
    from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state
    return run_and_save_rng_state, run_with_rng_state
