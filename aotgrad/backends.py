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

from . import _torch, graph_inputs
from .api import aot_module_simplified
from .partition import min_cut_rematerialization_partition
from .compile import nop

__all__ = ["aot_eager", "inductor"]

_log = logging.getLogger(__name__)

_TORCH_DEFAULTS = {"partition_fn": min_cut_rematerialization_partition,
                   "keep_inference_input_mutations": True}


def aot_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
              options: dict | None = None, **kwargs: Any) -> Callable:
    """Trace and partition with aotgrad, run the ATen graphs as Python (``nop``)."""
    if graph_inputs.is_nested(example_inputs):  # Note [Nested graph inputs]
        return graph_inputs.compile_flattened(functools.partial(
            aot_eager, mode=mode, options=options, **kwargs), gm, example_inputs)
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
    if graph_inputs.is_nested(example_inputs):  # Note [Nested graph inputs]
        return graph_inputs.compile_flattened(functools.partial(
            inductor, mode=mode, options=options, **kwargs), gm, example_inputs)
    patches, device_index = _torch.inductor_mode_options(mode, options)
    compile_graph = functools.partial(_torch.inductor_compile, config_patches=patches,
                                      device_index=device_index)
    settings: dict[str, Any] = {
        **_TORCH_DEFAULTS,
        "fw_compiler": functools.partial(compile_graph, is_backward=False),
        "bw_compiler": functools.partial(compile_graph, is_backward=True),
        "inference_compiler": functools.partial(compile_graph, is_inference=True),
        "decompositions": _torch.inductor_decompositions(),
        "pre_grad_passes": _torch.inductor_pre_grad_passes,  # Note [Inductor's graph passes]
    }
    settings.update(kwargs)
    settings["partition_fn"] = JointPassesFirst(settings["partition_fn"])
    # dynamo guards what aot_module_simplified would check (Note [Calls unlike the example])
    return aot_module_simplified(gm, example_inputs, **settings, _caller_guards=True)


class JointPassesFirst:
    """A partitioner that runs inductor's joint-graph passes first.

    Note [Inductor's graph passes]: inductor expects the graphs it compiles to
    have been through its own FX passes, which ``compile_fx`` runs around
    AOTAutograd and ``compile_fx_inner`` (all aotgrad calls) does not: the
    pre-grad passes over dynamo's graph, and the joint-graph passes over the
    joint graph before it is partitioned (over the graph itself for
    inference).  The joint passes turn ``rand``-family ops (dropout) into
    inductor's seeded random ops, which are the only ones its lowering takes
    (without them every program with dropout fails to compile), and rewrite
    patterns such as attention into fused kernels.  The backend ``inductor``
    runs both at the same points as ``compile_fx``: pre-grad as
    ``aot_module_simplified(pre_grad_passes=)``, joint in
    this partitioner (whatever partitioner is configured), inference in
    ``_torch.inductor_compile``.  The seeded random ops are pure functions of
    their seed, so a partitioner may recompute them.
    """

    def __init__(self, partition_fn: Callable):
        self.partition_fn = partition_fn
        inner = getattr(partition_fn, "__qualname__", type(partition_fn).__name__)
        self.__qualname__ = f"JointPassesFirst({inner})"  # part of the cache key

    def __call__(self, joint_gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        return self.partition_fn(_torch.inductor_joint_passes(joint_gm), joint_inputs, **kwargs)
