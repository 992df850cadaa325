"""Fake tensors made without the fake mode's general machinery.

* Fake versions of a call's real inputs (the first stage's last step):
  Note [Plain fakes] (``fakes_from_reals``): most inputs are plain tensors,
  whose fakes need none of ``from_tensor``'s generality.
* The results of the ops the light tracer records: Note [A memo of fake
  results] (``memoized``).
* aotgrad's own fake kernels, for its traces only: Note [Own fake kernels]
  (``_grouped_mm`` on CPU).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import _torch, config


def fakes_from_reals(mode: Any, values: Sequence[Any], static: bool, num_static: int = 0) -> list:
    """Fake versions of the tensors among ``values`` (in a fresh ``mode``;
    other values as they are).  Note [Plain fakes]: ``mode.from_tensor``
    describes a tensor in general (views, subclasses, storage sharing, grads,
    symbolic sizes): the CNN's 93 inputs took 14.5-15.6 ms of its cold first
    call that way, 6.7-7.3 ms this way.  A plain tensor -- a dense
    leaf, no view, at offset 0, no ``.grad``, no other input sharing its
    storage, static sizes -- has nothing of that to describe: its fake is
    an empty meta tensor of its sizes and strides (a storage of its extent,
    as from_tensor makes), wrapped as the mode wraps results, with its
    ``requires_grad`` (``tests/test_record.py`` compares the two).  Other
    tensors go through ``from_tensor``.  ``num_static``: the first values get
    static sizes even when not ``static`` (Note [Static weight shapes],
    pipeline.py)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    # any other kind of tensor among them (a subclass, sparse) might share
    # storage with a plain one unseen: then all go through from_tensor
    plain = static and mode.shape_env is None and \
        all(type(t) in _PLAIN_TYPES and t.layout == torch.strided for t in tensors)
    shared: set = set()
    if plain:
        seen: set = set()
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            (shared if ptr in seen else seen).add(ptr)
    out = []
    for k, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            out.append(v)
            continue
        fake = _plain_fake(mode, v, shared) if plain else None
        out.append(fake if fake is not None else
                   mode.from_tensor(v, static_shapes=static or k < num_static))
    return out


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_fake(mode: Any, t: torch.Tensor, shared: set) -> torch.Tensor | None:
    """Note [Plain fakes]; None for a tensor that is not plain."""
    if not t.is_leaf or t._is_view() or t.grad is not None or t.storage_offset() != 0 or \
            t.is_conj() or t.is_neg() or t.is_quantized or t.is_inference() or \
            t.device.type == "meta" or t._has_symbolic_sizes_strides or \
            _torch.is_functorch_wrapped(t) or \
            t.untyped_storage().data_ptr() in shared:
        return None
    fake = _torch.empty_fake(mode, t.shape, t.stride(), t.dtype, t.device)
    if type(t) is torch.nn.Parameter:
        fake._is_param = True  # as from_tensor marks a parameter's fake
    return fake.requires_grad_(t.requires_grad) if t.requires_grad else fake


# ---------------------------------------------------------------- a memo of fake results

# Note [A memo of fake results]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Every op the light tracer records is then run by the fake mode, for the
# sizes and strides of its results.  The mode keeps a cache of its own, but
# a hit there cost ~150 us (its key walks the arguments with pytree and
# describes each fake tensor in full), and it never keeps an op with several
# results (``native_layer_norm``, ``convolution_backward``): those run their
# Python meta function every time.  An 8-layer transformer repeats each op 8
# times.  So the tracer keeps a memo of its own, in front of the mode
# (``memoized``): the key is the op, the values the fake mode's key also
# holds (default dtype and device, inference mode), and per argument its
# type and value, or for a fake tensor its sizes, strides, offset, storage
# bytes, dtype, device, conj/neg bits, requires_grad and inference flag.  An
# entry says, for each result, whether it is an input itself, a view of an
# input's storage (sizes, strides, offset) or fresh storage (sizes,
# strides); a hit rebuilds the results without a dispatch (a fresh one as
# ``empty_fake``, a view as the fake mode's cache rebuilds views).  A key
# the memo has not seen goes to the fake mode with the mode's cache off: the
# memo keeps the result, and the ops the mode runs for it (a decomposition's)
# seldom repeat, while making a cache key and entry costs more than a hit
# saves.  Python calls in the trace of a cold first call: MLP 43.3k -> 31.1k,
# CNN 201.7k -> 158.7k, transformer 381.1k -> 245.1k.
#
# Only what a key fully determines is kept: aten ops that mutate nothing,
# have no data-dependent or dynamic-shaped result, and return tensors;
# static sizes (no ShapeEnv), every tensor argument a fake of this mode
# without a constant, every result a strided fake of this mode, not
# requiring grad, without conj/neg bits, fresh results at offset 0 with the
# storage ``empty_strided`` would give them and none shared, a result of an
# input's storage only when no other input has that storage (else which
# input it comes from is unknown); else the key is marked and goes to the
# fake mode every time.  Under ``config.debug_assert`` every hit is checked
# against the fake mode's own result (``_check_rebuilt``); the fuzz test
# runs that way.

