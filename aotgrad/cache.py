"""AOTAutogradCache: compiled graphs kept across calls and processes.

When ``config.enable_autograd_cache`` is on, ``aot_module_simplified`` on an
FX graph it has seen before loads the result instead of tracing again.  The
key (Note [Cache key]) covers the graph's code, the metadata of every input
(lifted parameters too), the options that shape the result (compilers,
partitioner, decompositions, aotgrad.config, grad mode) and the torch and
aotgrad versions.

Two levels:

* in memory: the whole runtime (compiled callables included) is reused;
* on disk (``config.cache_dir``, default ``~/.cache/aotgrad``): the analysis
  results and the partitioned graphs are pickled; a hit recompiles those
  graphs with the same compilers but skips analysis, tracing and partitioning.

Only compilers with a stable identity can be keyed: ``nop``, the backends'
compilers, and compilers wrapped in ``SerializableAOTDispatchCompiler``.
Anything else bypasses the cache (counted as ``autograd_cache_bypass``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch, config
from .analyze import Signature
from .compile import compile_inference, compile_joint, nop
from .flatten import FlatInputs
from .partition import Partitioned
from .pipeline import CompileOptions, CompileReport, Traced, compile_traced, trace_call
from .runtime import build_runtime
from .views import alias_plans

AOTGRAD_CACHE_VERSION = 1


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


@dataclass(frozen=True)
class CacheEntry:
    """What the disk cache keeps for one key."""
    flat: FlatInputs
    signature: Signature
    graphs: tuple[fx.GraphModule, ...]         # (fw, bw) or (inference,)
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
    def load(cls, key: str, options: CompileOptions) -> Callable[[list], Any] | None:
        run = cls._memory.get(key)
        if run is not None:
            return run
        try:
            with open(cls._path(key), "rb") as f:
                entry = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None
        run = _rebuild(entry, options)
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
        except (OSError, pickle.PicklingError, TypeError, AttributeError):
            return False


def cache_key(gm: fx.GraphModule, leaves: list, options: CompileOptions) -> str | None:
    """Note [Cache key]: None when something in it has no stable identity."""
    compilers = [compiler_identity(c) for c in
                 (options.fw_compiler, options.bw_compiler, options.inference_compiler)]
    if any(c is None for c in compilers):
        return None
    parts = [
        f"aotgrad-cache-v{AOTGRAD_CACHE_VERSION}", _torch.TORCH_VERSION, gm.code,
        repr(compilers), _qualname(options.partition_fn),
        repr(sorted(str(op) for op in (options.decompositions or {}))),
        repr(options.keep_inference_input_mutations), repr(torch.is_grad_enabled()),
        repr(sorted((k, repr(v)) for k, v in config.snapshot().items()
                    if k not in ("enable_autograd_cache", "cache_dir"))),
    ]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(repr((tuple(x.shape), x.stride(), x.dtype, x.device.type,
                               x.requires_grad, x.storage_offset())))
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
    return CacheEntry(t.flat, t.signature, graphs, *counts,
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


def _rebuild(entry: CacheEntry, options: CompileOptions) -> Callable[[list], Any]:
    mode = _torch.new_fake_mode(False)
    fakes = [_fake_inputs(m, mode) for m in entry.input_meta]
    for gm, f in zip(entry.graphs, fakes):
        _torch.propagate_fake_values(gm, f)
    if len(entry.graphs) == 2:
        parts = Partitioned(entry.graphs[0], entry.graphs[1], entry.num_fwd_outputs,
                            entry.num_saved_tensors, entry.num_saved_symints)
        compiled = compile_joint(parts, options.fw_compiler,
                                 options.bw_compiler or options.fw_compiler)
    else:
        compiled = compile_inference(entry.graphs[0], fakes[0],
                                     options.inference_compiler or options.fw_compiler,
                                     entry.num_fwd_outputs)
    return build_runtime(entry.flat, entry.signature, compiled,
                         alias_plans(entry.graphs[0], entry.signature),
                         dict(entry.poisoned_tangents))


def compile_with_cache(fn: Callable, gm: Any, options: CompileOptions, leaves: list,
                       in_spec: Any, report: CompileReport) -> Callable[[list], Any]:
    """``compile_call`` that consults the cache first (when enabled)."""
    key = None
    if config.enable_autograd_cache and isinstance(gm, fx.GraphModule):
        key = cache_key(gm, leaves, options)
        if key is None:
            _torch.bump_counter("aot_autograd", "autograd_cache_bypass")
    if key is not None:
        run = AOTAutogradCache.load(key, options)
        if run is not None:
            _torch.bump_counter("aot_autograd", "autograd_cache_hit")
            return run
        _torch.bump_counter("aot_autograd", "autograd_cache_miss")
    t = trace_call(fn, options, leaves, in_spec, report)
    run = compile_traced(t, options, report)
    if key is not None:
        if AOTAutogradCache.save(key, run, _entry_for(t, report)):
            _torch.bump_counter("aot_autograd", "autograd_cache_saved")
    return run
