"""Stage 4 — trace: one functional ATen graph, joint or inference.

With autograd needed (``Signature.needs_autograd``) the *joint* graph is
traced: it takes ``(primals, tangents)`` and returns the forward outputs
followed by one gradient per primal (``None`` where no gradient exists)::

    def forward(self, primals_1, primals_2, tangents_1):
        mul = torch.ops.aten.mul.Tensor(primals_1, primals_2)
        mul_1 = torch.ops.aten.mul.Tensor(tangents_1, primals_2)
        return (mul, mul_1, None)

Otherwise the *inference* graph takes the graph inputs (``arg0_1`` ...) and
returns the outputs.  Both are traced (``record.trace_graph``: Note [A light
tracer]) over fake tensors under functionalization (or without it, where the
tracer can functionalize by itself: Note [Functional already]), so the graphs
hold functional ATen ops (views stay views); decompositions apply here.  When it
can, the trace also does the analysis (Note [One pass]).  Placeholders and the output node carry role
descriptors (``aotgrad.descriptors``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from . import _torch, config, node_meta, subclass, tangents, tokens
from .analyze import (InputInfo, OutputKind, Signature, describe, intermediate_bases,
                      run_checked)
from .descriptors import (DESC, Grad, IntermediateBase, MutatedInBackward, MutatedInput,
                          MutatedTangent, Primal, Tangent, UserOutput)
from .flatten import FlatFunction
from .missing import (CUSTOM_BACKWARD_META, DYNAMO_FUNCTION_META, REACH_META, ReachRecorder,
                      custom_backwards)
from .partition import CheckpointRegionMarker, strip_tags
from .record import NotFunctional, add_placeholders, mutated_so_far, recording, trace_graph
from .views import is_view_op


@dataclass(frozen=True)
class BackwardWrite:
    """A tensor the backward mutates (Note [Mutations in the backward]):
    input ``index``, or the gradient given for tangent ``index``."""
    of_tangent: bool
    index: int


@dataclass(frozen=True)
class TracedGraph:
    gm: fx.GraphModule
    is_joint: bool
    example_inputs: tuple[Any, ...]          # fake: primals (+ tangents when joint)
    num_fwd_outputs: int                     # joint: outputs before the gradients
    poisoned_tangents: Mapping[int, str] = dataclasses.field(default_factory=dict)
                                             # Note [Poisoned gradients]
    boundary: subclass.Boundary | None = None  # Note [Subclasses at the boundary]
    backward_writes: tuple[BackwardWrite, ...] = ()  # Note [Mutations in the backward]


def trace(flat_fn: FlatFunction, fake_inputs: Sequence[torch.Tensor], sig: Signature,
          decompositions: Mapping | None, *, loss_index: int | None = None,
          tracer: str = "any") -> TracedGraph:
    """The joint graph when ``sig.needs_autograd``, else the inference graph.

    With ``loss_index`` (export of a training step) the joint takes no
    tangents: it differentiates the scalar output ``loss_index`` (a graph
    output index) as ``loss.backward()`` would.
    """
    known = _Known(sig, tracer=tracer)
    if sig.needs_autograd:
        return _trace_joint(flat_fn, fake_inputs, known, decompositions, loss_index)
    return _trace_inference(flat_fn, fake_inputs, known, decompositions)


# Note [One pass]
# ~~~~~~~~~~~~~~~
# The Signature is known only once the program has run, and the joint trace
# needs it: its tangents are the outputs that get gradients, and a mutated
# input that requires grad is cloned before the program runs (Note [Clone
# before mutation]).  So analysis and tracing are two runs of the program.
# With the light tracer (Note [A light tracer]) they are one when they can be:
# the trace runs the program, describes it as ``analyze`` would (same
# functional inputs, same checks), and only then adds the tangents as
# placeholders and differentiates.  That holds when
#
# * no input has autograd history (the joint's primals are fresh leaves, the
#   analysis's inputs are the inputs themselves: they must agree), no input is
#   a subclass, and
# * the run is the joint's run: no input needs preparing before it
#   (``_prepare_primal``), and the program needs autograd (else the graph is
#   the inference graph).
#
# Otherwise the run still yields the Signature, and only the trace is done
# again (``SecondPass``).  A program the light tracer leaves to make_fx is
# analyzed and traced in two runs, as before.  The inference graph needs
# nothing before the run; it is traced in the call's grad mode (the program
# may read it), and first whenever no input requires grad: a program that
# then needs a joint after all (it makes tensors that require grad) is
# traced again.


# Note [Functional already]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# Functionalization (torch's FunctionalTensorMode) wraps every tensor and
# replays every view; on a transformer's joint it is about 40% of the trace.
# Most programs need little of it.  So the one-pass trace first runs without
# it, the light tracer doing the simple part itself (``record._functionalized``):
#
# * an op that mutates tensors nothing else aliases -- no other tensor of the
#   trace, alive or not, shares their storage -- is recorded as its functional
#   variant (``add_`` -> ``add``; ``_native_batch_norm_legit`` ->
#   ``_native_batch_norm_legit_functional``, which also returns the new
#   running stats: ``record.functional_variant``), when the new values have
#   the old metadata; later uses of a mutated tensor read the new node;
# * the mutations of inputs are reported to ``describe`` (``recorded``: which
#   inputs, and whether all their mutations were under no_grad), which then
#   describes them as functionalization's flags would.
#
# Anything else -- a mutation of a view or of a tensor with views, of
# metadata (``t_``), through ``out=``, an op with effects, an op with a rule
# of its own for functionalization (``torch.library.triton_op``'s, which
# decomposes the op into its Triton kernels there, as torch's AOTAutograd
# shows them to inductor), an input changed without an op
# (``x.data = y``), a mutation kept in the graph -- raises
# ``NotFunctional`` and the program is traced again, functionalized.  No
# aliasing means no view to replay: the graph is the one functionalization
# gives (``tests/test_record.py`` compares them).  One difference stays in
# the nodes' fake values: a view taken of a mutated tensor after the mutation
# has the tensor's storage in its ``val``, not the functional result's, so
# graph passes that group values by storage (saved bytes) may count such a
# view and its base apart: more bytes than there are, never fewer.


class SecondPass(Exception):
    """The one-pass trace described the program but must trace it again."""

    def __init__(self, sig: Signature):
        super().__init__("traced again with the signature")
        self.sig = sig


@dataclass
class _Known:
    """The Signature, known before tracing (analysis ran), or learned by it."""
    sig: Signature | None
    keep_input_mutations: bool = False
    tracer: str = "light"   # record.trace_graph's: one pass is the light tracer's only
    functional: bool = True  # traced under functionalization (Note [Functional already])

    def functionalization(self) -> Any:
        return _torch.functional_mode() if self.functional else contextlib.nullcontext()

    def wrap(self, t: Any) -> Any:
        return _torch.to_functional(t) if self.functional else t


#: Note [Functional already]: try a trace without torch's functionalization first
OWN_FUNCTIONALIZATION = True


def one_pass_possible(fake_inputs: Sequence[Any]) -> bool:
    return all(isinstance(x, torch.Tensor) and x.grad_fn is None and
               subclass.layout_of(x) is None for x in fake_inputs)


def analyze_and_trace(flat_fn: FlatFunction, fake_inputs: Sequence[torch.Tensor],
                      decompositions: Mapping | None, *, grad_enabled: bool,
                      keep_input_mutations: bool, loss_index: int | None = None
                      ) -> tuple[Signature, TracedGraph]:
    """Note [One pass].  Raises ``SecondPass`` (with the Signature) or
    ``record.NeedsMakeFx`` (analyze, then ``trace``)."""
    for functional in ((False, True) if OWN_FUNCTIONALIZATION else (True,)):
        known = _Known(None, keep_input_mutations, functional=functional)
        try:
            if grad_enabled and any(x.requires_grad for x in fake_inputs):
                traced = _trace_joint(flat_fn, fake_inputs, known, decompositions, loss_index)
            else:  # most likely no joint: SecondPass if the program makes gradients itself
                traced = _trace_inference(flat_fn, fake_inputs, known, decompositions)
            return known.sig, traced
        except NotFunctional:
            continue
    raise AssertionError("unreachable: a functionalized trace does not raise NotFunctional")


def _run_described(flat_fn, fake_inputs, f_args: list, known: _Known, grad_enabled: bool) -> list:
    """Run the program; with the Signature unknown, describe the run (Note [One pass])."""
    if known.sig is not None:
        return flat_fn(*f_args)
    history = [fx.grad_fn for fx in f_args]
    outs = run_checked(flat_fn, fake_inputs, f_args)
    known.sig = describe(flat_fn, fake_inputs, f_args, history, outs, grad_enabled=grad_enabled,
                         keep_input_mutations=known.keep_input_mutations,
                         recorded=None if known.functional else mutated_so_far())
    if not known.functional and any(i.mutation_in_graph for i in known.sig.inputs):
        raise NotFunctional("mutations kept in the graph")  # their copy_ needs it
    return outs


def graph_values(outs: list, f_args: list, sig: Signature) -> list:
    """The graph outputs, in the order of Note [What the graph returns] (analyze.py)."""
    values = [f_args[i] for i in sig.mutated_inputs_out_of_graph]
    values += [outs[k] for k in sig.user_graph_outputs]
    values += intermediate_bases(outs, sig)
    return values


def _kept_mutations(f_args: list, sig: Signature) -> dict[int, torch.Tensor]:
    """The final values of inputs whose mutation stays in the graph."""
    return {i: _torch.from_functional(f_args[i]) for i, info in enumerate(sig.inputs)
            if info.mutation_in_graph}


def _mutations_into_graph(args: Sequence, new_values: dict[int, torch.Tensor],
                          sig: Signature) -> None:
    """Note [Mutations kept in the graph]: emit the trailing copy_ / set_
    (outside functionalization, on the graph's own inputs)."""
    with torch.no_grad():
        for i, new in new_values.items():
            if sig.inputs[i].mutates_storage:
                args[i].set_(new)
            else:
                args[i].copy_(new)


def _outputs_after_kept_mutations(outs: list, args: Sequence, sig: Signature) -> list:
    """An output that *is* an input mutated in the graph is returned as the
    input after its trailing copy_ (the graph then reads as the program does)."""
    first = len(sig.mutated_inputs_out_of_graph)
    outs = list(outs)
    for j, i in enumerate(sig.user_graph_outputs):
        info = sig.outputs[i]
        if info.kind is OutputKind.IS_INPUT and sig.inputs[info.base].mutation_in_graph:
            outs[first + j] = args[info.base]
    return outs


def _trace_inference(flat_fn, fake_inputs, known: _Known, decompositions) -> TracedGraph:
    def inference(*args):
        with known.functionalization():
            f_args = _rebuild_inputs(known.sig, [known.wrap(a) for a in args])
            outs = _run_described(flat_fn, args, f_args, known, torch.is_grad_enabled())
            sig = known.sig
            values = graph_values(outs, f_args, sig)
            outs = [_torch.from_functional(v) for v in _plain_values(sig, values)]
            kept = _kept_mutations(f_args, sig)
        _mutations_into_graph(args, kept, sig)
        return _outputs_after_kept_mutations(outs, args, sig)

    plain_inputs = _plain_inputs(known.sig, fake_inputs)
    names = [f"arg{i}_1" for i in range(len(plain_inputs))]
    # in the call's grad mode: the program may read it (torch.is_grad_enabled())
    gm = trace_graph(inference, plain_inputs, names, decompositions, tracer=known.tracer,
                     functional=known.functional)
    sig = known.sig
    if sig.needs_autograd:  # Note [One pass]: learned by this trace
        raise SecondPass(sig)
    strip_tags(gm)
    _flatten_codegen(gm)
    drop_detaches(gm)
    drop_unused_views(gm)
    _annotate(gm, [Primal(i) for i in range(len(plain_inputs))], _output_descs(sig))
    boundary = subclass.Boundary(sig.input_layouts, sig.graph_output_layouts) \
        if sig.has_subclasses else None
    return TracedGraph(gm, False, tuple(plain_inputs), len(gm.graph.output_node().args[0]),
                       boundary=boundary)


# ---------------------------------------------------------------- subclasses
# Note [Subclasses at the boundary] (subclass.py): the traced function takes
# and returns plain tensors; the program in it sees its subclass inputs.

def _plain_inputs(sig: Signature | None, fake_inputs: Sequence) -> list:
    """The graph's placeholders: a subclass input's plain tensors, detached
    (autograd runs on the subclass, above them).  ``sig`` None: a one-pass
    trace, which has no subclass inputs (Note [One pass])."""
    if sig is None or not sig.has_subclasses:
        return list(fake_inputs)
    out: list = []
    for x, layout in zip(fake_inputs, sig.input_layouts):
        if layout is None:
            out.append(x)
        else:
            out.extend(p.detach() for p in subclass.flatten_all([x]))
    return out


def _rebuild_inputs(sig: Signature | None, f_plain: list) -> list:
    if sig is None or not sig.has_subclasses:
        return f_plain
    f_args = subclass.rebuild_list(sig.input_layouts, f_plain)
    for x, layout, info in zip(f_args, sig.input_layouts, sig.inputs):
        if layout is not None and info.requires_grad:
            x.requires_grad_(True)  # a leaf of the joint's autograd graph
    return f_args


def _plain_values(sig: Signature, values: list) -> list:
    return subclass.flatten_all(values) if sig.has_subclasses else values


def _output_descs(sig: Signature) -> tuple:
    descs = (tuple(MutatedInput(i) for i in sig.mutated_inputs_out_of_graph) +
             tuple(UserOutput(k) for k in sig.user_graph_outputs) +
             tuple(IntermediateBase(j) for j in range(sig.num_intermediate_bases)))
    if not sig.has_subclasses:
        return descs
    # one descriptor per plain tensor of a subclass output
    return tuple(d for d, layout in zip(descs, sig.graph_output_layouts)
                 for _ in range(subclass.num_plain(layout)))


def example_tangents(sig: Signature, late: bool = False) -> list[torch.Tensor]:
    """Tangents are traced in the layout Note [Tangent strides] (tangents.py)
    guesses, and the runtime gives them so.  A subclass output's tangent is
    given as its plain tensors.  ``late``: made during the one-pass trace and
    added to it as placeholders (Note [One pass])."""
    if sig.has_subclasses:
        metas = [(shape, dtype, device)
                 for ms, needs in zip(sig.graph_output_plain_meta, sig.tangent_mask)
                 if needs for shape, dtype, device in ms]
    else:
        metas = [m for m, needs in zip(sig.graph_output_meta, sig.tangent_mask) if needs]
    layouts = [layout for ls, needs in zip(sig.tangent_layouts, sig.tangent_mask)
               if needs for layout in ls] if sig.tangent_layouts else []
    if len(layouts) != len(metas):  # a Signature made before tangent layouts
        layouts = [tangents.CONTIGUOUS] * len(metas)
    if late:
        strides = [tangents.placeholder_strides(layout, shape)
                   for layout, (shape, _, _) in zip(layouts, metas)]
        return add_placeholders([f"tangents_{k + 1}" for k in range(len(metas))], metas,
                                strides)
    return [tangents.empty(layout, shape, dtype, device)
            for layout, (shape, dtype, device) in zip(layouts, metas)]


def _rebuild_tangents(sig: Signature, f_tangents: list) -> list:
    if not sig.has_subclasses:
        return f_tangents
    layouts = [x for x, needs in zip(sig.graph_output_layouts, sig.tangent_mask) if needs]
    return subclass.rebuild_list(layouts, f_tangents)


def _needs_preparing(info: InputInfo) -> bool:
    return _preparation(info) is not None


def _preparation(info: InputInfo) -> str | None:
    """How ``_prepare_primal`` prepares the primal: "clone", "view" or not at all."""
    if _needs_clone(info) or info.detached_in_place or \
            (info.requires_grad and info.mutates_metadata and info.mutates_data):
        return "clone"
    if info.requires_grad and info.mutates_metadata:
        return "view"
    return None


def _needs_clone(info: InputInfo) -> bool:
    """Note [Clone before mutation]: a mutated input that requires grad is
    cloned first: the joint differentiates with respect to its value before
    the mutation, and autograd runs above functionalization.  The clone has
    the input's strides (``_clone_with_strides``): the program must see the
    layout it sees in eager."""
    return info.requires_grad and info.mutation_visible_to_autograd and \
        not info.mutation_in_graph


def _prepare_primal(fp: Any, info: InputInfo) -> Any:
    """Note [Clone before mutation]; a primal whose metadata is mutated gets a
    fresh view of itself, so that the primal itself keeps its shape for the
    gradient."""
    how = _preparation(info)
    if how == "clone":
        return _clone_with_strides(fp)
    if how == "view":
        return fp.view(fp.shape)
    return fp


def _clone_with_strides(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` laid out as ``t``: ops whose result depends on the
    layout (``reshape`` views or copies) then do on it what they do on the
    input.  ``clone()`` keeps the strides of a dense tensor only; a view with
    gaps (``b[:, 1:]``) would come out contiguous.  (Subclasses, symbolic
    sizes and elements that overlap, which no copy can lay out as the input:
    ``clone()``.)"""
    sizes, strides = t.shape, t.stride()
    if subclass.is_subclass(t) or any(not isinstance(d, int) for d in (*sizes, *strides)) or \
            not _has_gaps(sizes, strides):
        return t.clone()
    return torch.empty_strided(sizes, strides, dtype=t.dtype, device=t.device).copy_(t)


def _has_gaps(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the elements leave gaps in their memory and do not overlap."""
    expected, gaps = 1, False
    for stride, size in sorted((st, n) for st, n in zip(strides, sizes) if n != 1):
        if stride < expected:
            return False  # overlap
        gaps = gaps or stride > expected
        expected = stride * size
    return gaps


def _differentiated(sig: Signature, loss_index: int | None) -> list[int]:
    """The graph outputs the joint differentiates (Note [What the graph returns])."""
    if loss_index is None:
        return [k for k, m in enumerate(sig.tangent_mask) if m]
    loss = sig.outputs[loss_index]
    if any(d != 1 for d in loss.shape) or not loss.requires_grad:  # one element, as () or [1]
        raise ValueError(
            f"aotgrad: output {loss_index} is not a scalar that requires grad (shape "
            f"{list(loss.shape)}, requires_grad={loss.requires_grad}); the loss must be one")
    return [len(sig.mutated_inputs_out_of_graph) + sig.user_graph_outputs.index(loss_index)]


def _trace_joint(flat_fn, fake_inputs, known: _Known, decompositions, loss_index) -> TracedGraph:
    if known.sig is not None:
        _differentiated(known.sig, loss_index)  # a bad loss fails before tracing
    grad_is_none: list[bool] = []
    poisoned: dict[int, str] = {}
    grad_layouts: list = []
    late_tangents: list = []
    backward_writes: list[BackwardWrite] = []
    custom_backward: list[bool] = []    # Note [Missing tangents] (missing.py)
    reach_of: list = []                 # Note [Gradients that eager leaves None]
    reach: list = []

    def joint(primals, tangents):
        # the light tracer refuses checkpoint regions itself: one dispatch mode less
        marker = contextlib.nullcontext() if recording() else CheckpointRegionMarker()
        with marker, known.functionalization():
            f_primals = _rebuild_inputs(known.sig, [known.wrap(p) for p in primals])
            if known.sig is None:  # Note [One pass]
                values = _run_described(flat_fn, fake_inputs, f_primals, known, True)
                sig = known.sig
                if not sig.needs_autograd or any(_needs_preparing(i) for i in sig.inputs):
                    raise SecondPass(sig)
                f_args = f_primals
                if loss_index is None:
                    tangents = example_tangents(sig, late=True)
                    late_tangents[:] = tangents
            else:
                sig = known.sig
                f_args = [_prepare_primal(fp, info) for fp, info in zip(f_primals, sig.inputs)]
                values = flat_fn(*f_args)
            diff = _differentiated(sig, loss_index)
            f_tangents = _rebuild_tangents(sig, [known.wrap(t) for t in tangents])
            values = graph_values(values, f_args, sig)
            wrt = [p for p, info in zip(f_primals, sig.inputs) if info.requires_grad]
            grads: list = []
            writes: list = []
            if diff and wrt:
                watch = _BackwardWatch(known, f_args, sig, f_tangents)
                custom_backward[:] = custom_backwards([values[k] for k in diff])
                if custom_backward[0]:   # Note [Gradients that eager leaves None]
                    reach_of[:] = [ReachRecorder([values[k] for k in diff], wrt)]
                with _backward_autocast(config.backward_pass_autocast), \
                        tokens.backward_effects_marked():  # Note [Effects in the backward]
                    grads = _differentiate([values[k] for k in diff], wrt, f_tangents, poisoned)
                writes = watch.writes()
                backward_writes[:] = [w for w, _ in writes]
            grads_iter = iter(grads)
            all_grads = [next(grads_iter, None) if info.requires_grad else None
                         for info in sig.inputs]
            grad_layouts[:] = [subclass.layout_of(g) for g in all_grads]
            for g in all_grads:
                subclass.check_rebuildable(g)
            grad_is_none[:] = [g is None for g, layout in zip(all_grads, grad_layouts)
                               for _ in range(subclass.num_plain(layout))]
            if reach_of:   # the backward outputs of each input differentiated
                starts = list(itertools.accumulate(
                    (subclass.num_plain(layout) for layout in grad_layouts), initial=0))
                reach[:] = [reach_of[0].finish([
                    range(starts[i], starts[i + 1])
                    for i, info in enumerate(sig.inputs) if info.requires_grad],
                    [len(sig.graph_output_plain_meta[k]) for k in diff]
                    if sig.has_subclasses else None)]
                reach_of.clear()
            outs = [_torch.from_functional(v) for v in _plain_values(sig, values)]
            grads_out = [_torch.from_functional(g)
                         for g in _plain_values(sig, [g for g in all_grads if g is not None])]
            grads_out += [new for _, new in writes]
            kept = _kept_mutations(f_args, sig)
        _mutations_into_graph(primals, kept, sig)
        return _outputs_after_kept_mutations(outs, primals, sig), grads_out

    one_pass = known.sig is None
    tangents = [] if one_pass or loss_index is not None else example_tangents(known.sig)
    primals = _plain_inputs(known.sig, [_detached_like(x) for x in fake_inputs])
    names = [f"primals_{i + 1}" for i in range(len(primals))] + \
        [f"tangents_{i + 1}" for i in range(len(tangents))]
    with torch.enable_grad():
        gm = trace_graph(joint, [primals, tangents], names, decompositions, tracer=known.tracer,
                         functional=known.functional)
    tangents = tangents or late_tangents
    sig = known.sig
    if node_meta.preserving():
        node_meta.copy_forward_to_backward(gm)
    strip_tags(gm)
    out_descs = _output_descs(sig)
    num_fwd = len(out_descs)
    _flatten_codegen(gm, insert_none_after=num_fwd, none_mask=grad_is_none)
    drop_detaches(gm)
    in_descs = [Primal(i) for i in range(len(primals))] + [Tangent(k) for k in range(len(tangents))]
    out_descs += tuple(Grad(i) for i in range(len(grad_is_none)))
    out_descs += tuple(MutatedTangent(w.index) if w.of_tangent else MutatedInBackward(w.index)
                       for w in backward_writes)
    _annotate(gm, in_descs, out_descs)
    gm.meta[CUSTOM_BACKWARD_META] = bool(custom_backward) and custom_backward[0]
    if len(custom_backward) > 1 and custom_backward[1]:
        gm.meta[DYNAMO_FUNCTION_META] = True
    if gm.meta[CUSTOM_BACKWARD_META] and reach:
        gm.meta[REACH_META] = reach[0]
    if poisoned:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    boundary = subclass.Boundary(sig.input_layouts, sig.graph_output_layouts,
                                 tuple(grad_layouts)) if sig.has_subclasses else None
    return TracedGraph(gm, True, (*primals, *tangents), num_fwd, poisoned, boundary,
                       tuple(backward_writes))


# Note [Mutations in the backward]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A custom autograd.Function's backward may write to a tensor the forward
# saved (``y.mul_(2)`` on an input), or to the gradient it is given
# (``grad.detach().mul_(3)``): in eager the caller sees the input, or the
# gradient tensor it passed to ``backward()``, changed.  The joint graph is
# functional, so the write would be lost.  The trace watches the inputs and
# tangents while it differentiates: each one whose value changed gets its
# new value returned by the backward graph after the gradients
# (``MutatedInBackward(i)``, ``MutatedTangent(k)``), and the runtime's
# backward writes it back (``copy_`` under no_grad), as eager's backward did.
# An input that requires grad written by the backward is refused: its
# gradient and its value would disagree.  Without torch's functionalization
# (Note [Functional already]) such a write is traced again with it.


class _BackwardWatch:
    """The values of the inputs and tangents before the backward is traced."""

    def __init__(self, known: _Known, f_args: list, sig: Signature, f_tangents: list):
        self.known, self.sig = known, sig
        self.inputs = [a if isinstance(a, torch.Tensor) and not subclass.is_subclass(a)
                       else None for a in f_args]
        self.tangents = [t if isinstance(t, torch.Tensor) and not subclass.is_subclass(t)
                         else None for t in f_tangents]
        if known.functional:
            self.before = [_torch.from_functional(t) if t is not None else None
                           for t in (*self.inputs, *self.tangents)]
        else:
            self.before = [id(t) in mutated_so_far() for t in (*self.inputs, *self.tangents)]

    def writes(self) -> list[tuple[BackwardWrite, Any]]:
        """What the backward wrote: (which tensor, its new value)."""
        watched = (*self.inputs, *self.tangents)
        if not self.known.functional:
            now = mutated_so_far()
            if any(t is not None and id(t) in now and not was
                   for t, was in zip(watched, self.before)):
                raise NotFunctional("a mutation in the backward")
            return []
        found = []
        for k, (t, old) in enumerate(zip(watched, self.before)):
            if t is None:
                continue
            new = _torch.from_functional(t)
            if new is old:
                continue
            of_tangent, index = k >= len(self.inputs), k - len(self.inputs) \
                if k >= len(self.inputs) else k
            if not of_tangent and self.sig.inputs[index].requires_grad:
                raise NotImplementedError(
                    f"aotgrad: the backward writes in place to input {index}, which requires "
                    "grad (a custom autograd.Function's backward mutating a tensor it saved). "
                    "Its gradient and its value would disagree; aotgrad cannot compile this. "
                    "Mutate a copy in the backward, or an input that does not require grad.")
            found.append((BackwardWrite(of_tangent, index), new))
        if found and self.sig.has_subclasses:
            raise NotImplementedError(
                "aotgrad: the backward writes in place to an input or gradient of a program "
                "with tensor subclass inputs or outputs; this is not supported yet. Mutate a "
                "copy in the backward instead.")
        return found


# autograd errors that eager raises only when the backward reaches them
_LATE_AUTOGRAD_ERRORS = ("modified by an inplace operation",
                         "is a view and its base or another view of its base",
                         "A view was created in no_grad mode",
                         "saved tensor that has been detached in-place")


def _differentiate(outputs: list, wrt: list, tangents: list, poisoned: dict[int, str]) -> list:
    """``autograd.grad`` of ``outputs`` (weighted by ``tangents``) w.r.t. ``wrt``.

    Note [Poisoned gradients]: when autograd refuses part of the backward
    (a value it saved was mutated afterwards, ...), eager raises only if a
    backward actually reaches that part.  The gradients are then taken one
    output at a time; the outputs whose backward fails are recorded in
    ``poisoned`` (tangent index -> message) and the runtime raises the same
    error if such an output ever receives a gradient."""
    try:
        with node_meta.backward_marks(outputs):  # Note [Node metadata]
            return list(torch.autograd.grad(outputs, wrt, tangents or None, allow_unused=True,
                                            retain_graph=True))
    except RuntimeError as e:
        if not any(m in str(e) for m in _LATE_AUTOGRAD_ERRORS):
            raise
    total: list = [None] * len(wrt)
    for j, out in enumerate(outputs):
        try:
            with node_meta.backward_marks([out]):
                grads = torch.autograd.grad([out], wrt, [tangents[j]] if tangents else None,
                                            allow_unused=True, retain_graph=True)
        except RuntimeError as e:
            if not any(m in str(e) for m in _LATE_AUTOGRAD_ERRORS):
                raise
            poisoned[j] = str(e)
            continue
        total = [g if t is None else t if g is None else t + g for t, g in zip(total, grads)]
    return total


def _detached_like(x: Any) -> Any:
    # Each primal is a leaf of the joint's autograd graph (symbolic sizes pass).
    if isinstance(x, torch.Tensor):
        return _torch.detached_fake(x).requires_grad_(x.requires_grad)
    return x


def _flatten_codegen(gm: fx.GraphModule, insert_none_after: int | None = None,
                     none_mask: Sequence[bool] = ()) -> None:
    """Drop make_fx's pytree calling convention: flat inputs, one flat tuple out.

    ``none_mask`` restores the ``None`` gradients that pytree flattening drops.
    """
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()
    out_node = graph.output_node()
    flat = list(_torch.pytree.tree_leaves(out_node.args[0]))
    if insert_none_after is not None:
        fwd, grads = flat[:insert_none_after], iter(flat[insert_none_after:])
        flat = fwd + [None if is_none else next(grads) for is_none in none_mask] + list(grads)
    out_node.args = (tuple(flat),)
    gm._in_spec = None
    gm._out_spec = None
    gm.recompile()


def drop_detaches(gm: fx.GraphModule) -> None:
    """Remove ``aten.detach`` nodes that only feed other ops.

    Autograd's saved-value unpacking leaves ``detach`` chains in traced graphs;
    in a functional graph they are identities.  A detach that is itself a
    graph output is kept (it decides an output's aliasing).

        detach = detach(relu); detach_1 = detach(detach); tb = threshold_backward(g, detach_1, 0)
        ->  tb = threshold_backward(g, relu, 0)
    """
    graph = gm.graph
    out_node = graph.output_node()
    changed = False
    for node in list(graph.find_nodes(op="call_function", target=_torch.aten.detach.default)):
        if out_node in node.users or any(is_view_op(u.target) for u in node.users):
            continue  # it decides an output's aliasing (views.py replays it)
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()


def drop_unused_views(gm: fx.GraphModule) -> None:
    """Remove view ops whose results nothing reads, and items nothing reads.

    Functionalization replays a view after each mutation of its base, read
    or not; a synthetic base's members are sliced before the program runs
    (rebase.py); make_fx takes an item of every result of a multi-result op,
    which a compiler may not have (inductor's flex_attention on CPU returns
    fewer results than its fake rule).  In a joint graph the partitioner
    keeps only what is needed; an inference graph is compiled as traced, so
    it is swept here::

        as_strided = as_strided(arg0_1, [2, 2], [2, 1], 0);  as_strided = None   # dropped
        getitem_4 = flex_attention[2];  getitem_4 = None                         # dropped
    """
    graph = gm.graph
    changed = False
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        target = node.target
        if is_view_op(target) or target is operator.getitem:
            graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _annotate(gm: fx.GraphModule, in_descs: list, out_descs: tuple) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert len(placeholders) == len(in_descs), (len(placeholders), len(in_descs))
    for node, desc in zip(placeholders, in_descs):
        node.meta[DESC] = desc
    gm.graph.output_node().meta[DESC] = out_descs


@contextlib.contextmanager
def _backward_autocast(setting):
    """The autocast state the backward is traced under (config.backward_pass_autocast):
    "same_as_forward" (leave it), "off", or a list of torch.amp.autocast kwargs."""
    with contextlib.ExitStack() as stack:
        if setting == "off":
            for device in _torch.autocast_devices():
                stack.enter_context(torch.amp.autocast(device, enabled=False))
        elif isinstance(setting, (list, tuple)):
            for kwargs in setting:
                stack.enter_context(torch.amp.autocast(**kwargs))
        elif setting != "same_as_forward":
            raise ValueError(
                f"aotgrad.config.backward_pass_autocast must be 'same_as_forward', 'off' or a "
                f"list of torch.amp.autocast keyword dicts, not {setting!r}")
        yield
