"""Calling a module with its parameters and buffers replaced by the graph's inputs.

Note [Modules reachable under two names]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The entry points lift a module's parameters and buffers by
``named_parameters(remove_duplicate=False)``: a submodule registered twice
(``self.c = self.a``, a ``Sequential`` holding one layer twice) gives each
of its tensors two names, and two graph inputs.  Both names are one slot
(the same module's attribute): ``torch.func.functional_call`` with
``tie_weights=False`` sets the slot twice and, on the way out, restores it
from the first replacement -- leaving a fake tensor of the trace on the
caller's module.  So only the first name of each slot is replaced; the
inputs of the other names are not read by the graph (their gradients are
None; at run time they are the same tensor as the first name's, which gets
the whole gradient).

Note [Tensors a trace leaves on the module]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A forward that stores a tensor on its module (``self.h = y``,
``self.hist.append(y)``) runs once, while tracing: what it stores is a
tensor of the trace, not a value of any call, and using it later fails or
reads nothing real.  ``functional_call`` looks at the attributes of the
module tree after the call; one that now holds a traced tensor (directly or
in a list, tuple or dict) is put back as it was and the trace stops with an
error naming it (``torch.compile`` replays such writes; an ahead-of-time
graph cannot) -- but for the attributes torch's ``spectral_norm``, old
``weight_norm`` and pruning pre-hooks recompute at every call, which are put
back without an error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _torch


def functional_call(mod: nn.Module, state: tuple[dict, ...], args: tuple,
                    kwargs: dict | None = None, **options: Any) -> Any:
    """``torch.func.functional_call(mod, state, args, kwargs, tie_weights=False)``
    with one name per slot (Note [Modules reachable under two names])."""
    seen: set[tuple[int, str]] = set()
    once = []
    slots = []      # (owner, attribute, the tensor put there, its name)
    for names in state:
        kept = {}
        for name, value in names.items():
            prefix, _, attr = name.rpartition(".")
            try:
                owner = mod.get_submodule(prefix) if prefix else mod
            except AttributeError:   # not a submodule path: functional_call decides
                kept[name] = value
                continue
            slot = (id(owner), attr)
            if slot not in seen:
                seen.add(slot)
                kept[name] = value
                slots.append((owner, attr, value, name))
        once.append(kept)
    before = [(m, dict(vars(m))) for m in mod.modules()]
    rebound: list[str] = []

    def check_slots(module: nn.Module, args: Any, output: Any) -> None:
        # Note [Parameters and buffers rebound in forward]: still inside the call
        rebound.extend(name for owner, attr, value, name in slots
                       if _slot_value(owner, attr) is not value)

    handle = mod.register_forward_hook(check_slots)
    try:
        out = torch.func.functional_call(mod, tuple(once), args, kwargs, tie_weights=False,
                                         **options)
    finally:
        handle.remove()
    given = {id(v) for names in once for v in names.values()}
    _refuse_traced_tensors_left(mod, before, given)
    if rebound:
        raise TracedTensorStored(
            f"aotgrad: the module's forward assigns a new tensor to its parameter or buffer "
            f"{rebound[0]!r} ({type(mod).__name__}.{rebound[0]} = ...). The compiled call "
            f"cannot assign it at each call (the assignment would be lost: Note [Parameters "
            f"and buffers rebound in forward]). Update it in place instead "
            f"(self.{rebound[0].rpartition('.')[2]}.copy_(new) or an in-place op), or use "
            f"torch.compile.")
    return out


def _slot_value(owner: nn.Module, attr: str) -> Any:
    for table in (owner._parameters, owner._buffers):
        if attr in table:
            return table[attr]
    return owner.__dict__.get(attr)


# Note [Parameters and buffers rebound in forward]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A forward that assigns a new tensor to a parameter or buffer
# (``self.cache = self.cache + x``, ``self.register_buffer("cos", bigger)``)
# does it on the trace's stand-in, in the slot functional_call filled; on the
# way out functional_call puts the module's own tensor back and the
# assignment is lost -- every call would read the old buffer (functorch's
# aot_module does the same).  A forward hook on the root module, which runs
# inside the call, finds each slot that no longer holds the tensor put in,
# and the trace stops with an error naming it: in-place updates (``copy_``,
# ``add_``) are the graph's input mutations, applied at every call.


class TracedTensorStored(RuntimeError):
    """Note [Tensors a trace leaves on the module]: raised as it is (the
    program is not run eagerly to find eager's error: that would store again)."""


def _recomputed_attributes(m: nn.Module) -> set[str]:
    """Attributes a forward pre-hook of torch's recomputes from parameters at
    every call (``spectral_norm``'s, the old ``weight_norm``'s, pruning's):
    what the trace stores there is put back, with no error -- the module
    reads it only after the hook has set it again."""
    names = set()
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            names.add(hook.name)
        elif isinstance(hook, BasePruningMethod):
            names.add(hook._tensor_name)
    return names


def _refuse_traced_tensors_left(mod: nn.Module, before: list, given: set[int]) -> None:
    """Note [Tensors a trace leaves on the module]; ``given``: the ids of the
    tensors put in for the parameters and buffers, which a module may mirror
    in private attributes (an RNN's ``_flat_weights``) -- not values it
    computed; a public attribute holding one (``self.w = self.lin.weight``)
    would keep a trace tensor and is refused."""
    names = {id(m): name for name, m in mod.named_modules(remove_duplicate=False)}
    for m, attrs in before:
        recomputed = _recomputed_attributes(m) if m._forward_pre_hooks else set()
        for attr, value in list(vars(m).items()):
            if attr.startswith("_") and attr in ("_parameters", "_buffers", "_modules"):
                continue
            if attr in recomputed:
                if attr in attrs and attrs[attr] is not value:
                    setattr(m, attr, attrs[attr])
                continue
            # a module's private mirror of its parameters (an RNN's _flat_weights)
            # holds the tensors put in; anywhere else they count too
            mirrored = given if attr.startswith("_") else frozenset()
            if (attr in attrs and attrs[attr] is value and not isinstance(value, (list, dict))) \
                    or not _holds_traced_tensor(value, mirrored):
                continue
            if attr in attrs:
                setattr(m, attr, attrs[attr])
                if isinstance(value, list) and value is attrs[attr]:   # appended to
                    value[:] = [v for v in value if not _holds_traced_tensor(v, mirrored)]
                elif isinstance(value, dict) and value is attrs[attr]:
                    for k in [k for k, v in value.items() if _holds_traced_tensor(v, mirrored)]:
                        del value[k]
            else:
                delattr(m, attr)
            where = ".".join(filter(None, (type(mod).__name__, names.get(id(m)), attr)))
            raise TracedTensorStored(
                f"aotgrad: the module's forward stored a tensor on the module "
                f"({where}, {type(value).__name__}). An ahead-of-time trace runs the forward "
                f"once, so what is stored there would be a tensor of the trace, not this "
                f"call's value (Note [Tensors a trace leaves on the module]). Return the "
                f"tensor from forward instead, store it outside the compiled call, or use "
                f"torch.compile (which replays such writes).")


def _holds_traced_tensor(value: Any, given: set[int], depth: int = 0) -> bool:
    if _torch.is_traced_tensor(value):
        return id(value) not in given
    if depth < 3 and isinstance(value, (list, tuple)):
        return any(_holds_traced_tensor(v, given, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(_holds_traced_tensor(v, given, depth + 1) for v in value.values())
    return False
