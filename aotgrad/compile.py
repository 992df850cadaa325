"""Stage 6 — compile: hand each graph to the user's compiler.

A compiler takes ``(gm, example_inputs)`` (fake tensors) and returns a
callable.  aotgrad always calls compiled graphs *boxed*: with one list of
arguments that the callee may clear, so inputs die as early as possible.  A
compiler that returns an unboxed callable is adapted with ``make_boxed_func``.

While a compiler runs, ``get_aot_compilation_context()`` tells which graph it
is compiling (``"0_forward"``, ``"0_backward"``, ``"1_inference"``: the
number of the compiled program, then its role, as PyTorch names them), the
model's name and how many graphs were compiled before;
``get_aot_graph_name()`` joins them (``"model__0_forward_0"``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _torch, config
from .check import checked_first_call
from .codegen import fresh_outputs, graph_function, reads_storage_offsets, stride_free_inputs
from .missing import (CUSTOM_BACKWARD_META, REACH_META, GradientsLeftNone, MissingTangents,
                      absorbing_tangents, without)
from .partition import Partitioned
from .views import is_view_op

Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable]


def make_boxed_func(f: Callable) -> Callable:
    """Adapt ``f(*args)`` to the boxed convention ``g(args_list)``."""
    def g(args):
        return f(*args)

    g._boxed_call = True  # type: ignore[attr-defined]
    return g


def make_boxed_compiler(compiler: Compiler) -> Compiler:
    """Wrap a compiler so that what it returns is called boxed."""
    def boxed_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return ensure_boxed(compiler(gm, example_inputs))

    boxed_compiler.__name__ = getattr(compiler, "__name__", "boxed_compiler")
    return boxed_compiler


_graph_log = logging.getLogger("aotgrad.graphs")


def logged(compiler: Compiler) -> Compiler:
    """``compiler``, the graphs it is given logged first (``aot_function``'s
    ``enable_log``): to the ``aotgrad.graphs`` logger at DEBUG level, under
    the graph's name (``get_aot_graph_name``)."""
    def logging_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if _graph_log.isEnabledFor(logging.DEBUG):
            _graph_log.debug("%s\n%s", get_aot_graph_name(),
                             gm.print_readable(print_output=False))
        return compiler(gm, example_inputs)

    logging_compiler.__name__ = getattr(compiler, "__name__", "compiler")
    logging_compiler.__wrapped__ = compiler  # type: ignore[attr-defined]
    return logging_compiler


def ensure_boxed(f: Callable) -> Callable:
    return f if getattr(f, "_boxed_call", False) else make_boxed_func(f)


