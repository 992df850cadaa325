"""Backends for ``torch.compile(fn, backend=...)`` built on aot_module_simplified.

    torch.compile(fn, backend=aotgrad.backends.aot_eager)   # graphs run as Python
    torch.compile(fn, backend=aotgrad.backends.inductor)    # graphs compiled by inductor

Dynamo captures a torch-level graph and hands it here with fake example
inputs; aotgrad traces the ATen forward/backward (or inference) graphs,
partitions them and compiles each with the backend's compiler.  torch's own
AOTAutograd is never involved: for ``inductor`` only inductor's *graph*
compiler (``compile_fx_inner``) is used, see ``_torch.inductor_compile``.

Keyword arguments (``functools.partial(aot_eager, partition_fn=...)``) go to
``aot_module_simplified`` and override the backend's defaults.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

from . import _torch
from .api import aot_module_simplified
from .compile import nop

__all__ = ["aot_eager", "inductor"]


def aot_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Trace and partition with aotgrad, run the ATen graphs as Python (``nop``)."""
    settings: dict[str, Any] = {
        "fw_compiler": nop,
        "bw_compiler": nop,
        "inference_compiler": nop,
    }
    settings.update(kwargs)
    # dynamo guards what aot_module_simplified would check (Note [Calls unlike the example])
    return aot_module_simplified(gm, example_inputs, **settings, _caller_guards=True)


def _inductor_forward(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    return _torch.inductor_compile(gm, example_inputs, is_backward=False)


def _inductor_backward(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    return _torch.inductor_compile(gm, example_inputs, is_backward=True)


def _inductor_inference(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    return _torch.inductor_compile(gm, example_inputs, is_inference=True)


def inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Trace and partition with aotgrad, compile each ATen graph with inductor.

    Graphs are traced with inductor's decomposition table (as inductor
    expects); pass ``decompositions=`` to change it.
    """
    settings: dict[str, Any] = {
        "fw_compiler": _inductor_forward,
        "bw_compiler": _inductor_backward,
        "inference_compiler": _inductor_inference,
        "decompositions": _torch.inductor_decompositions(),
    }
    settings.update(kwargs)
    # dynamo guards what aot_module_simplified would check (Note [Calls unlike the example])
    return aot_module_simplified(gm, example_inputs, **settings, _caller_guards=True)
