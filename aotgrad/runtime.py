"""Stage 7 — runtime: the callable the user gets.

Note [Generated runtime]: the per-call work is Python source written once per
compiled program, from its ``Signature``: only the lines this program needs,
with every decision that the signature settles taken at compile time.  For
``(a * b).sin().sum()`` with both inputs requiring grad it reads::

    def call(leaves):
        i0 = leaves[0]
        i1 = leaves[1]
        o0 = apply(i0, i1)
        return o0

and the ``torch.autograd.Function`` made for it::

    def forward(ctx, i0, i1):
        outs = fw([i0, i1])
        ctx.save_for_backward(*outs[1:4])
        o0 = outs[0]
        if o0._is_view():
            o0 = unsafe_view(o0)
        ctx.set_materialize_grads(False)
        return o0

    def backward(ctx, t0):
        missing = ()
        if t0 is None: ... zeros, missing = (0,)
        else: t0 = t0.contiguous()
        args = [*ctx.saved_tensors, t0]
        ...

What the call does, in order (each part present only when needed):

1. aliasing check: a mutated input sharing storage with another input raises
   ``AliasedMutatedInputs`` (Note [Aliased mutated inputs]);
2. the graphs: inference: the compiled inference graph, under no_grad;
   training: the autograd.Function, which runs the compiled forward, keeps
   the saved values on its ctx, and whose backward runs the compiled
   backward (both boxed: see ``compile.py``);
3. input mutations the graph returned are written back into the caller's
   tensors (Note [Writing mutations back]);
4. the user's outputs: graph outputs, the caller's own input objects,
   aliases rebuilt as views (Note [Rebuilding aliased outputs]), constants.

The body reads graph inputs ``i0 ...``; ``RuntimeProgram.function`` wraps it
with any way of getting them (from the flat leaves, from a call's positional
arguments, from a module's parameters) and any guard, so that the fast path
of ``aot_function`` is one generated function (Note [Fast path], api.py).

Note [Unread view graphs]: an inference graph made only of view ops computes
nothing but aliases of its inputs; when the runtime rebuilds each of them by
replaying the views on the inputs themselves, no graph output is read and
the graph is not run at all (``x.view(-1)`` costs one view, as in eager).

Note [Guarded apply]: ``autograd.Function.apply`` is a Python layer over the
C++ apply that binds default arguments for ``setup_context`` and unwraps dead
functorch wrappers, one ``isinstance`` per argument (a few microseconds for
two tensors).  Where a guard has checked that the inputs are plain tensors
and that no functorch transform is active (Note [Fast path], api.py), the
body calls the C++ apply directly; elsewhere it calls ``apply``.

Note [Autocast is traced in]: a graph traced under autocast holds autocast's
casts as ops; the runtime runs it with autocast off, or ops would be cast a
second time (custom ops with an autocast kernel would even compute
differently).  The autocast state is part of the guard key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import _torch, config, subclass, tangents as tangents_mod
from .analyze import InputInfo, OutputKind, Signature
from .codegen import Namespace, make_function, read_inputs
from .compile import CompiledGraphs, repeated_outputs
from .flatten import FlatInputs
from .higher_order import DifferentiableBackward, refused
from .rebase import AliasedMutatedInputs, alias_groups
from .saved_hooks import hooks_off
from .outputs import Assembler
from .views import AliasPlan


class _Missing:
    def __repr__(self) -> str:
        return "MISS"


MISS = _Missing()   # what a guarded entry returns when its guard fails


@dataclass(frozen=True, eq=False)
class RuntimeProgram:
    """The generated body of one compiled program (Note [Generated runtime])."""
    body: tuple[str, ...]          # lines at function level, reading i0 ... i{n-1}
    namespace: dict[str, Any]
    # Note [Guarded apply]: names rebound where a guard has checked the inputs
    guarded: dict[str, Any]
    # Note [Offsets nobody reads]: inputs whose storage offset the program never reads
    offset_free: frozenset[int] = frozenset()

    @property
    def training(self) -> bool:
        return bool(self.guarded)

    def function(self, params: str, inputs: Sequence[str], guard: str | None = None,
                 namespace: dict[str, Any] | None = None, name: str = "call",
                 pre_guard: str | None = None) -> Callable:
        """``def name(params)``: graph input k is the expression ``inputs[k]``;
        ``pre_guard`` (before the inputs are read) or ``guard`` (after, may
        use ``i0 ...``) false → return ``MISS``."""
        lines = [f"def {name}({params}):"]
        if pre_guard is not None:
            lines += [f"    if not ({pre_guard}):", "        return MISS"]
        lines += read_inputs(inputs)
        if guard is None:
            lines += self.body
        else:  # a guarded entry: aliased inputs, like a failed guard, return MISS
            lines += [f"    if not ({guard}):", "        return MISS", "    try:"]
            lines += ["    " + line for line in self.body]
            lines += ["    except AliasedMutatedInputs:", "        return MISS"]
        guarded = self.guarded if guard is not None else {}
        return make_function("\n".join(lines) + "\n", name,
                             {**self.namespace, **guarded, **(namespace or {}), "MISS": MISS,
                              "AliasedMutatedInputs": AliasedMutatedInputs})


def build_runtime(flat: FlatInputs, sig: Signature, compiled: CompiledGraphs,
                  plans: dict[int, AliasPlan] | None = None,
                  poisoned: dict[int, str] | None = None,
                  boundary: subclass.Boundary | None = None,
                  backward_writes: tuple = (),
                  higher: DifferentiableBackward | None = None) -> Callable[[list], Any]:
    """A function of the call's flat leaves returning the user's output; its
    ``program`` attribute is the ``RuntimeProgram``.

    ``plans``: view-replay plans of rebuilt outputs (views.py); ``boundary``:
    the subclass layouts (Note [Subclasses at the boundary]); ``backward_writes``:
    the tensors the backward writes to (Note [Mutations in the backward], trace.py);
    ``higher``: its create_graph backward (Note [Higher-order backward], higher_order.py)."""
    program = _generate(flat, sig, compiled, plans if config.view_replay_for_aliased_outputs
                        else {}, poisoned or {}, boundary, backward_writes, higher)
    call = program.function("leaves", [f"leaves[{j}]" for j in flat.graph_leaf])
    call.program = program  # type: ignore[attr-defined]
    call.graph_leaf = flat.graph_leaf  # type: ignore[attr-defined]
    call.leaf_slot = flat.leaf_slot  # type: ignore[attr-defined]
    return call


class _Source:
    def __init__(self, ns: Namespace):
        self.lines: list[str] = []
        self.ns = ns

    def __call__(self, line: str, depth: int = 1) -> None:
        self.lines.append("    " * depth + line)

    @property
    def names_used(self) -> set[str]:
        return set(re.findall(r"\b[a-z]\d+\b", "\n".join(self.lines)))

    def bind(self, value: Any, hint: str = "") -> str:
        return self.ns.bind(value, hint)


def _names(prefix: str, indices: Sequence[int]) -> str:
    return ", ".join(f"{prefix}{k}" for k in indices)


def _generate(flat: FlatInputs, sig: Signature, compiled: CompiledGraphs,
              plans: dict[int, AliasPlan], poisoned: dict[int, str],
              boundary: subclass.Boundary | None, backward_writes: tuple,
              higher: DifferentiableBackward | None = None) -> RuntimeProgram:
    ns = Namespace("rt")
    src = _Source(ns)
    n_in = flat.num_graph_inputs
    inputs = _names("i", range(n_in))
    _alias_check(src, sig, flat.num_params_buffers)
    num_out = sig.num_graph_outputs
    outs = _names("o", range(num_out))
    unpack = f"{outs}," if num_out else "_"
    # the epilogue first: which graph outputs it reads
    epilogue = _Source(ns)
    assemble = Assembler(sig, plans, epilogue)
    assemble.early()
    written = _writes_in_forward(sig, compiled, boundary)
    _write_back(epilogue, sig, written, compiled.updated_in_place)
    assemble.outputs()
    guarded = {}
    for i, x in enumerate(sig.inputs):
        if x.requires_grad_set:   # Note [requires_grad_ on an input] (pipeline.py)
            src(f"i{i}.requires_grad_(True)")
    if compiled.backward is not None:
        function = _autograd_function(sig, compiled, poisoned, boundary, backward_writes,
                                      higher or DifferentiableBackward(
                                          refused(sig, "it was built without a plan for it"),
                                          None, sig, None, 0, 0))
        apply = src.bind(function.apply, "apply")
        guarded[apply] = _torch.function_apply_unchecked(function)
        returned = [k for k in range(num_out) if k not in written]
        target = f"o{returned[0]}" if len(returned) == 1 else \
            f"{_names('o', returned)}," if returned else "_"
        call = f"{target} = {apply}({inputs})"
        if compiled.saved_hooks_inlined:  # autograd packs saved tensors when apply returns
            src(f"with {src.bind(hooks_off, 'hooks_off')}():")
            src(call, 2)
        else:
            src(call)
    elif compiled.views_only and not config.debug_assert and \
            not any(f"o{k}" in epilogue.names_used for k in range(num_out)):
        pass  # Note [Unread view graphs]
    else:
        _inference_call(src, sig, compiled, boundary, inputs, unpack)
    if config.debug_assert:
        present = [k for k in range(num_out) if k not in written]
        src(f"{src.bind(_check_outputs, 'check_outputs')}([{_names('o', present)}], "
            f"{tuple(present)!r}, {src.bind(sig, 'sig')})")
    src.lines += epilogue.lines
    return RuntimeProgram(tuple(src.lines), dict(ns.values), guarded,
                          _offset_free(sig, compiled))


# Note [Tangents as they come]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The backward graph is traced with tangents in a guessed layout (Note
# [Tangent strides], tangents.py), and a compiler may rely on their strides
# (inductor does), so the runtime gives each incoming gradient that layout
# (a copy when it comes otherwise).  Eager autograd passes gradients on as
# they come; only a view of one needs compatible strides, and some kernels
# read theirs as if contiguous.  For graphs that ``nop`` runs, a tangent that
# reaches only ops known to take any strides (Note [Ops that take any
# strides], codegen.py) is passed as it comes (``codegen.stride_free_inputs``):
# the values are the same, the gradients' strides follow eager's, and the
# call saves one layout check (or copy) per tangent.


def _offset_free(sig: Signature, compiled: CompiledGraphs) -> frozenset[int]:
    """Note [Offsets nobody reads]: an input's storage offset matters to a
    program only through ops that address storage absolutely (``as_strided``,
    ``set_``), through an output rebuilt as a view of the input (its offset is
    recorded), or through a write-back of a mutation (metadata mutations are
    restored with ``as_strided_``).  Every other op addresses memory relative
    to its input's offset, so the guard need not check it.  Known only for
    graphs run by ``nop`` (``CompiledGraphs.offset_free``); other compilers'
    code may address storage as it likes."""
    if not compiled.offset_free:
        return frozenset()
    viewed = _viewed_inputs(sig)
    return frozenset(k for k, info in enumerate(sig.inputs)
                     if k not in viewed and not info.mutated)


def _viewed_inputs(sig: Signature) -> set[int]:
    """Inputs some output is a view of (rebuilt by the runtime at their offset)."""
    return {o.base for o in sig.outputs if o.kind is OutputKind.ALIAS_OF_INPUT}


def _plain_positions(sig: Signature) -> tuple[int, ...]:
    """Note [Lone views] (analyze.py): graph outputs returned as they are, and
    intermediate bases, are never views of the graph's intermediates
    (multi-output views excepted)."""
    first_user = len(sig.mutated_inputs_out_of_graph)
    first_base = first_user + len(sig.user_graph_outputs)
    meta = sig.graph_output_meta  # None: a symbolic size, a plain int at run time
    return tuple(first_user + j for j, i in enumerate(sig.user_graph_outputs)
                 if sig.outputs[i].kind.through_autograd and
                 not sig.outputs[i].multi_output_view and
                 not sig.outputs[i].custom_function_view and
                 (not meta or meta[first_user + j] is not None)) + \
        tuple(range(first_base, first_base + sig.num_intermediate_bases))


def _unview(src: _Source, positions: Sequence[int], fresh: frozenset[int]) -> None:
    """Graph outputs at ``positions`` that are views become plain tensors;
    ``fresh`` positions the compiled graph never returns a view at."""
    unsafe_view = src.bind(_torch.unsafe_view, "unsafe_view")
    for k in positions:
        if k in fresh:
            continue
        src(f"if o{k}._is_view():")
        src(f"o{k} = {unsafe_view}(o{k})", 2)


def _without_grad(src: _Source, line: str, depth: int = 1) -> None:
    """``line`` with grad mode off (a toggle, not a context-manager object)."""
    grad_enabled = src.bind(torch.is_grad_enabled, "grad_enabled")
    set_grad = src.bind(_torch.set_grad_enabled, "set_grad_enabled")
    src(f"if {grad_enabled}():", depth)
    src(f"{set_grad}(False)", depth + 1)
    src("try:", depth + 1)
    src(line, depth + 2)
    src("finally:", depth + 1)
    src(f"{set_grad}(True)", depth + 2)
    src("else:", depth)
    src(line, depth + 1)


def _inference_call(src: _Source, sig: Signature, compiled: CompiledGraphs,
                    boundary: subclass.Boundary | None, inputs: str, unpack: str) -> None:
    """No output of an inference graph needs grad (else the analysis would have
    asked for a joint graph), so it runs under no_grad: in-graph mutations of
    inputs that require grad are then allowed, as they were when traced."""
    fw = src.bind(compiled.forward, "forward")
    call = f"{fw}([{inputs}])"
    if boundary is not None:  # Note [Subclasses at the boundary]
        call = (f"{src.bind(subclass.rebuild_list, 'rebuild_list')}("
                f"{src.bind(boundary.outputs, 'layouts')}, "
                f"{fw}({src.bind(subclass.flatten_all, 'flatten_all')}([{inputs}])))")
    depth = 1
    if any(_torch.autocast_state()):  # Note [Autocast is traced in]
        src(f"with {src.bind(_torch.autocast_disabled, 'autocast_disabled')}():")
        depth = 2
    _without_grad(src, f"{unpack} = {call}", depth)
    _bump_versions(src, sig, compiled)
    _unview(src, _plain_positions(sig), compiled.fresh_outputs)


# Note [Versions of inputs written in the graph]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# An input mutation kept in the graph (keep_inference_input_mutations, a
# trailing copy_) moves the input's version counter when the graph runs ATen
# ops (nop), as eager's in-place op did; a compiler that writes the input from
# its own kernel (inductor) moves nothing, and a backward that saved the
# input before then read the new value silently where eager raises "modified
# by an inplace operation".  So after such a graph the runtime moves them.


def _bump_versions(src: _Source, sig: Signature, compiled: CompiledGraphs,
                   depth: int = 1) -> None:
    """Note [Versions of inputs written in the graph]."""
    if compiled.bumps_versions:
        return
    written = [i for i, x in enumerate(sig.inputs) if x.mutation_in_graph and
               (x.mutates_data or x.mutates_storage)]
    if written:
        bump = src.bind(_torch.increment_version, "increment_version")
        src(f"{bump}(({''.join(f'i{i}, ' for i in written)}))", depth)


def _check_outputs(outs: list, positions: tuple, sig: Signature) -> None:
    """Note [debug_assert]: check the compiled graph returns what analysis
    predicted (at ``positions``: the outputs the runtime received)."""
    for k, o in zip(positions, outs):
        meta = sig.graph_output_meta[k]
        if meta is None:
            continue  # a symbolic size
        shape, dtype, _ = meta
        if not isinstance(o, torch.Tensor) or o.dtype != dtype or o.dim() != len(shape):
            raise AssertionError(
                f"aotgrad debug_assert: graph output {k} is "
                f"{type(o).__name__}{getattr(o, 'dtype', '')} with "
                f"{getattr(o, 'dim', lambda: '?')()} dims; expected {dtype} with "
                f"{len(shape)} dims")


# ---------------------------------------------------------------- training

def _autograd_function(sig: Signature, compiled: CompiledGraphs, poisoned: dict[int, str],
                       boundary: subclass.Boundary | None, writes: tuple,
                       higher: DifferentiableBackward) -> type:
    """The autograd.Function of one compiled program, its forward and backward
    generated (Note [Generated runtime]).  The compiled backward runs under
    no_grad; with create_graph=True, ``higher`` computes differentiable
    gradients instead (Note [Higher-order backward], higher_order.py)."""
    ns = Namespace("af")
    fwd, bwd = _Source(ns), _Source(ns)
    num_out = compiled.num_fwd_outputs
    n_in = len(sig.inputs)
    end = num_out + compiled.num_saved_tensors
    mask = sig.tangent_mask
    diff = [k for k, m in enumerate(mask) if m]
    non_diff = [k for k, m in enumerate(mask) if not m]
    meta = sig.graph_output_meta
    autocast_on = any(_torch.autocast_state())  # at compile time (part of the guard key)
    inputs = _names("i", range(n_in))

    # forward
    fw = fwd.bind(compiled.forward, "forward")
    args = f"[{inputs}]" if boundary is None else \
        f"{fwd.bind(subclass.flatten_all, 'flatten_all')}([{inputs}])"
    if autocast_on:  # Note [Autocast is traced in]
        fwd(f"with {fwd.bind(_torch.autocast_disabled, 'autocast_disabled')}():")
        fwd(f"outs = {fw}({args})", 2)
    else:
        fwd(f"outs = {fw}({args})")
    if boundary is None:
        _bump_versions(fwd, sig, compiled)
    if compiled.num_saved_tensors:
        fwd(f"ctx.save_for_backward(*outs[{num_out}:{end}])")
    if compiled.num_saved_symints:
        fwd(f"ctx.symints = outs[{end}:]")
    if higher.extras:  # Note [Higher-order backward]: the inputs it does not save
        fwd(f"ctx.aotgrad_inputs = ({_names('i', higher.extras)},)")
    if higher.versioned:
        fwd("try:")
        fwd(f"ctx.aotgrad_versions = ({''.join(f'i{i}._version, ' for i in higher.versioned)})", 2)
        fwd("except RuntimeError:  # an inference tensor has no version counter")
        fwd("ctx.aotgrad_versions = None", 2)
    written_inputs = [w.index for w in writes if not w.of_tangent]
    if written_inputs:  # Note [Mutations in the backward] (trace.py)
        fwd(f"ctx.written = ({_names('i', written_inputs)},)")
    written = _writes_in_forward(sig, compiled, boundary)
    if boundary is None:
        for k in range(num_out):
            fwd(f"o{k} = outs[{k}]")
        fwd("del outs")
        for k in written:  # Note [Writes in the forward]
            if k not in compiled.updated_in_place:  # Note [Updates in place]
                fwd(f"i{sig.mutated_inputs_out_of_graph[k]}.copy_(o{k})")
        for k in compiled.repeated_outputs:  # Note [Distinct outputs] (compile.py)
            fwd(f"o{k} = o{k}.detach()" if not mask[k] else f"o{k} = o{k}.clone()")
    else:  # outs holds plain tensors; o0 ... are the (maybe subclass) outputs
        fwd(f"plain = list(outs[:{num_out}])" if compiled.repeated_outputs else
            f"plain = outs[:{num_out}]")
        fwd("del outs")
        for k in compiled.repeated_outputs:  # Note [Distinct outputs] (compile.py)
            fwd(f"plain[{k}] = plain[{k}].detach()" if not mask[k] else
                f"plain[{k}] = plain[{k}].clone()")
        num_out = sig.num_graph_outputs
        fwd(f"{_names('o', range(num_out))}, = {fwd.bind(subclass.rebuild_list, 'rebuild_list')}("
            f"{fwd.bind(boundary.outputs, 'layouts')}, plain)")
    _unview(fwd, _plain_positions(sig),
            compiled.fresh_outputs if boundary is None else frozenset())
    returned = [k for k in range(num_out) if k not in written]
    marks = [f"o{k}" for k in non_diff if meta and meta[k] is not None and k not in written]
    if marks:
        fwd(f"ctx.mark_non_differentiable({', '.join(marks)})")
    fwd("ctx.set_materialize_grads(False)")
    static_meta = boundary is None and all(
        meta[k] is not None and all(type(d) is int for d in meta[k][0]) for k in diff)
    if not static_meta and diff:  # per differentiable output, the meta of its plain tensors
        fwd(f"ctx.diff_meta = {fwd.bind(_diff_meta, 'diff_meta')}([{_names('o', diff)}])")
    fwd(f"return o{returned[0]}" if len(returned) == 1 else
        f"return ({_names('o', returned)},)" if returned else "return ()")

    # backward
    for j, message in poisoned.items():  # Note [Poisoned gradients] (trace.py)
        bwd(f"if t{diff[j]} is not None:")
        bwd(f"raise RuntimeError({message!r})", 2)
    for w in writes:  # the gradient tensors given, before they are made contiguous
        if w.of_tangent:
            bwd(f"given{w.index} = t{diff[w.index]}")
    tangents = _names("t", diff)
    strided = [_tangent_layouts(sig, k) for k in diff]  # Note [Tangent strides]
    if boundary is not None:
        layouts = [boundary.outputs[k] for k in diff]
        bwd(f"tangents, missing = {bwd.bind(_subclass_tangents, 'subclass_tangents')}("
            f"ctx, [{tangents}], {bwd.bind(layouts, 'tangent_layouts')}, {tuple(diff)!r}, "
            f"{bwd.bind(strided, 'tangent_strides')})")
        tangents = "*tangents"
    else:
        bwd("missing = ()")
        zeros = bwd.bind(torch.zeros, "zeros")
        for j, k in enumerate(diff):
            free = j in compiled.stride_free_tangents  # Note [Tangents as they come]
            layout = strided[j][0]
            known_shape = meta[k][0] if meta and meta[k] is not None else None
            plain = free or layout.is_contiguous_for(known_shape)
            bwd(f"if t{k} is None:")
            if static_meta:
                shape, dtype, device = meta[k]
                shape_dtype_device = (f"{shape!r}, dtype={bwd.bind(dtype, 'dtype')}, "
                                      f"device={bwd.bind(device, 'device')}")
            else:
                bwd(f"shape, dtype, device = ctx.diff_meta[{j}][0]", 2)
                shape_dtype_device = "shape, dtype=dtype, device=device"
            if plain:
                bwd(f"t{k} = {zeros}({shape_dtype_device})", 2)
            else:  # Note [Tangent strides]: zeros laid out as the tangent was traced
                bwd(f"t{k} = {bwd.bind(tangents_mod.zeros, 'zeros_as')}({shape_dtype_device}, "
                    f"layout={bwd.bind(layout, 'layout')})", 2)
            bwd(f"missing += ({j},)", 2)
            if not free and layout.stride is not None and not plain:  # Note [Tangent strides]
                bwd(f"elif t{k}.stride() != {layout.stride!r}:")
                bwd(f"t{k} = {_coerce_source(bwd, k, layout, plain)}", 2)
            elif not free:
                bwd("else:")
                bwd(f"t{k} = {_coerce_source(bwd, k, layout, plain)}", 2)
    saved = "*ctx.saved_tensors, " if compiled.num_saved_tensors else ""
    symints = "*ctx.symints, " if compiled.num_saved_symints else ""
    bwd(f"args = [{symints}{saved}{tangents}]")
    bwd(f"del {_names('t', diff) if boundary is None else 'tangents'}" if diff or boundary
        else "pass")
    # Note [Freeing saved values]: the compiled backward is called boxed with
    # the only references to the saved values and tangents (ctx's are cleared
    # unless retain_graph), so each dies at its last use
    bw = bwd.bind(compiled.backward, "backward")
    if compiled.keeping_backward is not None:  # Note [Donated buffers] (compile.py)
        bwd(f"bw = {bwd.bind(compiled.keeping_backward, 'keeping_backward')}() if "
            f"{bwd.bind(_torch.keeps_graph, 'keeps_graph')}() else {bw}")
        bw = "bw"
    if compiled.missing is not None and not writes and diff:
        # Note [Missing tangents] (missing.py): a backward that leaves them out
        bwd(f"bw_now = {bw}")
        bwd("if missing:")
        # a subclass's gradient is rebuilt from all its plain tensors: none of them None
        whole = ", True" if boundary is not None else ""
        bwd(f"bw_now = {bwd.bind(compiled.missing, 'without_missing')}(missing, bw_now{whole})",
            2)
        bw = "bw_now"
    bwd("kept = None")
    bwd(f"if {bwd.bind(torch.is_grad_enabled, 'grad_enabled')}():  # create_graph=True")
    # Note [Higher-order backward] (higher_order.py)
    bwd(f"grads, kept = {bwd.bind(higher, 'higher_order')}(ctx, {bw}, args, missing)", 2)
    bwd("else:")
    bwd("ctx.maybe_clear_saved_tensors()", 2)
    if higher.extras:
        bwd(f"if not {bwd.bind(_torch.keeps_graph, 'keeps_graph')}():", 2)
        bwd("ctx.aotgrad_inputs = None", 3)
    bwd(f"if {bwd.bind(_torch.any_autocast_enabled, 'any_autocast')}():", 2)
    bwd(f"with {bwd.bind(_torch.autocast_disabled, 'autocast_disabled')}():", 3)
    bwd(f"grads = {bw}(args)", 4)
    bwd("else:", 2)
    bwd(f"grads = {bw}(args)", 3)
    if writes:
        _backward_writes(bwd, writes)
    bwd("if missing:  # Note [Gradients that eager leaves None] (missing.py)")
    bwd(f"grads = {bwd.bind(_drop_missing, 'drop_missing')}(grads, missing, "
        f"{bwd.bind(compiled.left_none, 'left_none')})", 2)
    if boundary is not None:
        bwd(f"grads = {bwd.bind(subclass.rebuild_list, 'rebuild_list')}("
            f"{bwd.bind(boundary.grads, 'grad_layouts')}, grads)")
    bwd("if kept is not None:")
    bwd(f"return {bwd.bind(higher.refuse, 'refuse_double_backward')}(grads, kept)", 2)
    bwd("return tuple(grads)")

    source = "\n".join([f"def forward(ctx, {inputs}):", *fwd.lines, "",
                        f"def backward(ctx, {_names('t', returned) or '*_'}):",
                        *bwd.lines]) + "\n"
    make_function(source, "forward", ns.values)
    return type("CompiledFunction", (torch.autograd.Function,), {
        "forward": staticmethod(ns.values["forward"]),
        # not traced by dynamo when autograd runs it inside a compiled function
        "backward": staticmethod(_torch.dynamo_disabled(ns.values["backward"])),
        "__aotgrad_source__": source})


def _writes_in_forward(sig: Signature, compiled: CompiledGraphs,
                       boundary: subclass.Boundary | None) -> tuple[int, ...]:
    """Note [Writes in the forward]: graph outputs (new values of mutated
    inputs) that the autograd.Function's forward writes back itself, instead
    of returning them: data-only mutations of plain inputs that do not
    require grad, whose new value autograd never sees, and that no output is a
    view of.  Each output an autograd.Function returns costs microseconds in
    the forward and in the engine; these need none."""
    if boundary is not None or compiled.backward is None:
        return ()
    return _written_in_forward(sig, compiled.repeated_outputs)


def _written_in_forward(sig: Signature, repeated: Sequence[int]) -> tuple[int, ...]:
    viewed = _viewed_inputs(sig)
    return tuple(k for k, i in enumerate(sig.mutated_inputs_out_of_graph)
                 if _copied_back(x := sig.inputs[i]) and not x.mutation_needs_grad and
                 not x.requires_grad and i not in viewed and k not in repeated)


def _copied_back(x: InputInfo) -> bool:
    """Whether the input's write-back is its new values alone (a ``copy_``)."""
    return x.mutates_data and not x.mutates_metadata and not x.mutates_storage and \
        not x.detached_in_place


