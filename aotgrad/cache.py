"""AOTAutogradCache: compiled graphs kept across calls and processes.

When ``config.enable_autograd_cache`` is on, ``aot_module_simplified`` on an
FX graph it has seen before loads the result instead of tracing again.  The
key (Note [Cache key]) covers the graph's code (with its subgraphs, tensor
constants, and the type, mode and public attributes of the submodules it
calls: ``program_text``), the metadata of every input (lifted parameters
too) and which inputs are one tensor or share a storage, the options that
shape the result (compilers, partitioner, decompositions, aotgrad.config,
grad mode) and the torch and aotgrad versions.

Two levels:

* in memory: the whole runtime (compiled callables included) is reused;
* on disk (``config.cache_dir``, default ``~/.cache/aotgrad``): the analysis
  results and the partitioned graphs are pickled; a hit recompiles those
  graphs with the same compilers but skips analysis, tracing and partitioning.

Only compilers with a stable identity can be keyed: ``nop``, the backends'
compilers, and compilers wrapped in ``SerializableAOTDispatchCompiler``.
Anything else bypasses the cache (counted as ``autograd_cache_bypass``; an
error under ``config.strict_autograd_cache``), as do programs calling custom
autograd.Functions (unless ``config.autograd_cache_allow_custom_autograd_functions``)
and options holding callables (``config.joint_custom_pass``), graphs whose
code names what the key cannot hold (a Python function of the user's, as
``allow_in_graph`` leaves in dynamo's graph: its closure) and graphs or
called submodules with hooks.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
import tokenize
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch, config, tokens
from .analyze import Signature
from .compile import compile_inference, compile_joint, nop
from .descriptors import DESC
from .missing import CUSTOM_BACKWARD_META
from .flatten import FlatInputs, make_flat_fn
from .partition import Partitioned
from .pipeline import (CompileOptions, CompileReport, Traced, compile_traced,
                       differentiable_backward, trace_call)
from .codegen import INPUT_UPDATES_META, get_attr_path
from .runtime import build_runtime, input_updates
from .views import alias_plans

AOTGRAD_CACHE_VERSION = 4


class SerializableAOTDispatchCompiler:
    """Marks ``compiler_fn`` as a compiler the cache may key on.

    ``output_type`` is the type of what the compiler returns; calling this
    object calls ``compiler_fn`` and checks the result has that type.
    """

    def __init__(self, output_type: type, compiler_fn: Callable):
        self.output_type = output_type
        self.compiler_fn = compiler_fn

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        out = self.compiler_fn(gm, example_inputs)
        if not isinstance(out, self.output_type):
            raise TypeError(
                f"aotgrad: compiler {_qualname(self.compiler_fn)} returned "
                f"{type(out).__name__}, but was declared to return {self.output_type.__name__}")
        return out

    @property
    def cache_identity(self) -> str:
        return f"{_qualname(self.compiler_fn)}->{_qualname(self.output_type)}"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def compiler_identity(compiler: Callable | None) -> str | None:
    """A stable name for a compiler, or None if it has none we can trust."""
    if compiler is None:
        return "default"
    if compiler is nop:
        return "aotgrad.nop"
    ident = getattr(compiler, "cache_identity", None)
    return ident if isinstance(ident, str) else None


# ---------------------------------------------------------------- graphs on disk

@dataclass(frozen=True)
class _Ref:
    name: str       # a node, in a pickled graph


@dataclass(frozen=True)
class _Op:
    qualified: str  # an OpOverload, by name: "aten::mul.Tensor"

    def resolve(self) -> Any:
        name, _, overload = self.qualified.partition(".")
        namespace, op = name.split("::")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")


@dataclass(frozen=True)
class _Val:
    shape: tuple
    stride: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class PickledGraph:
    """Note [Graphs on disk]: a GraphModule as its nodes, so that loading
    rebuilds the graph directly.  (Pickling the GraphModule itself stores its
    Python code, which loading traces again, and drops ``node.meta``: the
    descriptors of the calling convention and the fake values compilers read.)
    ``meta["val"]`` keeps each tensor's metadata; loading makes meta-device
    tensors of it, enough for ``nop`` (Note [Verified bindings]); for other
    compilers ``_rebuild`` propagates fake values through the graph."""
    nodes: tuple[tuple, ...]        # (op, name, target, args, kwargs, val, desc)
    attrs: dict[str, Any]           # get_attr targets

    @staticmethod
    def of(gm: fx.GraphModule) -> "PickledGraph":
        def enc(v: Any) -> Any:
            if isinstance(v, fx.Node):
                return _Ref(v.name)
            if isinstance(v, (list, tuple)):  # also fx's immutable_list, torch.Size
                return (list if isinstance(v, list) else tuple)(enc(x) for x in v)
            if isinstance(v, dict):
                return {k: enc(x) for k, x in v.items()}
            if isinstance(v, _torch.OpOverload):
                return _Op(f"{v._schema.name}.{v._overloadname}")
            return v

        def val(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return _Val(tuple(v.shape), tuple(v.stride()), v.dtype)
            if isinstance(v, (list, tuple)):
                return type(v)(val(x) for x in v)
            return v

        nodes = tuple((n.op, n.name, enc(n.target), enc(n.args), enc(n.kwargs),
                       val(n.meta.get("val")), n.meta.get(DESC)) for n in gm.graph.nodes)
        attrs = {n.target: get_attr_path(gm, n.target)
                 for n in gm.graph.nodes if n.op == "get_attr"}
        return PickledGraph(nodes, attrs)

    def load(self) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}

        def dec(v: Any) -> Any:
            if isinstance(v, _Ref):
                return env[v.name]
            if isinstance(v, _Op):
                return v.resolve()
            if isinstance(v, (list, tuple)):
                return type(v)(dec(x) for x in v)
            if isinstance(v, dict):
                return {k: dec(x) for k, x in v.items()}
            return v

        def meta(v: Any) -> Any:
            if isinstance(v, _Val):
                return torch.empty_strided(v.shape, v.stride, dtype=v.dtype, device="meta")
            if isinstance(v, (list, tuple)):
                return type(v)(meta(x) for x in v)
            return v

        for op, name, target, args, kwargs, v, desc in self.nodes:
            node = graph.create_node(op, dec(target), dec(args), dec(kwargs), name)
            node.name = name
            env[name] = node
            if v is not None:
                node.meta["val"] = meta(v)
            if desc is not None:
                node.meta[DESC] = desc
        root = torch.nn.Module()
        for path, value in self.attrs.items():
            _set_attr_path(root, path, value)
        return _torch.lazy_graph_module(root, graph)


@dataclass(frozen=True)
class CacheEntry:
    """What the disk cache keeps for one key."""
    flat: FlatInputs
    signature: Signature
    graphs: tuple[PickledGraph, ...]           # (fw, bw) or (inference,)
    num_fwd_outputs: int
    num_saved_tensors: int
    num_saved_symints: int
    input_meta: tuple[tuple, ...]               # per graph: placeholder (shape, stride, dtype, device)
    poisoned_tangents: tuple[tuple[int, str], ...] = ()


class AOTAutogradCache:
    """The cache.  ``AOTAutogradCache.clear()`` empties memory and disk."""

    _memory: dict[str, Callable[[list], Any]] = {}

    @classmethod
    def clear(cls) -> None:
        cls._memory.clear()
        shutil.rmtree(cls.directory(), ignore_errors=True)

    @staticmethod
    def directory() -> str:
        return os.path.join(config.resolved_cache_dir(), f"autograd-v{AOTGRAD_CACHE_VERSION}")

    @classmethod
    def _path(cls, key: str) -> str:
        return os.path.join(cls.directory(), key[:2], key + ".pkl")

    @classmethod
    def load(cls, key: str, options: CompileOptions,
             fn: Callable | None = None) -> Callable[[list], Any] | None:
        """The entry for ``key``; ``fn``: the function it was compiled from, which a
        differentiable backward runs again (Note [Higher-order backward])."""
        run = cls._memory.get(key)
        if run is not None:
            return run
        try:
            with open(cls._path(key), "rb") as f:
                entry = pickle.load(f)
            graphs = [g.load() for g in entry.graphs]
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None  # unreadable, or an op this process does not have: a miss
        run = _rebuild(entry, graphs, options, fn)
        cls._memory[key] = run
        return run

    @classmethod
    def save(cls, key: str, run: Callable[[list], Any], entry: CacheEntry | None) -> bool:
        cls._memory[key] = run
        if entry is None:
            return False
        path = cls._path(key)
        try:
            data = pickle.dumps(entry)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: readers never see half a file
            return True
        except (OSError, pickle.PicklingError, TypeError, AttributeError, RuntimeError):
            return False  # e.g. a graph calling an object pickle cannot store


class BypassAOTAutogradCache(RuntimeError):
    """Raised instead of counting a bypass when ``config.strict_autograd_cache`` is on."""


def bypass_reason(gm: fx.GraphModule, options: CompileOptions) -> str | None:
    """Why this compilation cannot be cached (None: it can)."""
    for c in (options.fw_compiler, options.bw_compiler, options.inference_compiler):
        if compiler_identity(c) is None:
            return f"the compiler {_qualname(c)} has no stable identity (wrap it in " \
                "SerializableAOTDispatchCompiler)"
    if config.joint_custom_pass is not None:
        return "config.joint_custom_pass is set (a callable has no stable identity)"
    if _torch.top_saved_tensor_hooks() is not None:
        return "saved-tensor hooks are active (callables have no stable identity)"
    if callable(config.activation_memory_budget_runtime_estimator):
        return "config.activation_memory_budget_runtime_estimator is a callable"
    for n in gm.graph.nodes:   # what the graph's code names but the key cannot hold
        if n.op == "call_module" and any(
                m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                for m in gm.get_submodule(n.target).modules()):
            return f"the submodule {n.target} has hooks (callables have no stable identity)"
        if n.op == "call_function" and _user_function(n.target):
            return (f"the graph calls the Python function {_qualname(n.target)} (its code and "
                    "closure are not in the key)")
    if gm._forward_hooks or gm._forward_pre_hooks:
        return "the graph module has forward hooks (callables have no stable identity)"
    if not config.autograd_cache_allow_custom_autograd_functions:
        for n in gm.graph.nodes:
            if n.op == "call_function" and _is_custom_autograd_function(n.target):
                return ("the graph calls a custom autograd.Function (set "
                        "config.autograd_cache_allow_custom_autograd_functions to cache it)")
    return None


def _user_function(target: Any) -> bool:
    """A Python function of the user's (``allow_in_graph``): named by the
    graph's code only; torch's own are fixed by the torch version."""
    return isinstance(target, types.FunctionType) and \
        not (target.__module__ or "").split(".")[0] in ("torch", "aotgrad", "operator", "math")


def _is_custom_autograd_function(target: Any) -> bool:
    """Dynamo's ``autograd_function_apply``, or ``SomeFunction.apply`` itself."""
    if target is getattr(torch.ops.higher_order, "autograd_function_apply", None):
        return True
    owner = getattr(target, "__self__", None)
    return isinstance(owner, type) and issubclass(owner, torch.autograd.Function)


