"""The pipeline: runs the stages in order for one call signature.

    flatten -> analyze -> trace -> partition -> compile -> runtime

Each stage is one module with one entry point; this module only threads their
dataclasses through and times them (``CompileReport``, shown by
``aotgrad explain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from . import _torch, config, hops, objects, stateless, subclass, tokens
from .analyze import Signature, analyze
from .check import check_graph
from .descriptors import DESC, Primal, Tangent
from .fakes import fakes_from_reals
from .missing import CUSTOM_BACKWARD_META, DYNAMO_FUNCTION_META, REACH_META
from .reuse import offered_values
from .compile import CompiledGraphs, Compiler, compile_inference, compile_joint
from .flatten import FlatInputs, flatten_inputs, make_flat_fn, select_graph_inputs
from .partition import STATIC_INPUTS_META, Partitioned, default_partition, descendants, partition
from .rebase import (AliasedMutatedInputs, RebasedFunction, plan_rebasing, rebased_inputs,
                     rebased_runtime)
from .codegen import INPUT_UPDATES_META, OFFSETS_READ_META
from .runtime import build_runtime, input_updates
from .higher_order import DifferentiableBackward, plan_higher_order
from .saved_hooks import inline_hooks, inlineable
from .views import alias_plans
from .values import (AnsweredFunction, offsets_read, GuardFailed, RandomRead, ValueReads, copy_for_eager,
                     record_reads, rng_kept, value_guarded)
from .record import TRACER_META, NeedsMakeFx
from .trace import SecondPass, TracedGraph, analyze_and_trace, one_pass_possible, trace


@dataclass(frozen=True)
class CompileOptions:
    fw_compiler: Compiler
    bw_compiler: Compiler | None = None
    partition_fn: Callable = default_partition
    decompositions: Mapping | None = None
    num_params_buffers: int = 0
    keep_inference_input_mutations: bool = False
    inference_compiler: Compiler | None = None
    dynamic: bool = False
    # Note [Higher-order backward] (higher_order.py): ``(fn, options) -> callable``
    # compiling a program's differentiable backward (aot_function's AOTFunction)
    compile_function: Callable | None = None


@dataclass
class CompileReport:
    """What one compilation produced and how long each stage took (seconds)."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    signature: Signature | None = None
    traced: TracedGraph | None = None
    partitioned: Partitioned | None = None
    compiled: CompiledGraphs | None = None
    tracing: str = ""   # how the program was traced (Note [One pass], Note [A light tracer])

    @property
    def forward_graph(self) -> fx.GraphModule | None:
        if self.partitioned is not None:
            return self.partitioned.fw_gm
        return self.traced.gm if self.traced is not None else None

    @property
    def backward_graph(self) -> fx.GraphModule | None:
        return self.partitioned.bw_gm if self.partitioned is not None else None