def memoized(run: Any, mode: Any) -> Any:
    """``run`` (``_torch.fake_dispatcher``'s function for ``mode``) behind
    Note [A memo of fake results]; ``run`` itself for a mode with symbolic
    sizes (or one that runs real tensors alongside)."""
    if run is None or mode.shape_env is not None or \
            getattr(mode, "propagate_real_tensors", False):
        return run

    def memo_run(func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        ok = _MEMOIZABLE.get(func)
        if ok is None:
            ok = _MEMOIZABLE[func] = _memoizable(func)
        if not ok or not _torch.fake_mode_is_next(mode):
            return run(func, types, args, kwargs)
        tensors: list = []
        key = _key(func, args, kwargs, mode, tensors)
        if key is None:
            return run(func, types, args, kwargs)
        entry = _MEMO.get(key)
        if entry is None:
            out = run(func, types, args, kwargs, uncached=True)
            if len(_MEMO) >= _MEMO_LIMIT:
                _MEMO.clear()
            _MEMO[key] = _entry(out, tensors, mode)
            return out
        if entry is _NOT_KEPT:
            return run(func, types, args, kwargs)
        out = _rebuild(entry, tensors, mode)
        if config.debug_assert:
            _check_rebuilt(func, out, run(func, types, args, kwargs, uncached=True), tensors)
        return out

    return memo_run


_MEMO: dict = {}       # key -> entry, or _NOT_KEPT
_MEMO_LIMIT = 1 << 14  # entries (a few hundred bytes each); then it starts again
_NOT_KEPT = object()
_MEMOIZABLE: dict = {}  # op -> whether its results may be kept
_PLAIN_VALUES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device,
                           torch.memory_format, torch.layout))
_SAME, _VIEW, _FRESH = range(3)  # what an entry says of a result


def _memoizable(func: Any) -> bool:
    if not isinstance(func, _torch.OpOverload) or func.namespace != "aten" or \
            func in _torch.FakeTensorMode.lift_fns:
        return False
    tags = func.tags
    if func._schema.is_mutable or torch.Tag.dynamic_output_shape in tags or \
            torch.Tag.data_dependent_output in tags or torch.Tag.inplace_view in tags:
        return False
    for returned in func._schema.returns:
        t = returned.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.ListType):
            t = t.getElementType()
        if not isinstance(t, torch.TensorType):
            return False
    return True


def _key(func: Any, args: Any, kwargs: Any, mode: Any, tensors: list) -> tuple | None:
    """The memo's key (None for a call it does not keep); the fake tensors
    among the arguments are appended to ``tensors``, in order."""
    key = [func, torch.get_default_dtype(), _torch.default_device(),
           torch.is_inference_mode_enabled()]
    if not _describe(args, key, mode, tensors):
        return None
    if kwargs:
        key.append(tuple(kwargs))
        if not _describe(kwargs.values(), key, mode, tensors):
            return None
    return tuple(key) if tensors else None