# Note [Updates in place]
# ~~~~~~~~~~~~~~~~~~~~~~~
# A functional graph returns the new value of a mutated input, and the
# runtime copies it into the input: ``add = add(buf, 1)`` in the graph, then
# ``buf.copy_(add)``, where eager ran ``buf.add_(1)``.  When the runtime's
# write-back is a plain ``copy_`` (inference graphs, Note [Writes in the
# forward] for training), ``input_updates`` says so on the graph
# (``codegen.INPUT_UPDATES_META``), and a compiler may compute the value into
# the input instead; ``nop`` does where that is exact
# (``codegen._updates_in_place``: the input is not read afterwards, same
# metadata, no overlapping argument) and reports the positions
# (``CompiledGraphs.updated_in_place``), whose write-back the runtime then
# leaves out.  One op and one allocation fewer, and the input's version
# counter moves once, as in eager.


def input_updates(sig: Signature, gm: Any, joint: bool) -> dict[int, int]:
    """Note [Updates in place]: graph output position -> graph input index."""
    if sig.has_subclasses:
        return {}
    if joint:
        positions = _written_in_forward(sig, repeated_outputs(gm, sig.num_graph_outputs))
    else:
        positions = tuple(k for k, i in enumerate(sig.mutated_inputs_out_of_graph)
                          if _copied_back(sig.inputs[i]))
    return {k: sig.mutated_inputs_out_of_graph[k] for k in positions}


