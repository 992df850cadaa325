"""The layout the backward graph takes each tangent in.

Note [Tangent strides]
~~~~~~~~~~~~~~~~~~~~~~
The backward graph is traced before any gradient exists, so the strides of
its tangents are a guess, and a compiler may rely on them (inductor's
kernels index their inputs by the strides they were compiled for).  The
runtime then gives the compiled backward each gradient in the layout it was
traced with.  The guess follows PyTorch's (``config.guess_tangent_strides_as_outputs``):

* on (the default): the tangent of a graph output has the output's strides
  (``x.t()``'s gradient is traced transposed, a channels-last convolution's
  channels-last), so a gradient that comes as its output is laid out (the
  usual case: autograd makes it from the output) is passed on untouched.
  Outputs whose elements overlap (``expand``) and outputs with symbolic
  sizes get their memory format instead, as below.  So do the plain tensors
  of a subclass output: torch makes the subclass contiguous in its memory
  format first, which for the usual wrappers makes each inner tensor so.
* off: the tangent is contiguous in the output's memory format (channels
  last for a 4-d channels-last output, channels last 3d for a 5-d one, else
  plain contiguous).

A gradient laid out otherwise is copied into the traced layout (same
values: ``restride``), or made contiguous in the traced memory format.
Strides of dimensions of size 1 are not compared: they address nothing
(inductor's own input check skips them too).  Missing gradients are zeros in
the traced layout.  Tangents no op of the backward is sensitive to are
passed as they come (Note [Tangents as they come], runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import _torch, config

_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
            "channels_last_3d": torch.channels_last_3d}
_NAMES = {v: k for k, v in _FORMATS.items()}


@dataclass(frozen=True)
class TangentLayout:
    """The traced layout of one (plain) tangent: exact ``stride`` (static
    sizes), else contiguous in ``memory_format`` (a name, so that a Signature
    pickles into the compile cache)."""
    stride: tuple[int, ...] | None = None
    memory_format: str = "contiguous"

    @property
    def format(self) -> torch.memory_format:
        return _FORMATS[self.memory_format]

    def is_contiguous_for(self, shape: Sequence[int] | None) -> bool:
        """Whether a plain contiguous tensor of ``shape`` (None: not known) is
        laid out so."""
        if self.stride is None:
            return self.memory_format == "contiguous"
        return shape is not None and all(type(d) is int for d in shape) and \
            same_strides(contiguous_strides(shape), self.stride, shape)


CONTIGUOUS = TangentLayout()


def guess(t: Any, *, of_subclass: bool = False) -> TangentLayout:
    """Note [Tangent strides]: the layout the tangent of ``t`` is traced in.
    ``of_subclass``: ``t`` is a plain tensor of a subclass output (only its
    memory format is guessed)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return CONTIGUOUS
    sizes, strides = tuple(t.shape), tuple(t.stride())
    static = all(type(d) is int for d in (*sizes, *strides))
    if config.guess_tangent_strides_as_outputs and static and not of_subclass and \
            not any(st == 0 and n > 1 for st, n in zip(strides, sizes)):
        return TangentLayout(strides)
    return TangentLayout(memory_format=_NAMES.get(_torch.suggest_memory_format(t),
                                                  "contiguous"))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(tuple(shape)):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def same_strides(got: Sequence[int], want: Sequence[int], shape: Sequence[int]) -> bool:
    """Equal strides, but where a dimension has one element (no stride used)."""
    return all(g == w or n == 1 for g, w, n in zip(got, want, shape))


def placeholder_strides(layout: TangentLayout, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The strides of the traced tangent (static ``shape``; None: contiguous)."""
    if layout.stride is not None:
        return layout.stride
    if layout.memory_format == "contiguous":
        return None
    return tuple(torch.empty(tuple(shape), device="meta", memory_format=layout.format).stride())


def empty(layout: TangentLayout, shape: Sequence[Any], dtype: torch.dtype,
          device: Any) -> torch.Tensor:
    """An uninitialised tensor laid out as the tangent is traced."""
    if layout.stride is not None:
        return torch.empty_strided(tuple(shape), layout.stride, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=layout.format)


def zeros(shape: Sequence[Any], dtype: torch.dtype, device: Any,
          layout: TangentLayout) -> torch.Tensor:
    """The gradient of an output autograd gave none for, in the traced layout."""
    return empty(layout, shape, dtype, device).zero_()


def restride(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` with ``stride`` (its values copied when it is laid out otherwise)."""
    if same_strides(t.stride(), stride, t.shape):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def coerce(t: torch.Tensor, layout: TangentLayout) -> torch.Tensor:
    """Note [Tangent strides]: ``t`` in the layout its tangent was traced in."""
    if layout.stride is not None:
        return restride(t, layout.stride)
    return t.contiguous(memory_format=layout.format)