@contextlib.contextmanager
def _timed(report: CompileReport, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        secs = report.stage_seconds
        secs[stage] = secs.get(stage, 0.0) + time.perf_counter() - t0


def fake_inputs_for(graph_inputs: Sequence[Any], dynamic: bool, shape_env: bool = False,
                    num_static: int = 0):
    """Fake versions of the graph inputs, and their fake mode.

    Under torch.compile the fake mode is dynamo's (found on fake inputs or on
    the tracing context): real inputs are converted by it, which returns the
    very fake tensors dynamo traced with, symbolic sizes included.  Otherwise
    a fresh mode is made, symbolic when ``dynamic`` (but for the first
    ``num_static`` inputs: Note [Static weight shapes]), with a ShapeEnv when
    ``shape_env`` (Note [Fake rules that need a ShapeEnv], hops.py).
    """
    mode = _torch.detect_fake_mode(list(graph_inputs))
    if mode is None:
        mode = _torch.new_fake_mode(dynamic, shape_env)
        return mode, fakes_from_reals(mode, graph_inputs, static=not dynamic,
                                      num_static=num_static)
    return mode, [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not subclass.is_fake(x)
                  else x for x in graph_inputs]


def static_weights(options: CompileOptions) -> int:
    """Note [Static weight shapes]: with ``dynamic=True`` the parameters and
    buffers (the first ``num_params_buffers`` inputs) keep static sizes when
    ``config.static_weight_shapes`` is set (the default, as in torch): a
    model's weights do not change shape between calls, and static sizes give
    the compilers concrete shapes to work with; the guard key then holds
    their sizes (``api.guard_key``), so other shapes compile again."""
    return options.num_params_buffers if options.dynamic and config.static_weight_shapes else 0


@dataclass(frozen=True)
class Traced:
    """The first stages' results for one call signature."""
    flat: FlatInputs
    signature: Signature
    graph: TracedGraph
    fake_mode: Any
    fake_inputs: list
    reads: ValueReads | None = None   # Note [Values read while tracing]
    program: Callable | None = None   # the flat function traced (Note [Higher-order backward])


def trace_call(fn: Callable, options: CompileOptions, leaves: list, in_spec: Any,
               report: CompileReport, *, loss_index: int | None = None,
               require_grad: bool | None = None, specialise: bool = False,
               shape_env: bool = False) -> Traced:
    """flatten -> analyze -> trace (also the first half of export).
    ``specialise``: a program that reads its tensors' values is traced for
    the values its real inputs give, and guarded (Note [Values read while
    tracing], values.py).  ``shape_env``: see ``fake_inputs_for``."""
    stage = functools.partial(_timed, report)
    grad_enabled = torch.is_grad_enabled() if require_grad is None else require_grad
    with stage("flatten"):
        flat = flatten_inputs(leaves, in_spec, options.num_params_buffers)
        flat_fn = make_flat_fn(fn, flat)
        graph_inputs = select_graph_inputs(flat, leaves)
        num_static = static_weights(options)
        fake_mode, fakes = fake_inputs_for(graph_inputs, options.dynamic, shape_env, num_static)
    attempt = functools.partial(_trace, options=options, stage=stage, report=report,
                                grad_enabled=grad_enabled, loss_index=loss_index)
    rng = torch.random.get_rng_state()
    try:
        sig, traced = attempt(flat_fn, fake_mode, fakes)
        _refuse_seeding(rng, fn)
        return Traced(flat, sig, traced, fake_mode, fakes, program=flat_fn)
    except Exception as error:
        if not shape_env and _torch.detect_fake_mode(list(graph_inputs)) is None and \
                hops.needs_shape_env(error, fake_mode):  # Note [Fake rules that need a ShapeEnv]
            return trace_call(fn, options, leaves, in_spec, report, loss_index=loss_index,
                              require_grad=require_grad, specialise=specialise, shape_env=True)
        if isinstance(error, stateless.TracedTensorStored):
            raise
        with torch.set_grad_enabled(grad_enabled):
            raise_eager_error(fn, leaves, in_spec, error)
        reads = _reads_for(error, flat_fn, graph_inputs, grad_enabled) if specialise else None
        if reads is None:
            _raise_explained(error)
            raise
    fake_mode, fakes = fake_inputs_for(graph_inputs, options.dynamic, shape_env, num_static)
    rng = torch.random.get_rng_state()
    try:
        answered = AnsweredFunction(fn, flat, reads)
        sig, traced = attempt(answered, fake_mode, fakes)
    except Exception as error:
        _raise_explained(error)
        raise
    _refuse_seeding(rng, fn)
    return Traced(flat, sig, traced, fake_mode, fakes, reads, answered)


def _refuse_seeding(before: torch.Tensor, fn: Callable) -> None:
    """Tracing draws no random numbers (fake tensors), so a random state
    that changed while tracing was set by the program (``torch.manual_seed``
    inside it).  The graphs cannot replay that at each call -- eager's
    numbers from the second call on would silently differ -- so it is an
    error, raised at the first call."""
    if not torch.equal(torch.random.get_rng_state(), before):
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise RuntimeError(
            f"aotgrad: {name} sets the random number generator's state while it runs "
            "(torch.manual_seed, torch.random.set_rng_state, ...). A compiled function cannot "
            "do that at each call: its random ops would draw other numbers than eager from the "
            "second call on. Seed outside the compiled function (before calling it), or pass a "
            "torch.Generator you seed yourself.")


def _trace(flat_fn: Callable, fake_mode: Any, fakes: list, *, options: CompileOptions, stage,
           report: CompileReport, grad_enabled: bool,
           loss_index: int | None) -> tuple[Signature, TracedGraph]:
    required = [isinstance(f, torch.Tensor) and f.requires_grad for f in fakes]
    with _torch.tracing_context(fake_mode), torch.set_grad_enabled(grad_enabled), \
            _torch.hide_saved_tensor_hooks(), offsets_read() as offsets:
        report.stage_seconds.setdefault("analyze", 0.0)  # 0 when done in one pass
        sig, traced, tracer = _one_pass(flat_fn, fakes, options, stage, grad_enabled,
                                        loss_index)
        if sig is None:
            with stage("analyze"), fresh_unbacked_ignored(fake_mode):
                sig = analyze(flat_fn, fakes, grad_enabled=grad_enabled,
                              keep_input_mutations=options.keep_inference_input_mutations)
        marked = _requires_grad_set(required, sig, grad_enabled)
        if marked is not sig:
            sig, traced = marked, None    # traced again, differentiating w.r.t. them
        report.signature = sig
        runs = "one run of the program" if traced is not None else \
            "two runs of the program (analysis, then the trace)"
        with stage("trace"):
            if traced is None:
                traced = trace(flat_fn, fakes, sig, options.decompositions,
                               loss_index=loss_index, tracer=tracer)
            check_graph(traced.gm)
        report.traced = traced
        report.tracing = f"{runs}, by {traced.gm.meta.get(TRACER_META, 'make_fx')}"
    if offsets.seen:   # Note [Offsets read in Python] (values.py)
        traced.gm.meta[OFFSETS_READ_META] = True
    return sig, traced


def _requires_grad_set(required: list[bool], sig: Signature, grad_enabled: bool) -> Signature:
    """Note [requires_grad_ on an input]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    ``x.requires_grad_()`` inside the program on an input that does not
    require grad (not an in-place op with a tensor that does: the mutation's
    write-back carries that): eager differentiates through x from then on.
    The analysis sees x requiring grad (the flag is set on the fake as the
    program runs), so the graphs differentiate w.r.t. it; the runtime sets
    the flag on the real input *before* it calls the compiled Function, so
    that autograd routes x's gradient to it (after the call, as in eager,
    x requires grad).  Marked here: ``InputInfo.requires_grad_set``."""
    flags = [not before and info.requires_grad_after and not info.mutated
             for before, info in zip(required, sig.inputs)]
    if not any(flags):
        return sig
    return dataclasses.replace(sig, needs_autograd=sig.needs_autograd or grad_enabled,
                               inputs=tuple(
        dataclasses.replace(info, requires_grad=True, requires_grad_set=True) if flag else info
        for flag, info in zip(flags, sig.inputs)))


def _reads_for(error: Exception, flat_fn: Callable, graph_inputs: list,
               grad_enabled: bool) -> ValueReads | None:
    """Note [Values read while tracing]: the reads of a program whose trace
    stopped at a data-dependent value, when its inputs are real; else None."""
    if not isinstance(error, _torch.data_dependence_errors()) or \
            any(subclass.is_fake(x) or subclass.is_subclass(x) for x in graph_inputs
                if isinstance(x, torch.Tensor)) or \
            not all(isinstance(x, torch.Tensor) for x in graph_inputs):
        return None
    try:
        return record_reads(flat_fn, graph_inputs, grad_enabled)
    except RandomRead:
        raise
    except Exception:
        return None


def _raise_explained(error: Exception) -> None:
    """Raise aotgrad's clear error for a tracing failure it recognises."""
    if _is_captured_tensor_error(error):
        raise RuntimeError(
            "aotgrad: the program uses a tensor that is not one of its inputs (one "
            "captured from an enclosing scope, a global, or an attribute of an object "
            "that is not the compiled module). Tracing cannot see its values, and a "
            "gradient could not reach it. Pass it as an argument, or make it a parameter "
            "or buffer of the module given to aot_module.") from error
    if isinstance(error, ValueError) and str(error).startswith("Cannot view a tensor with shape"):
        raise RuntimeError(
            "aotgrad: tracing needed a view that its tensor's strides cannot give. This "
            "happens when a view is taken before an in-place metadata change of its base "
            "(t.transpose_(), t.t_(), t.unsqueeze_() ...) and autograd or functionalization "
            "replays the view afterwards; PyTorch's AOTAutograd fails these programs too. Take "
            "the view after the in-place change, or use the out-of-place op "
            "(t = t.transpose(0, 1)).") from error
    if isinstance(error, _torch.data_dependence_errors()):
        raise RuntimeError(
            "aotgrad: the program's graph depends on the values in its tensors "
            "(.item(), .tolist(), nonzero(), boolean-mask indexing, or Python control "
            "flow on a tensor such as `if x.sum() > 0`). aotgrad traces ahead of time, "
            "on tensors that have no values, so it cannot compile that part. Move the "
            "value-dependent code out of the compiled function, or use torch.compile, "
            f"which splits the program there. (Tracer: {type(error).__name__})") from error


def _one_pass(flat_fn, fakes: list, options: CompileOptions, stage, grad_enabled: bool,
              loss_index: int | None) -> tuple[Signature | None, TracedGraph | None, str]:
    """Note [One pass] (trace.py): the Signature and the graph from one run
    of the program when possible; else what is known (None for the rest),
    and the tracer for a second run ("make_fx" when the light one refused)."""
    if not one_pass_possible(fakes):
        return None, None, "any"
    with stage("trace"):
        try:
            sig, traced = analyze_and_trace(
                flat_fn, fakes, options.decompositions, grad_enabled=grad_enabled,
                loss_index=loss_index, keep_input_mutations=options.keep_inference_input_mutations)
            return sig, traced, "any"
        except SecondPass as again:
            return again.sig, None, "any"
        except NeedsMakeFx:
            return None, None, "make_fx"


def raise_eager_error(fn: Callable, leaves: list, in_spec: Any, error: Exception) -> None:
    """Note [Eager's error, not the tracer's]: when the program fails while
    being analyzed, run it eagerly on copies of the real inputs; if eager
    fails too, raise eager's exception (same type and message as without
    aotgrad), chained to the tracing error.  Returns when eager succeeds (or
    the inputs are fake), and the caller re-raises the tracing error."""
    if any(subclass.is_fake(x) for x in leaves):
        return
    copies = [copy_for_eager(x) for x in leaves]
    args, kwargs = _torch.pytree.tree_unflatten(copies, in_spec)
    try:
        with rng_kept(copies), objects.kept(copies), \
                _torch.functorch_layers_restored():  # (hops.py)
            fn(*args, **kwargs)
    except Exception as eager_error:
        raise eager_error from error


def compile_call(fn: Callable, options: CompileOptions, leaves: list, in_spec: Any,
                 report: CompileReport | None = None) -> Callable[[list], Any]:
    """Compile ``fn`` for calls whose flat leaves look like ``leaves``."""
    report = report if report is not None else CompileReport()
    t = trace_call(fn, options, leaves, in_spec, report, specialise=True)
    return compile_traced(t, options, report)


def compile_traced(t: Traced, options: CompileOptions, report: CompileReport) -> Callable[[list], Any]:
    """partition -> compile -> runtime."""
    stage = functools.partial(_timed, report)
    traced = t.graph
    if traced.is_joint:
        with _torch.tracing_context(t.fake_mode), stage("partition"):
            mutated = frozenset(i for i, x in enumerate(t.signature.inputs) if x.changed)
            static = frozenset(t.flat.leaf_slot[i] for i in range(t.flat.num_params_buffers)
                               if t.flat.leaf_slot[i] >= 0)   # parameters and buffers
            if traced.boundary is not None:  # plain graph inputs of those inputs
                mutated = frozenset(k for i in mutated for k in traced.boundary.plain_indices(i))
                static = frozenset(k for i in static for k in traced.boundary.plain_indices(i))
            traced.gm.meta[STATIC_INPUTS_META] = static
            hops.refuse_random_region_backward(   # Note [Random numbers in a region's backward]
                traced.gm, descendants(p for p in traced.gm.graph.find_nodes(op="placeholder")
                                       if isinstance(p.meta.get(DESC), Tangent)))
            parts = partition(traced.gm, _split_joint_inputs(traced),
                              traced.num_fwd_outputs, options.partition_fn, mutated)
            hooks = _torch.top_saved_tensor_hooks()
            if inlineable(hooks):
                parts = inline_hooks(parts, hooks, static)
            elif hooks is not None:  # Note [Which hooks are inlined] (saved_hooks.py)
                parts = dataclasses.replace(parts, saved_hooks_at_runtime=True)
            # Note [Missing tangents] (missing.py)
            parts.bw_gm.meta[CUSTOM_BACKWARD_META] = traced.gm.meta.get(CUSTOM_BACKWARD_META, True)
            for key in (REACH_META, DYNAMO_FUNCTION_META):   # missing.py
                if key in traced.gm.meta:
                    parts.bw_gm.meta[key] = traced.gm.meta[key]
            if traced.gm.meta.get(OFFSETS_READ_META):   # Note [Offsets read in Python]
                parts.fw_gm.meta[OFFSETS_READ_META] = parts.bw_gm.meta[OFFSETS_READ_META] = True
            check_graph(parts.fw_gm)
            check_graph(parts.bw_gm)
        report.partitioned = parts
    with stage("compile"):
        graph = parts.fw_gm if traced.is_joint else traced.gm
        graph.meta[INPUT_UPDATES_META] = input_updates(t.signature, graph, traced.is_joint)
        # Note [Effect tokens in compiled graphs] (tokens.py)
        if traced.is_joint:
            compiled = compile_joint(parts, tokens.threading(options.fw_compiler),
                                     tokens.threading(options.bw_compiler or options.fw_compiler))
        else:
            compiled = compile_inference(traced.gm, list(traced.example_inputs),
                                         tokens.threading(options.inference_compiler or
                                                          options.fw_compiler),
                                         traced.num_fwd_outputs)
    report.compiled = compiled
    with stage("runtime"):
        graph = parts.fw_gm if traced.is_joint else traced.gm
        # view replay reads the graph's plain values: not for subclass programs
        plans = alias_plans(graph, t.signature) if traced.boundary is None else {}
        run = build_runtime(t.flat, t.signature, compiled, plans,
                            dict(traced.poisoned_tangents), traced.boundary,
                            traced.backward_writes,
                            differentiable_backward(
                                parts, t.signature, t.flat, t.program, options,
                                subclasses=traced.boundary is not None,
                                poisoned=bool(traced.poisoned_tangents),
                                backward_writes=bool(traced.backward_writes))
                            if traced.is_joint else None)
        if options.dynamic:
            run = _with_shape_guard(run, t)
        if t.reads is not None:
            run = value_guarded(run, t.reads, t.flat.graph_leaf)
    return run


def differentiable_backward(parts: Partitioned, sig: Signature, flat: FlatInputs,
                            program: Callable | None, options: CompileOptions, *,
                            subclasses: bool, poisoned: bool,
                            backward_writes: bool) -> DifferentiableBackward:
    """Note [Higher-order backward] (higher_order.py): the create_graph
    backward of a program compiled from ``parts``."""
    plan = plan_higher_order(
        parts, sig, program=program, can_compile=options.compile_function is not None,
        subclasses=subclasses or sig.has_subclasses, poisoned=poisoned,
        backward_writes=backward_writes)
    params = sum(1 for j in flat.graph_leaf if j < flat.num_params_buffers)
    reuse = None
    if plan.refusal is None and not plan.cloned and not options.dynamic and all(
            isinstance(p.meta.get("val"), torch.Tensor)
            for p in parts.fw_gm.graph.find_nodes(op="placeholder")):
        # Note [Saved values in the second program] (reuse.py)
        offered, numbers, position = offered_values(parts.fw_gm, parts.num_fwd_outputs,
                                                    parts.num_saved_tensors)
        reuse = (offered, numbers, position) if offered else None
    return DifferentiableBackward(plan, program, sig, options, parts.num_saved_symints,
                                  parts.num_saved_tensors, params, reuse)


class ShapeGuardFailed(GuardFailed):
    """The call's sizes break an assumption a dynamic-shape trace made."""


def _with_shape_guard(run: Callable[[list], Any], t: Traced) -> Callable[[list], Any]:
    """Note [Shape guards]: a graph traced with symbolic sizes may still
    assume things about them (x.shape[0] > 1, two sizes equal); a call that
    breaks one raises ShapeGuardFailed and gets its own compilation."""
    check = _torch.shape_guard(t.fake_mode, t.fake_inputs)
    if check is None:
        return run
    graph_leaf = t.flat.graph_leaf

    def guarded(leaves: list) -> Any:
        if not check([leaves[i] for i in graph_leaf]):
            raise ShapeGuardFailed()
        return run(leaves)

    return guarded


def compile_rebased(fn: Callable, options: CompileOptions, leaves: list, in_spec: Any,
                    aliased: AliasedMutatedInputs,
                    report: CompileReport | None = None) -> Callable[[list], Any]:
    """Compile ``fn`` for calls whose graph inputs alias as ``aliased.groups``
    say (rebase.py: the aliased inputs become one synthetic base)."""
    report = report if report is not None else CompileReport()
    flat = flatten_inputs(leaves, in_spec, options.num_params_buffers)
    graph_inputs = select_graph_inputs(flat, leaves)
    plan = plan_rebasing(graph_inputs, aliased.groups, aliased.mutated)
    rebased = RebasedFunction(make_flat_fn(fn, flat), plan, len(graph_inputs))
    inner_leaves = rebased_inputs(plan, graph_inputs)
    inner_spec = _torch.pytree.tree_flatten((tuple(inner_leaves), {}))[1]
    inner = compile_call(rebased, dataclasses.replace(options, num_params_buffers=0),
                         inner_leaves, inner_spec, report)
    return rebased_runtime(plan, rebased, inner, flat.graph_leaf)


def _split_joint_inputs(traced: TracedGraph) -> list[list]:
    n = sum(1 for n in traced.gm.graph.find_nodes(op="placeholder")
            if isinstance(n.meta.get(DESC), Primal))
    return [list(traced.example_inputs[:n]), list(traced.example_inputs[n:])]


def fresh_unbacked_ignored(mode: Any) -> Any:
    """A context in which sizes made from data (``.item()``, ``nonzero``)
    need not be bound to a graph node: the analysis run (which makes no
    graph) may leave such symbols behind, which the trace after it would
    otherwise find pending."""
    env = getattr(mode, "shape_env", None)
    return env.ignore_fresh_unbacked_symbols() if env is not None else contextlib.nullcontext()


def _is_captured_tensor_error(error: Exception) -> bool:
    """What the fake mode raises when an op gets a real tensor that was not
    made fake: one the program captured rather than took as an input."""
    return isinstance(error, AssertionError) and \
        "Please convert all Tensors to FakeTensors first" in str(error)