def graph_code(gm: fx.GraphModule) -> str:
    """Note [Normalized input names]: the graph's code, for the key.  With
    ``config.autograd_cache_normalize_inputs`` the placeholders are renamed
    ``arg0, arg1, ...`` (dynamo names them after the user's variables, so two
    programs that differ only there share an entry).  Names are replaced as
    Python tokens: strings, comments and attributes (``.x``) are left alone."""
    code = gm.code
    if not config.autograd_cache_normalize_inputs:
        return code
    rename = {n.name: f"arg{i}" for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    out, prev = [], None
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        text = tok.string
        if tok.type == tokenize.NAME and text in rename and prev != ".":
            text = rename[text]
        out.append((tok.type, text))
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.string
    return tokenize.untokenize(out)


def program_text(gm: fx.GraphModule) -> str:
    """The graph's code (``graph_code``) and what its ``get_attr`` nodes
    fetch: subgraphs (``torch.cond``'s branches, checkpointed bodies, a custom
    Function's forward and backward), recursively, and tensor constants by
    content.  The code alone names them only (``self.cond_true_0``), and
    dynamo reuses those names across programs: two programs with other
    branches shared one entry (silently the first one's values)."""
    parts = [graph_code(gm)]
    for target in sorted({n.target for n in gm.graph.find_nodes(op="get_attr")}):
        try:
            value = get_attr_path(gm, target)
        except AttributeError:
            parts.append(f"{target}: missing")
            continue
        if isinstance(value, fx.GraphModule):
            parts.append(f"{target}:\n{program_text(value)}")
        elif isinstance(value, torch.Tensor):
            parts.append(f"{target}: {_tensor_digest(value)}")
        else:
            parts.append(f"{target}: {type(value).__qualname__} {value!r}")
    for target in sorted({n.target for n in gm.graph.find_nodes(op="call_module")}):
        parts.append(f"{target}: {_module_text(gm.get_submodule(target))}")
    return "\n".join(parts)


def _module_text(module: torch.nn.Module) -> str:
    """A submodule a ``call_module`` node runs: its type, mode and public
    attributes (``eps``, ``momentum``, ...), with its own submodules'; its
    parameters and buffers are the graph's inputs."""
    parts = []
    for name, m in module.named_modules():
        attrs = sorted((k, _tensor_digest(v) if isinstance(v, torch.Tensor) else
                        _qualname(v) if callable(v) else repr(v))
                       for k, v in vars(m).items() if not k.startswith("_"))
        parts.append(f"{name or '.'} {_qualname(type(m))} {attrs}")
    return "; ".join(parts)


def _tensor_digest(t: torch.Tensor) -> str:
    meta = f"{t.dtype} {tuple(t.shape)} {tuple(t.stride())} {t.device.type}"
    if t.layout != torch.strided or _torch.is_wrapper_subclass(t) or t.is_meta:
        return f"{meta} {type(t).__qualname__} {t.layout} (no content)"
    data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() \
        if t.numel() else b""
    return f"{meta} {hashlib.sha256(data).hexdigest()}"


def _decomposition_key(decompositions: Any) -> str:
    """Each decomposition by op and by its function: module, name and code
    (two tables decomposing one op differently do not share an entry)."""
    items = []
    for op, fn in (decompositions or {}).items():
        code = getattr(fn, "__code__", None)
        body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest() \
            if code is not None else ""
        items.append(f"{op} {_qualname(fn)} {body}")
    return repr(sorted(items))


def cache_key(gm: fx.GraphModule, leaves: list, options: CompileOptions) -> str | None:
    """Note [Cache key]: None when something in it has no stable identity
    (``bypass_reason``)."""
    if bypass_reason(gm, options) is not None:
        return None
    compilers = [compiler_identity(c) for c in
                 (options.fw_compiler, options.bw_compiler, options.inference_compiler)]
    parts = [
        f"aotgrad-cache-v{AOTGRAD_CACHE_VERSION}", _torch.TORCH_VERSION, program_text(gm),
        repr(compilers), _qualname(options.partition_fn),
        _decomposition_key(options.decompositions),
        repr(options.keep_inference_input_mutations), repr(torch.is_grad_enabled()),
        repr(torch.get_default_dtype()), repr(_torch.autocast_state()),
        # Note [Options outside the cache key] (config.py)
        repr(sorted((k, repr(v)) for k, v in config.cache_key_options().items())),
    ]
    same: dict[int, int] = {}     # which leaves are one tensor, or share a storage
    storages: dict[tuple, int] = {}
    for k, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            try:
                storage = storages.setdefault((x.device.type, x.untyped_storage().data_ptr()), k)
            except (NotImplementedError, RuntimeError):
                storage = None
            parts.append(repr((tuple(x.shape), x.stride(), x.dtype, x.device.type,
                               x.requires_grad, x.storage_offset(), same.setdefault(id(x), k),
                               storage)))
        elif type(x) is float:    # -0.0 == 0.0, but repr tells them apart
            parts.append(repr((float, x)))
        else:
            parts.append(repr((type(x).__name__, x)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _placeholder_meta(gm: fx.GraphModule) -> tuple:
    meta = []
    for n in gm.graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            meta.append(("tensor", tuple(int(s) for s in v.shape), tuple(int(s) for s in v.stride()),
                         v.dtype, str(v.device), v.requires_grad))
        else:
            meta.append(("value", v))
    return tuple(meta)


def _entry_for(t: Traced, report: CompileReport) -> CacheEntry | None:
    if any(isinstance(s, torch.SymInt) for x in t.fake_inputs if isinstance(x, torch.Tensor)
           for s in (*x.shape, *x.stride())):
        return None  # symbolic sizes: kept in memory only
    if report.partitioned is not None:
        p: Partitioned = report.partitioned
        graphs = (p.fw_gm, p.bw_gm)
        counts = (p.num_fwd_outputs, p.num_saved_tensors, p.num_saved_symints)
    else:
        graphs = (t.graph.gm,)
        counts = (t.graph.num_fwd_outputs, 0, 0)
    return CacheEntry(t.flat, t.signature, tuple(PickledGraph.of(g) for g in graphs), *counts,
                      tuple(_placeholder_meta(g) for g in graphs),
                      tuple(t.graph.poisoned_tangents.items()))


def _fake_inputs(meta: tuple, mode) -> list:
    out = []
    with mode:
        for m in meta:
            if m[0] == "tensor":
                _, shape, stride, dtype, device, req = m
                out.append(torch.empty_strided(shape, stride, dtype=dtype, device=device)
                           .requires_grad_(req))
            else:
                out.append(m[1])
    return out


def _rebuild(entry: CacheEntry, graphs: list[fx.GraphModule],
             options: CompileOptions, fn: Callable | None = None) -> Callable[[list], Any]:
    mode = _torch.new_fake_mode(False)
    fakes = [_fake_inputs(m, mode) for m in entry.input_meta]
    compilers = (options.fw_compiler, options.bw_compiler, options.inference_compiler)
    if any(c not in (None, nop) for c in compilers):  # Note [Graphs on disk]
        for gm, f in zip(graphs, fakes):
            _torch.propagate_fake_values(gm, f)
    joint = len(graphs) == 2
    graphs[0].meta[INPUT_UPDATES_META] = input_updates(entry.signature, graphs[0], joint)
    if joint:
        # Note [Missing tangents] (missing.py): only allowed custom Functions reach the cache
        graphs[1].meta[CUSTOM_BACKWARD_META] = config.autograd_cache_allow_custom_autograd_functions
        parts = Partitioned(graphs[0], graphs[1], entry.num_fwd_outputs,
                            entry.num_saved_tensors, entry.num_saved_symints)
        compiled = compile_joint(parts, tokens.threading(options.fw_compiler),
                                 tokens.threading(options.bw_compiler or options.fw_compiler))
    else:  # Note [Effect tokens in compiled graphs] (tokens.py)
        compiled = compile_inference(graphs[0], fakes[0],
                                     tokens.threading(options.inference_compiler or
                                                      options.fw_compiler),
                                     entry.num_fwd_outputs)
    higher = None
    if joint:  # Note [Higher-order backward]; backward writes: outputs after the grads
        higher = differentiable_backward(
            parts, entry.signature, entry.flat,
            make_flat_fn(fn, entry.flat) if fn is not None else None, options,
            subclasses=False, poisoned=bool(entry.poisoned_tangents),
            backward_writes=len(graphs[1].graph.output_node().args[0]) !=
            len(entry.signature.inputs))
    return build_runtime(entry.flat, entry.signature, compiled,
                         alias_plans(graphs[0], entry.signature),
                         dict(entry.poisoned_tangents), higher=higher)


def compile_with_cache(fn: Callable, gm: Any, options: CompileOptions, leaves: list,
                       in_spec: Any, report: CompileReport) -> Callable[[list], Any]:
    """``compile_call`` that consults the cache first (when enabled)."""
    key = None
    if config.enable_autograd_cache and isinstance(gm, fx.GraphModule):
        reason = bypass_reason(gm, options)
        if reason is not None:
            if config.strict_autograd_cache:
                raise BypassAOTAutogradCache(f"aotgrad: AOTAutogradCache bypassed: {reason}")
            _torch.bump_counter("aot_autograd", "autograd_cache_bypass")
        else:
            key = cache_key(gm, leaves, options)
    if key is not None:
        run = AOTAutogradCache.load(key, options, fn)
        if run is not None:
            _torch.bump_counter("aot_autograd", "autograd_cache_hit")
            return run
        _torch.bump_counter("aot_autograd", "autograd_cache_miss")
    t = trace_call(fn, options, leaves, in_spec, report, specialise=True)
    run = compile_traced(t, options, report)
    if key is not None and t.reads is None:  # a value guard is not in the cache's entry
        if AOTAutogradCache.save(key, run, _entry_for(t, report)):
            _torch.bump_counter("aot_autograd", "autograd_cache_saved")
    return run


def _set_attr_path(root: torch.nn.Module, path: str, value: Any) -> None:
    """``root.a.b = value`` for ``path`` "a.b", making plain modules on the way."""
    *parents, last = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        root.register_buffer(last, value)
    else:
        setattr(root, last, value)