def _diff_meta(outputs: list) -> list:
    """Per differentiable output, (shape, dtype, device) of its plain tensors."""
    return [[(p.shape, p.dtype, p.device) for p in subclass.flatten_all([t])] for t in outputs]


def _tangent_layouts(sig: Signature, k: int) -> tuple[tangents_mod.TangentLayout, ...]:
    """Note [Tangent strides]: the traced layouts of graph output ``k``'s plain tangents."""
    if k < len(sig.tangent_layouts) and sig.tangent_layouts[k]:
        return sig.tangent_layouts[k]
    return (tangents_mod.CONTIGUOUS,)  # a Signature made before tangent layouts


def _coerce_source(src: _Source, k: int, layout: tangents_mod.TangentLayout,
                   plain: bool) -> str:
    """The expression giving gradient ``t{k}`` the layout its tangent was
    traced in (Note [Tangent strides])."""
    if plain:
        return f"t{k}.contiguous()"
    if layout.stride is not None:
        return f"{src.bind(tangents_mod.restride, 'restride')}(t{k}, {layout.stride!r})"
    return f"t{k}.contiguous(memory_format={src.bind(layout.format, 'memory_format')})"


def _subclass_tangents(ctx: Any, tangents: list, layouts: list, diff: tuple,
                       strided: list) -> tuple[list, tuple]:
    """The backward graph's plain tangents from (maybe subclass) gradients, and
    the positions of the zeros made for missing ones; each in the layout it
    was traced in (Note [Tangent strides], per plain tensor)."""
    missing: list[int] = []
    plain: list = []
    for j, t in enumerate(tangents):
        if t is None:
            for (shape, dtype, device), layout in zip(ctx.diff_meta[j], _cycle(strided[j])):
                missing.append(len(plain))
                plain.append(tangents_mod.zeros(shape, dtype, device, layout))
        else:
            t = subclass.coerce_tangent(t, layouts[j], diff[j])
            plain.extend(tangents_mod.coerce(p, layout)
                         for p, layout in zip(subclass.flatten_all([t]), _cycle(strided[j])))
    return plain, tuple(missing)


