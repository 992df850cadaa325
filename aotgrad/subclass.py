"""Tensor subclasses: the graphs see only plain tensors.

A traceable tensor subclass (``TwoTensor``, ``DTensor``, an FP8 or quantized
tensor ...) implements ``__tensor_flatten__`` (its inner tensor attributes
and a constant ``meta``) and ``__tensor_unflatten__`` (the inverse).  Inner
tensors may themselves be subclasses.

Note [Subclasses at the boundary]: aotgrad analyzes a program at the level
the user sees (a subclass input is one input; its mutations, aliasing and
autograd are the subclass's), but every graph takes and returns plain
tensors.  A ``Layout`` records, per tensor, the subclass tree: its type, the
``meta``, the inner attributes and the outer size/stride.  Crossing a graph
boundary flattens a tensor into its plain leaves (depth first, attribute
order) or rebuilds it from them:

    TwoTensor(TwoTensor(a, b), c)   <->   [a, b, c]
    layout: SubclassLayout(TwoTensor, None, ("a", "b"),
                           (SubclassLayout(TwoTensor, None, ("a", "b"), (None, None)), None))

The traced program rebuilds its subclass inputs from the graph's plain
placeholders and flattens its subclass outputs (trace.py); the runtime does the
same around the compiled graphs (runtime.py), so autograd sees the subclass
tensors, as in eager, and the compiled graphs see plain ones.  A tangent that
arrives at the backward with another layout than the one traced is coerced
to it by its own ``__coerce_same_metadata_as_tangent__`` where it has one,
else raises (``coerce_tangent``): the backward graph was traced for that layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from . import _torch


@dataclass(frozen=True)
class Opaque:
    """An inner attribute that is not a tensor (DTensor's ``device_mesh``):
    not a graph input; put back as it is when the subclass is rebuilt."""
    value: Any

    def structure(self) -> tuple:
        return ("opaque", hashable(self.value))


@dataclass(frozen=True)
class SubclassLayout:
    cls: type
    meta: Any                              # the constant of __tensor_flatten__
    attrs: tuple[str, ...]                 # inner tensor attributes, in flatten order
    inner: tuple["Layout | Opaque", ...]   # per attribute: its layout (None: plain)
    outer_size: tuple
    outer_stride: tuple

    @property
    def num_plain(self) -> int:
        return sum(num_plain(x) for x in self.inner)

    def structure(self) -> tuple:
        """What must match for a tensor to be flattened by this layout (not sizes)."""
        return (self.cls, hashable(self.meta), self.attrs,
                tuple(None if x is None else x.structure() for x in self.inner))

    def describe(self) -> str:
        inner = ", ".join(f"{a}={'Tensor' if x is None else type(x.value).__name__ if isinstance(x, Opaque) else x.describe()}"
                          for a, x in zip(self.attrs, self.inner))
        return f"{self.cls.__name__}({inner}; meta={self.meta!r})"


Layout = Optional[SubclassLayout]


def is_subclass(t: Any) -> bool:
    return _torch.is_wrapper_subclass(t)


def layout_of(t: Any) -> Layout:
    """The subclass tree of ``t`` (None for a plain tensor or a non-tensor)."""
    if not is_subclass(t):
        return None
    attrs, meta = t.__tensor_flatten__()
    inner = tuple(_inner_layout(getattr(t, a)) for a in attrs)
    return SubclassLayout(type(t), meta, tuple(attrs), inner, tuple(t.size()), tuple(t.stride()))


def _inner_layout(v: Any) -> "Layout | Opaque":
    return layout_of(v) if isinstance(v, torch.Tensor) else Opaque(v)


def layout_key(t: torch.Tensor) -> tuple | None:
    """Guard-key part of a tensor's subclass tree (None when plain)."""
    layout = layout_of(t)
    return None if layout is None else layout.structure()


def num_plain(layout: "Layout | Opaque") -> int:
    return 1 if layout is None else 0 if isinstance(layout, Opaque) else layout.num_plain


def plain_leaves(t: Any, out: list) -> None:
    """Append the plain tensors of ``t`` (``t`` itself when plain) to ``out``."""
    if is_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for a in attrs:
            v = getattr(t, a)
            if isinstance(v, torch.Tensor):
                plain_leaves(v, out)
    else:
        out.append(t)


def flatten_all(values: Sequence[Any]) -> list:
    out: list = []
    for v in values:
        plain_leaves(v, out)
    return out


def rebuild(layout: Layout, plains: Iterator, *, size: Any = None, stride: Any = None) -> Any:
    """The tensor of ``layout`` made of the next plain tensors of ``plains``.

    The outer size and stride are the traced ones (``size``/``stride``
    override them: the current ones when remapping a tensor in place).
    Note [Symbolic outer sizes]: a layout traced with symbolic sizes is
    rebuilt at run time with the size and stride of its first inner tensor
    (true of wrappers whose inner tensors are the outer tensor's shape)."""
    if layout is None:
        return next(plains)
    if isinstance(layout, Opaque):
        return layout.value
    inner = {a: rebuild(x, plains) for a, x in zip(layout.attrs, layout.inner)}
    if size is None and _is_symbolic(layout.outer_size + layout.outer_stride):
        first = _first_tensor(inner.values())
        if not _is_symbolic_value(first):  # at run time
            size, stride = first.size(), first.stride()
    return layout.cls.__tensor_unflatten__(
        inner, layout.meta, layout.outer_size if size is None else size,
        layout.outer_stride if stride is None else stride)


def _first_tensor(values: Any) -> Any:
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def check_rebuildable(t: Any) -> None:
    """Note [Symbolic outer sizes]: refuse a subclass output whose symbolic
    size is not its first inner tensor's (it could not be rebuilt right)."""
    if not is_subclass(t) or not _is_symbolic(tuple(t.shape) + tuple(t.stride())):
        return
    attrs, _ = t.__tensor_flatten__()
    first = _first_tensor(getattr(t, a) for a in attrs)
    same = first is not None and [str(v) for v in (*t.shape, *t.stride())] == \
        [str(v) for v in (*first.shape, *first.stride())]
    if not same:
        raise NotImplementedError(
            f"aotgrad: a {type(t).__name__} output has symbolic size {tuple(t.shape)} that is "
            "not the size of its inner tensor; such outputs can only be compiled with static "
            "shapes (dynamic=False, or without marking the sizes dynamic).")
    for a in attrs:
        check_rebuildable(getattr(t, a))


def _is_symbolic(values: tuple) -> bool:
    return any(isinstance(v, _torch.sym_types) for v in values)


def _is_symbolic_value(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and _is_symbolic(tuple(t.shape))


def rebuild_list(layouts: Sequence[Layout], plains: Sequence[Any]) -> list:
    """One tensor per layout, from the plain tensors in order.  A tensor whose
    plain slots are all None (a missing gradient) is None."""
    it = iter(plains)
    out = []
    for layout in layouts:
        if layout is None:
            out.append(next(it))
            continue
        parts = [next(it) for _ in range(layout.num_plain)]
        out.append(None if all(p is None for p in parts) else rebuild(layout, iter(parts)))
    return out


def storage_ptr(t: torch.Tensor) -> Any:
    """A key for the memory ``t`` lives in (for a subclass: its plain tensors')."""
    if is_subclass(t):
        leaves: list = []
        plain_leaves(t, leaves)
        return tuple(x.untyped_storage().data_ptr() for x in leaves)
    return t.untyped_storage().data_ptr()


# ---------------------------------------------------------------- functionalization

def to_functional(t: Any, *, detach_inner: bool = True) -> Any:
    """``_torch.to_functional`` of each plain tensor; a subclass input keeps
    its own requires_grad and leafness.  Its inner tensors are below autograd
    (detached) unless ``detach_inner`` is False (analysis: Note [Inner
    tensors that require grad], analyze.py)."""
    if not is_subclass(t):
        return _torch.to_functional(t)
    out = map_plain(t, lambda p: _torch.to_functional(p.detach() if detach_inner else p))
    _torch.mirror_autograd_meta(t, out)
    return out


def from_functional(t: Any) -> Any:
    return map_plain(t, _torch.from_functional) if is_subclass(t) else _torch.from_functional(t)


def all_plain(t: Any, pred: Callable[[torch.Tensor], bool]) -> bool:
    leaves: list = []
    plain_leaves(t, leaves)
    return all(pred(x) for x in leaves)


def is_fake(t: Any) -> bool:
    return any_plain(t, lambda x: isinstance(x, _torch.FakeTensor)) if is_subclass(t) \
        else isinstance(t, _torch.FakeTensor)


# ---------------------------------------------------------------- the boundary

@dataclass(frozen=True)
class Boundary:
    """Layouts where a compiled program meets its graphs (Note [Subclasses at
    the boundary]).  Only made when some input, output or gradient is a
    subclass; plain programs have no Boundary and pay nothing."""
    inputs: tuple[Layout, ...]      # per graph input
    outputs: tuple[Layout, ...]     # per graph output (Note [What the graph returns])
    grads: tuple[Layout, ...] = ()  # per graph input: its gradient's (joint graphs)

    def plain_count(self, layouts: Sequence[Layout]) -> int:
        return sum(num_plain(x) for x in layouts)

    def plain_indices(self, i: int) -> range:
        """The plain graph inputs of graph input ``i``."""
        start = self.plain_count(self.inputs[:i])
        return range(start, start + num_plain(self.inputs[i]))

    def output_ranges(self) -> list[range]:
        out, start = [], 0
        for x in self.outputs:
            out.append(range(start, start + num_plain(x)))
            start += num_plain(x)
        return out


def map_plain(t: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``t`` with ``fn`` applied to each plain tensor in it (same subclass tree)."""
    if not is_subclass(t):
        return fn(t)
    leaves: list = []
    plain_leaves(t, leaves)
    return rebuild(layout_of(t), iter([fn(x) for x in leaves]), size=t.size(), stride=t.stride())


def any_plain(t: Any, pred: Callable[[torch.Tensor], bool]) -> bool:
    leaves: list = []
    plain_leaves(t, leaves)
    return any(pred(x) for x in leaves)


class TangentLayoutMismatch(RuntimeError):
    pass


def _same_structure(t: torch.Tensor, expected: Layout) -> bool:
    got = layout_of(t)
    return (None if got is None else got.structure()) == \
        (None if expected is None else expected.structure())


def coerce_tangent(t: torch.Tensor, expected: Layout, position: int) -> torch.Tensor:
    """Note [Subclasses at the boundary]: the backward graph was traced for
    tangents with the layout of the forward output; another one cannot be
    flattened into its inputs.  A subclass gradient may say how to become
    one like the output (``__coerce_same_metadata_as_tangent__(meta,
    type)``, the protocol PyTorch's AOTAutograd calls: a ``DTensor`` to the
    output's placements, a wrapper to its inner tensor); else the error says
    what the gradient should be."""
    if _same_structure(t, expected):
        return t
    coerce = getattr(t, "__coerce_same_metadata_as_tangent__", None)
    if coerce is not None and is_subclass(t):
        want_type = torch.Tensor if expected is None else expected.cls
        want_meta = None if expected is None else expected.meta
        # the one-argument form, for subclasses that only change their own metadata
        coerced = coerce(want_meta) if type(t) is want_type else coerce(want_meta, want_type)
        if coerced is not None and _same_structure(coerced, expected):
            return coerced
    _raise_tangent_mismatch(t, expected, position)
    return t


def _raise_tangent_mismatch(t: torch.Tensor, expected: Layout, position: int) -> None:
    got = layout_of(t)
    want = "a plain tensor" if expected is None else expected.describe()
    have = "a plain tensor" if got is None else got.describe()
    raise TangentLayoutMismatch(
        "\nDuring the backward, we encountered a tensor subclass where we guessed its\n"
        "metadata incorrectly.\n\n"
        f"aotgrad: the gradient of output {position} is {have}, but the backward was "
        f"compiled for {want} (the layout of the forward output). Make the gradient "
        "have the output's subclass structure, or compile the code that produces it too.")


def hashable(value: Any) -> Any:
    """``value`` itself when hashable, else a key by identity (guard keys, layouts)."""
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))