def _describe(values: Any, key: list, mode: Any, tensors: list) -> bool:
    for v in values:
        t = type(v)
        if t is _torch.FakeTensor:
            if v.fake_mode is not mode or v.constant is not None or v.layout != torch.strided:
                return False
            tensors.append(v)
            key.append((v.shape, v.stride(), v.storage_offset(),
                        v.untyped_storage().nbytes(), v.dtype, v.fake_device, v.is_conj(),
                        v.is_neg(), v.requires_grad, v.is_inference()))
        elif t in _PLAIN_VALUES:
            key.append(t)  # 1 and 1.0 are equal keys, but promote differently
            key.append(v)
        elif t is list or t is tuple:
            key.append(len(v))
            if not _describe(v, key, mode, tensors):
                return False
        else:  # a SymInt, a Generator, a real tensor ...
            return False
    return True


def _entry(out: Any, tensors: list, mode: Any) -> Any:
    """What the memo keeps of ``out`` (Note [A memo of fake results]), or _NOT_KEPT."""
    outs = (out,) if type(out) is _torch.FakeTensor else out
    if type(outs) not in (tuple, list):
        return _NOT_KEPT
    storages: dict = {}  # storage -> the one input of it; None when several
    for i, t in enumerate(tensors):
        storage = _torch.live_storage_key(t)
        storages[storage] = None if storage in storages else i
    fresh: set = set()
    described = []
    for o in outs:
        if o is None:
            described.append(None)
            continue
        if type(o) is not _torch.FakeTensor or o.fake_mode is not mode or \
                o.constant is not None or o.layout != torch.strided or o.is_conj() or \
                o.is_neg() or o.requires_grad:
            return _NOT_KEPT
        storage = _torch.live_storage_key(o)
        meta = (tuple(o.shape), o.stride(), o.storage_offset(), o.dtype, o.fake_device)
        if storage in storages:
            base = storages[storage]
            if base is None:  # several inputs have that storage: which one is unknown
                return _NOT_KEPT
            described.append((_SAME, base) if o is tensors[base] else (_VIEW, base, *meta))
        elif storage in fresh or o.storage_offset() != 0 or \
                o.untyped_storage().nbytes() != _extent(o):
            return _NOT_KEPT
        else:
            fresh.add(storage)
            described.append((_FRESH, *meta))
    kind = None if type(out) is _torch.FakeTensor else type(out)
    return kind, tuple(described)