def _cycle(layouts: tuple) -> Any:
    """The layouts of a tangent's plain tensors (contiguous where unknown)."""
    yield from layouts
    while True:
        yield tangents_mod.CONTIGUOUS


def _drop_missing(grads: Sequence, missing: tuple, left_none: Callable) -> list:
    """Note [Gradients that eager leaves None] (missing.py)."""
    none = left_none(missing)
    return [None if i in none else g for i, g in enumerate(grads)] if none else grads


def _backward_writes(bwd: _Source, writes: tuple) -> None:
    """Note [Mutations in the backward] (trace.py): the backward graph
    returns the new values of what it wrote after the gradients; they are
    copied into the inputs (kept on ctx by the forward) and the gradient
    tensors given."""
    bwd("grads = list(grads)")
    bwd(f"new = grads[{-len(writes)}:]")
    bwd(f"del grads[{-len(writes)}:]")
    no_grad = bwd.bind(torch.no_grad, "no_grad")
    bwd(f"with {no_grad}():")
    k_input = 0
    for m, w in enumerate(writes):
        if w.of_tangent:
            bwd(f"if given{w.index} is not None:", 2)
            bwd(f"given{w.index}.copy_(new[{m}])", 3)
        else:
            bwd(f"ctx.written[{k_input}].copy_(new[{m}])", 2)
            k_input += 1


