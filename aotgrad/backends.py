"""Backends for ``torch.compile(fn, backend=...)`` built on aot_module_simplified.

    torch.compile(fn, backend=aotgrad.backends.aot_eager)   # graphs run as Python
    torch.compile(fn, backend=aotgrad.backends.inductor)    # graphs compiled by inductor

Dynamo captures a torch-level graph and hands it here with fake example
inputs; aotgrad traces the ATen forward/backward (or inference) graphs,
partitions them and compiles each with the backend's compiler.  torch's own
AOTAutograd is never involved: for ``inductor`` only inductor's *graph*
compiler (``compile_fx_inner``) is used, see ``_torch.inductor_compile``.

Defaults are those of torch's backends of the same names: the min-cut
partitioner (so ``config.activation_memory_budget`` applies) and
``keep_inference_input_mutations=True``.  Keyword arguments
(``functools.partial(aot_eager, partition_fn=...)``) go to
``aot_module_simplified`` and override them; an unknown one is a TypeError.
``torch.compile(mode=, options=)`` reach ``inductor`` as inductor settings
(``"reduce-overhead"``: CUDA graph trees, ``"max-autotune"`` ...); ``aot_eager``
ignores them with a warning, as torch's does.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import torch.fx as fx

from . import _torch
from .api import aot_module_simplified
from .budget import min_cut_rematerialization_partition
from .compile import nop

__all__ = ["aot_eager", "inductor"]

_log = logging.getLogger(__name__)

_TORCH_DEFAULTS = {"partition_fn": min_cut_rematerialization_partition,
                   "keep_inference_input_mutations": True}


def aot_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
              options: dict | None = None, **kwargs: Any) -> Callable:
    """Trace and partition with aotgrad, run the ATen graphs as Python (``nop``)."""
    if mode is not None or options is not None:
        _log.warning("aotgrad's aot_eager backend ignores mode=%r and options=%r (they are "
                     "inductor's settings)", mode, options)
    settings: dict[str, Any] = {
        **_TORCH_DEFAULTS,
        "fw_compiler": nop,
        "bw_compiler": nop,
        "inference_compiler": nop,
    }
    settings.update(kwargs)
    # dynamo guards what aot_module_simplified would check (Note [Calls unlike the example])
    return aot_module_simplified(gm, example_inputs, **settings, _caller_guards=True)


def inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
             options: dict | None = None, **kwargs: Any) -> Callable:
    """Trace and partition with aotgrad, compile each ATen graph with inductor.

    Graphs are traced with inductor's decomposition table (as inductor
    expects); pass ``decompositions=`` to change it.  ``mode`` / ``options``
    are ``torch.compile``'s, applied while inductor compiles each graph.
    """
    patches, device_index = _torch.inductor_mode_options(mode, options)
    compile_graph = functools.partial(_torch.inductor_compile, config_patches=patches,
                                      device_index=device_index)
    settings: dict[str, Any] = {
        **_TORCH_DEFAULTS,
        "fw_compiler": functools.partial(compile_graph, is_backward=False),
        "bw_compiler": functools.partial(compile_graph, is_backward=True),
        "inference_compiler": functools.partial(compile_graph, is_inference=True),
        "decompositions": _torch.inductor_decompositions(),
    }
    settings.update(kwargs)
    # dynamo guards what aot_module_simplified would check (Note [Calls unlike the example])
    return aot_module_simplified(gm, example_inputs, **settings, _caller_guards=True)