def _extent(t: torch.Tensor) -> int:
    """The bytes ``empty_strided`` gives a tensor of ``t``'s sizes and strides."""
    if any(s == 0 for s in t.shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


def _rebuild(entry: Any, tensors: list, mode: Any) -> Any:
    """The results an entry describes, over this call's fake ``tensors``."""
    kind, described = entry
    outs = []
    for d in described:
        if d is None:
            outs.append(None)
        elif d[0] == _FRESH:
            _, shape, stride, _offset, dtype, device = d
            outs.append(_torch.empty_fake(mode, shape, stride, dtype, device))
        elif d[0] == _VIEW:
            _, base, shape, stride, offset, dtype, device = d
            outs.append(_torch.fake_view(mode, tensors[base], shape, stride, offset,
                                         dtype, device))
        else:
            outs.append(tensors[d[1]])
    return outs[0] if kind is None else kind(outs)


def _check_rebuilt(func: Any, mine: Any, theirs: Any, tensors: list) -> None:
    """Under ``config.debug_assert``: a result rebuilt from the memo is what
    the fake mode makes (metadata, and which input's storage it shares)."""
    def describe(out):
        outs = (out,) if isinstance(out, torch.Tensor) else out
        inputs = [_torch.live_storage_key(t) for t in tensors]
        return type(out), [None if o is None else (
            tuple(o.shape), o.stride(), o.storage_offset(), o.dtype, o.device, o.is_conj(),
            o.is_neg(), o.requires_grad, type(o),
            next((i for i, t in enumerate(tensors) if t is o), None),
            next((i for i, k in enumerate(inputs) if k == _torch.live_storage_key(o)), None))
            for o in outs]
    if describe(mine) != describe(theirs):
        raise AssertionError(f"aotgrad's memo of fake results rebuilt {func} as "
                             f"{describe(mine)}; the fake mode makes {describe(theirs)}")


# ---------------------------------------------------------------- own fake kernels

# Note [Own fake kernels]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# A few ops have a fake (meta) kernel in torch that does not describe what
# their real kernel does on some device.  aotgrad gives those a fake kernel
# of its own (``_torch.FAKE_KERNELS``), which the fake mode follows only while
# aotgrad traces with it: ``_torch.tracing_context`` sets the mode's
# ``dispatch`` to one that asks those kernels first, and puts it back after.
# Nothing changes in torch's tables, so a user's own fake tensors (or
# torch.compile's tracing before aotgrad gets the graph) still see torch's
# kernels.  One of aotgrad's returns NotImplemented for anything it does not
# describe exactly, which goes on to torch's kernel and its errors.  The graph
# still calls the op itself: the values are the real kernel's.  (Fake
# propagation outside aotgrad's tracing -- an inductor compile of the graph,
# a graph loaded from the disk cache for a compiler other than nop -- uses
# torch's kernels.)
#
# * ``aten._grouped_mm`` on CPU (the experts of transformers' MoE models:
#   Mixtral, Qwen2-MoE, Qwen3-MoE).  torch 2.13's meta kernel mirrors the
#   CUDA kernel: it demands bfloat16 (the CPU kernel computes float32,
#   float16 and bfloat16) and, on a build without CUDA, makes its result
#   contiguous, where the CPU kernel pads the last dimension's stride to 16
#   bytes ((10, 6) float32 -> stride (8, 1)).  aotgrad's kernel gives the CPU
#   kernel's result: its size by the op's four layouts, the dtype of its
#   inputs, that padded stride (checked against the real kernel for the four
#   layouts and three dtypes: tests/test_fake_kernels.py).
# * ``aten.view`` of a tensor with a zero stride (an expand): torch's fake
#   rule makes some views eager refuses; aotgrad's asks the meta kernel,
#   eager's own stride computation, and raises its error (the rest goes on
#   to torch's rule).

def _grouped_mm_cpu(mode: Any, mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None,
                    out_dtype: Any = None) -> Any:
    """Note [Own fake kernels]: the result of ``aten._grouped_mm`` on CPU tensors."""
    tensors = [t for t in (mat_a, mat_b, offs) if t is not None]
    if bias is not None or not all(type(t) is _torch.FakeTensor and t.fake_mode is mode and
                                   t.device.type == "cpu" for t in tensors) or \
            mat_a.dtype != mat_b.dtype or mat_a.dtype not in _GROUPED_MM_DTYPES or \
            out_dtype not in (None, mat_a.dtype):
        return NotImplemented
    dims = (mat_a.dim(), mat_b.dim())
    if dims == (3, 3):
        if offs is not None:
            return NotImplemented
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(2)]   # one product per group
    elif offs is None or offs.dim() != 1 or offs.dtype != torch.int32:
        return NotImplemented
    elif dims == (2, 3):
        size = [mat_a.size(0), mat_b.size(2)]     # a's rows in groups, a matrix of b each
    elif dims == (3, 2):
        size = [mat_a.size(1), mat_b.size(1)]     # b's columns in groups
    elif dims == (2, 2):
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]   # the contraction in groups
    else:
        return NotImplemented
    per_row = 16 // mat_a.dtype.itemsize          # the last dim's stride: padded to 16 bytes
    row = (size[-1] + per_row - 1) // per_row * per_row
    stride = [size[1] * row, row, 1] if len(size) == 3 else [row, 1]
    return _torch.empty_fake(mode, size, stride, mat_a.dtype, mat_a.device)


_GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_torch.FAKE_KERNELS[torch.ops.aten._grouped_mm.default] = _grouped_mm_cpu


def _view_checked(mode: Any, t: Any, shape: Any) -> Any:
    """Note [Own fake kernels]: eager's error for a view its strides cannot
    give, which torch's fake rule of ``view`` lets through (an expand viewed
    across its broadcast dimension: (2, 1, 3) with strides (0, 3, 1) as
    (1, 6) gets strides (0, 0), a tensor eager refuses to make)."""
    sizes, strides = t.shape, t.stride()
    if all(type(d) is int for d in (*sizes, *strides, *shape)) and 0 in strides:
        # a real meta tensor and the C++ kernel, not another fake or Python rule
        with _torch.no_dispatch(), _torch.no_python_dispatcher():
            torch.empty_strided(sizes, strides, dtype=t.dtype, device="meta").view(shape)
    return NotImplemented


_torch.FAKE_KERNELS[torch.ops.aten.view.default] = _view_checked