def nop(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The compiler that compiles nothing: runs the graph as Python, boxed
    (Note [Graphs as plain functions] in codegen.py)."""
    run = graph_function(gm)
    run._boxed_call = True  # type: ignore[attr-defined]
    run.fresh_outputs = fresh_outputs(gm)  # type: ignore[attr-defined]
    run.offset_free = not reads_storage_offsets(gm)  # type: ignore[attr-defined]
    run.stride_free = stride_free_inputs(gm)  # type: ignore[attr-defined]
    run.updated_in_place = run.__aotgrad_updated__  # type: ignore[attr-defined]
    run.bumps_versions = True  # type: ignore[attr-defined]  # Note [Versions of inputs written in the graph]
    return run


# ---------------------------------------------------------------- compilation context

_graph_being_compiled: list[str] = []
_model_name: str = "model"
_graph_counter = itertools.count()
_program_ids = itertools.count()   # one number per compiled program (torch's aot_id)
_nth_graph: int = 0


def get_aot_compilation_context() -> tuple[list[str], str, int]:
    """``(graphs being compiled, model name, number of graphs compiled before)``;
    a graph's name is ``f"{program number}_{role}"``, the role ``forward``,
    ``backward`` or ``inference``."""
    return list(_graph_being_compiled), _model_name, _nth_graph


def get_aot_graph_name() -> str:
    """The name of the graph being compiled: ``model__0_forward_3``."""
    return f"{_model_name}__{'_'.join(_graph_being_compiled)}_{_nth_graph}"


get_graph_being_compiled = get_aot_graph_name


def graph_role(name: str) -> str:
    """``"forward"`` of ``"0_forward"``."""
    return name.split("_", 1)[1]


def set_model_name(name: str) -> None:
    global _model_name
    _model_name = name


@contextlib.contextmanager
def compiling(graph_name: str, program: int):
    global _nth_graph
    _graph_being_compiled[:] = [f"{program}_{graph_name}"]
    try:
        with _torch.aot_graph_name_in_tracing_context(list(_graph_being_compiled)):
            yield
    finally:
        _graph_being_compiled.clear()
        _nth_graph = next(_graph_counter) + 1


# ---------------------------------------------------------------- the stage

@dataclass(frozen=True)
class CompiledGraphs:
    forward: Callable                  # boxed; the inference graph when backward is None
    backward: Callable | None          # boxed
    num_fwd_outputs: int
    num_saved_tensors: int = 0
    num_saved_symints: int = 0
    saved_hooks_inlined: bool = False
    repeated_outputs: tuple[int, ...] = ()    # Note [Distinct outputs]
    # per missing set, the gradients eager leaves None (Note [Gradients that
    # eager leaves None], missing.py)
    left_none: Callable[[tuple], frozenset[int]] | None = None
    views_only: bool = False           # an inference graph that only takes views
    # graph outputs (forward or inference) the compiled graph never returns a
    # view at (known for nop's plain functions: codegen.fresh_outputs)
    fresh_outputs: frozenset[int] = frozenset()
    # no graph reads its inputs' storage offsets (known for nop's plain
    # functions: Note [Offsets nobody reads], runtime.py)
    offset_free: bool = False
    # tangents (by index) the backward takes as they come, not made contiguous
    # (Note [Tangents as they come], runtime.py)
    stride_free_tangents: frozenset[int] = frozenset()
    # forward (or inference) outputs the compiled graph computed into their
    # input already: no write-back (Note [Updates in place], runtime.py)
    updated_in_place: frozenset[int] = frozenset()
    # its writes to inputs are ATen ops, which move their version counters
    # (Note [Versions of inputs written in the graph], runtime.py)
    bumps_versions: bool = False
    # when the backward may write over saved values: () -> a backward that
    # does not, for backward(retain_graph=True) (Note [Donated buffers])
    keeping_backward: Callable[[], Callable] | None = None
    # the backward when tangents are missing (Note [Missing tangents], missing.py)
    missing: MissingTangents | None = None


def repeated_outputs(gm: fx.GraphModule, num_outputs: int) -> tuple[int, ...]:
    """Note [Distinct outputs]: positions among the first ``num_outputs`` graph
    outputs whose value is an input of the graph or a value returned at an
    earlier position.  An autograd.Function must return distinct tensors that
    are not its inputs, so the runtime replaces those by new tensor objects.
    (A symbolic size returned, maybe an input of the graph, is a plain int.)"""
    seen: set = set()
    positions = []
    for k, n in enumerate(gm.graph.output_node().args[0][:num_outputs]):
        if isinstance(n, fx.Node) and (n in seen or _is_graph_input(n)) and \
                isinstance(n.meta.get("val"), torch.Tensor):
            positions.append(k)
        seen.add(n)
    return tuple(positions)


def _stride_free_tangents(bw_gm: fx.GraphModule, bw: Callable) -> frozenset[int]:
    from .descriptors import DESC, Tangent

    free = getattr(bw, "stride_free", frozenset())
    return frozenset(p.meta[DESC].index
                     for k, p in enumerate(bw_gm.graph.find_nodes(op="placeholder"))
                     if k in free and isinstance(p.meta.get(DESC), Tangent))


def _is_graph_input(n: fx.Node) -> bool:
    """The node's runtime value is a graph input (itself, or after copy_/set_ into it)."""
    while n.op == "call_function" and getattr(n.target, "_schema", None) is not None and \
            n.target._schema.name in ("aten::copy_", "aten::set_") and n.args:
        n = n.args[0]
    return n.op == "placeholder"


def _with_tensor_meta(gm: fx.GraphModule, compiler: Compiler) -> fx.GraphModule:
    """``node.meta["tensor_meta"]`` as make_fx writes it, for compilers that
    read it rather than ``meta["val"]``.  The light tracer does not write it
    (Note [A light tracer]); ``nop`` does not read it."""
    if getattr(compiler, "__wrapped__", compiler) is not nop:  # logged(nop): nop
        for n in gm.graph.nodes:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and "tensor_meta" not in n.meta:
                n.meta["tensor_meta"] = _torch.tensor_metadata(val)
    return gm


def placeholder_values(gm: fx.GraphModule) -> list[Any]:
    return [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]


def compile_inference(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      compiler: Compiler, num_outputs: int) -> CompiledGraphs:
    with compiling("inference", next(_program_ids)):
        fn = ensure_boxed(compiler(_with_tensor_meta(gm, compiler), list(example_inputs)))
    views_only = all(n.op != "call_function" or n.target is operator.getitem or
                     is_view_op(n.target) for n in gm.graph.nodes)
    return CompiledGraphs(checked_first_call(fn, gm), None, num_outputs, views_only=views_only,
                          fresh_outputs=getattr(fn, "fresh_outputs", frozenset()),
                          offset_free=getattr(fn, "offset_free", False),
                          updated_in_place=getattr(fn, "updated_in_place", frozenset()),
                          bumps_versions=getattr(fn, "bumps_versions", False))


# Note [Donated buffers]
# ~~~~~~~~~~~~~~~~~~~~~~~
# With config.donated_buffer (torch's default), the backward compiler may
# reuse the memory of saved values it has read for its own temporaries
# (inductor's DonatedBuffer): the backward graph's meta lists those inputs.
# Only values nothing else can see are listed: made by the forward, not an
# input, not sharing storage with an output, an input (also one that takes
# its storage in the graph: ``x.data = y``), another saved value or a
# gradient, and not saved through saved-tensor hooks (inlined, or run
# at run time: Note [Which hooks are inlined], saved_hooks.py).  A backward so compiled
# cannot run twice over the same saved values: a backward called with
# retain_graph (or create_graph) runs a second compilation of the graph that
# donates nothing, made at its first such call.  (Torch compiles the backward
# at its first call, donating unless that call keeps the graph, and raises if
# a later call keeps it: aotgrad takes every program torch takes, and those.)
def donated_inputs(parts: Partitioned) -> list[int]:
    """The backward inputs (indices) its compiler may overwrite."""
    if not config.donated_buffer or parts.saved_hooks_inlined or parts.saved_hooks_at_runtime:
        return []
    outs = list(parts.fw_gm.graph.output_node().args[0])
    start = parts.num_fwd_outputs
    saved = outs[start:start + parts.num_saved_tensors]
    seen = list(parts.fw_gm.graph.find_nodes(op="placeholder")) + outs[:start] + saved

    def storage(n: Any) -> Any:
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        return _torch.storage_of(v) if isinstance(v, torch.Tensor) and \
            v.layout == torch.strided and not _torch.is_wrapper_subclass(v) else None

    # a value an input takes the storage of in the graph (``x.data = y``: set_)
    # is the input's memory from then on
    seen += [n.args[1] for n in parts.fw_gm.graph.nodes if n.op == "call_function" and
             getattr(getattr(n.target, "_schema", None), "name", None) == "aten::set_" and
             len(n.args) > 1 and isinstance(n.args[1], fx.Node)]
    counts: dict[Any, int] = {}
    for n in seen:
        if (st := storage(n)) is not None:
            counts[st] = counts.get(st, 0) + 1
    bw_inputs = list(parts.bw_gm.graph.find_nodes(op="placeholder"))
    returned = {storage(n) for n in parts.bw_gm.graph.output_node().args[0]} - {None}
    return [k for i, n in enumerate(saved)
            if isinstance(n, fx.Node) and n.op == "call_function" and
            (st := storage(n)) is not None and counts[st] == 1 and
            storage(bw_inputs[k := parts.num_saved_symints + i]) not in returned]


def _compiled_when_needed(program: int, bw_gm: fx.GraphModule,
                          bw_compiler: Compiler) -> Callable[[], Callable]:
    made: list[Callable] = []

    def get() -> Callable:
        if not made:
            with compiling("backward", program):
                made.append(ensure_boxed(bw_compiler(bw_gm, placeholder_values(bw_gm))))
        return made[0]

    return get


class _Donated:
    """Stands for torch's forward metadata, of which inductor reads only this."""

    def __init__(self, indices: list[int]):
        self.bw_donated_idxs = indices
        self.static_input_indices: list[int] = []


def compile_joint(parts: Partitioned, fw_compiler: Compiler, bw_compiler: Compiler) -> CompiledGraphs:
    """Compile the forward, then the backward, eagerly (not on first backward).

    Compiling both up front surfaces compiler errors at the first call, not in
    the middle of a training step, and lets the cache store both at once.
    """
    program = next(_program_ids)
    with compiling("forward", program):
        fw_gm = _with_tensor_meta(parts.fw_gm, fw_compiler)
        fw = ensure_boxed(fw_compiler(fw_gm, placeholder_values(fw_gm)))
    with compiling("backward", program):
        bw_gm = _with_tensor_meta(parts.bw_gm, bw_compiler)
        donated = donated_inputs(parts)
        if donated:
            bw_gm.meta[_torch.DONATED_INPUTS_META] = _Donated(donated)
        bw = bw_compiler(bw_gm, placeholder_values(bw_gm))
        keeping = None
        if getattr(bw, "donates_inputs", False):   # Note [Donated buffers]
            del bw_gm.meta[_torch.DONATED_INPUTS_META]
            keeping = _compiled_when_needed(program, bw_gm, bw_compiler)
        bw = ensure_boxed(bw)
    return CompiledGraphs(checked_first_call(fw, parts.fw_gm), bw, parts.num_fwd_outputs,
                          parts.num_saved_tensors,
                          parts.num_saved_symints, parts.saved_hooks_inlined,
                          repeated_outputs(parts.fw_gm, parts.num_fwd_outputs),
                          left_none=GradientsLeftNone(parts.bw_gm),
                          fresh_outputs=getattr(fw, "fresh_outputs", frozenset()),
                          offset_free=getattr(fw, "offset_free", False) and
                          getattr(bw, "offset_free", False),
                          stride_free_tangents=_stride_free_tangents(parts.bw_gm, bw),
                          updated_in_place=getattr(fw, "updated_in_place", frozenset()),
                          bumps_versions=getattr(fw, "bumps_versions", False),
                          keeping_backward=keeping,
                          missing=_missing_tangents(program, bw_gm, bw_compiler))


def _missing_tangents(program: int, bw_gm: fx.GraphModule,
                      bw_compiler: Compiler) -> MissingTangents | None:
    """Note [Missing tangents]: the backwards for missing tangents, compiled
    when a call misses them (None when zeros give eager's values)."""
    reach = None    # with a custom backward: which missing tangents may be symbolic zeros
    if bw_gm.meta.get(CUSTOM_BACKWARD_META, True):
        reach = bw_gm.meta.get(REACH_META)
        if reach is None:
            return None    # a custom Function's backward gets the zeros, as in eager
    absorbing = absorbing_tangents(bw_gm, custom=reach is not None)
    if not absorbing:
        return None

    def make(missing: frozenset[int], whole: bool) -> Callable | None:
        if reach is not None:    # Note [Tangents that reach no custom backward]
            missing, whole = reach.symbolic(missing), True
            if not missing & absorbing:
                return None
        gm = without(bw_gm, missing, whole, custom=reach is not None)
        if gm is None:
            return None
        with compiling("backward", program):
            gm = _with_tensor_meta(gm, bw_compiler)
            return ensure_boxed(bw_compiler(gm, placeholder_values(gm)))

    return MissingTangents(absorbing, make)
