"""Fake versions of a call's real inputs (the first stage's last step).

Note [Plain fakes] (``fakes_from_reals``): most inputs are plain tensors,
whose fakes need none of ``from_tensor``'s generality.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import _torch


def fakes_from_reals(mode: Any, values: Sequence[Any], static: bool) -> list:
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
    tensors go through ``from_tensor``."""
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
    for v in values:
        if not isinstance(v, torch.Tensor):
            out.append(v)
            continue
        fake = _plain_fake(mode, v, shared) if plain else None
        out.append(fake if fake is not None else mode.from_tensor(v, static_shapes=static))
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