# ---------------------------------------------------------------- input mutations

def _alias_check(src: _Source, sig: Signature, num_params_buffers: int) -> None:
    """Note [Aliased mutated inputs]: a program compiled for unaliased inputs
    must not run on a call whose mutated inputs share storage with other
    inputs (functionalization would miss the aliasing): raise
    ``AliasedMutatedInputs`` so the caller compiles the rebased program
    (rebase.py).  Parameters and buffers are assumed not to alias each other;
    only mutated inputs and user inputs are compared."""
    mutated = [i for i, x in enumerate(sig.inputs) if x.mutated]
    if not mutated:
        return
    candidates = sorted(set(mutated) | set(range(num_params_buffers, len(sig.inputs))))
    if len(candidates) < 2:
        return
    ptr = src.bind(subclass.storage_ptr, "storage_ptr")
    tensor = src.bind(torch.Tensor, "Tensor")
    read = f"{ptr}(x)" if sig.has_subclasses else "x.untyped_storage().data_ptr()"
    # the candidates' storages (a non-tensor: its id, unlike any storage's);
    # all distinct is the common case; else ``_mutated_aliased`` tells a
    # mutated input's clash from two unmutated user inputs sharing storage
    # (which is fine)
    src(f"ptrs = [{read} if isinstance(x, {tensor}) else id(x) "
        f"for x in ({_names('i', candidates)},)]")
    positions = tuple(k for k, i in enumerate(candidates) if sig.inputs[i].mutated)
    src(f"if len(set(ptrs)) != {len(candidates)} and "
        f"{src.bind(_mutated_aliased, 'mutated_aliased')}(ptrs, {positions}):")
    # Note [Only overlapping inputs are merged] (rebase.py)
    mutated_set = src.bind(frozenset(mutated), "mutated")
    src(f"groups = {src.bind(alias_groups, 'alias_groups')}("
        f"[{_names('i', range(len(sig.inputs)))}], {mutated_set})", 2)
    src("if groups:", 2)
    src(f"raise {src.bind(AliasedMutatedInputs, 'Aliased')}(groups, {mutated_set})", 3)


def _mutated_aliased(ptrs: list, mutated: tuple[int, ...]) -> bool:
    """Does a storage at a ``mutated`` position of ``ptrs`` occur elsewhere in it?"""
    return any(ptrs.count(ptrs[k]) > 1 for k in mutated)


def _write_back(src: _Source, sig: Signature, written: tuple[int, ...],
                updated: frozenset[int] = frozenset()) -> None:
    """Note [Writing mutations back]: for each input the graph returned a new
    value for, in input order: ``set_`` when its storage was swapped;
    otherwise ``as_strided_`` when its metadata changed, then ``copy_`` when
    its data changed.  The copy_ runs under autograd only when the mutation
    is one autograd must see (then the input's history continues through the
    compiled function, as after the eager in-place op)."""
    for i, x in enumerate(sig.inputs):
        if x.detached_in_place:  # detach_() on an input: before writing its new value
            src(f"i{i}.detach_()")
    for k, i in enumerate(sig.mutated_inputs_out_of_graph):
        info = sig.inputs[i]
        if k in written or k in updated:
            continue  # Note [Writes in the forward], Note [Updates in place]
        if info.mutates_storage or info.mutates_metadata:
            src(f"{src.bind(_write_one, 'write_one')}(i{i}, o{k}, {src.bind(info, 'info')})")
        elif info.mutates_data and (info.mutation_needs_grad or not info.requires_grad):
            # an input that does not require grad: copy_ records nothing
            # either way (the new value is non-differentiable, or grad is off)
            src(f"i{i}.copy_(o{k})")
        elif info.mutates_data:
            _without_grad(src, f"i{i}.copy_(o{k})")
    for i, x in enumerate(sig.inputs):
        if not x.requires_grad and x.requires_grad_after and not x.mutation_needs_grad:
            src(f"i{i}.requires_grad_(True)")  # requires_grad_() on an input


def _write_one(inp: torch.Tensor, new: torch.Tensor, info: InputInfo) -> None:
    if info.mutates_storage:
        with torch.no_grad():
            inp.set_(new)
        return
    if info.mutates_metadata:
        if inp.is_leaf and inp.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation.")  # eager's error for the in-place view op
        offset = new.storage_offset() if _same_storage(inp, new) else inp.storage_offset()
        inp.as_strided_(new.size(), new.stride(), offset)  # autograd records it, as in eager
    if info.mutates_data:
        if info.mutation_needs_grad:
            inp.copy_(new)
        else:
            with torch.no_grad():
                inp.copy_(new)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return subclass.storage_ptr(a) == subclass.storage_ptr(b)
