"""Stage 7 — runtime: the callable the user gets.

It takes the flat leaves of one call, picks the graph inputs, runs the
compiled graphs, then an epilogue specialised to the ``Signature``:

1. inference: the compiled inference graph is called directly; training: a
   ``torch.autograd.Function`` made for this one compiled program runs the
   compiled forward, keeps the saved values on its ctx, and its backward runs
   the compiled backward (both boxed: see ``compile.py``);
2. input mutations the graph returned are written back into the caller's
   tensors (Note [Writing mutations back]);
3. the user's outputs are assembled: graph outputs, the caller's own input
   objects, aliases rebuilt as views (Note [Rebuilding aliased outputs]) and
   constants.

Note [Autocast is traced in]: a graph traced under autocast holds autocast's
casts as ops; the runtime runs it with autocast off, or ops would be cast a
second time (custom ops with an autocast kernel would even compute
differently).  The autocast state is part of the guard key.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from . import _torch, config, subclass
from ._torch import pytree
from .analyze import InputInfo, OutputInfo, OutputKind, Signature
from .compile import CompiledGraphs
from .flatten import FlatInputs
from .rebase import AliasedMutatedInputs, alias_groups
from .saved_hooks import hooks_off
from .views import AliasPlan, replay


def build_runtime(flat: FlatInputs, sig: Signature, compiled: CompiledGraphs,
                  plans: dict[int, AliasPlan] | None = None,
                  poisoned: dict[int, str] | None = None,
                  boundary: subclass.Boundary | None = None) -> Callable[[list], Any]:
    """A function of the call's flat leaves returning the user's output.

    ``plans``: view-replay plans of rebuilt outputs (views.py); ``boundary``:
    the subclass layouts (Note [Subclasses at the boundary])."""
    graph_leaf = flat.graph_leaf
    run_graphs = (_training_runner(sig, compiled, poisoned or {}, boundary)
                  if compiled.backward is not None else
                  _inference_runner(sig, compiled, boundary))
    if config.debug_assert:
        run_graphs = _with_output_checks(run_graphs, sig)
    write_back = _mutation_writer(sig)
    plans = plans if config.view_replay_for_aliased_outputs else {}
    # Note [Views taken before a mutation]: an output that is a view of an
    # input taken before the input was mutated is rebuilt before the mutation
    # is written back (so its metadata, and autograd's view bookkeeping, are
    # as in eager).
    early = frozenset(
        i for i, p in (plans or {}).items() if p.from_original_input and (
            sig.inputs[sig.outputs[i].base].mutated or
            # still requires grad: it was taken before the input's detach_()
            (sig.inputs[sig.outputs[i].base].detached_in_place and sig.outputs[i].requires_grad)))
    assemble = _Assembler(sig, plans or {}, early)

    check_aliasing = _alias_guard(sig, flat.num_params_buffers)

    if write_back is None and check_aliasing is None:
        def call(leaves: list) -> Any:
            inputs = [leaves[i] for i in graph_leaf]
            outs = run_graphs(inputs)
            return assemble(outs, inputs, {})
    else:
        def call(leaves: list) -> Any:
            inputs = [leaves[i] for i in graph_leaf]
            if check_aliasing is not None:
                check_aliasing(inputs)
            outs = run_graphs(inputs)
            built = assemble.rebuild(early, outs, inputs, {}) if early else {}
            if write_back is not None:
                write_back(inputs, outs)
            return assemble(outs, inputs, built)

    return call


def _plain_positions(sig: Signature) -> tuple[int, ...]:
    """Note [Lone views] (analyze.py): graph outputs returned as they are, and
    intermediate bases, are never views of the graph's intermediates
    (multi-output views excepted)."""
    first_user = len(sig.mutated_inputs_out_of_graph)
    first_base = first_user + len(sig.user_graph_outputs)
    return tuple(first_user + j for j, i in enumerate(sig.user_graph_outputs)
                 if sig.outputs[i].kind.through_autograd and
                 not sig.outputs[i].multi_output_view) + \
        tuple(range(first_base, first_base + sig.num_intermediate_bases))


def _unview(outs: list, positions: tuple[int, ...]) -> None:
    for k in positions:
        t = outs[k]
        if isinstance(t, torch.Tensor) and t._is_view():
            outs[k] = _torch.unsafe_view(t)


def _inference_runner(sig: Signature, compiled: CompiledGraphs,
                      boundary: subclass.Boundary | None) -> Callable[[list], list]:
    """No output of an inference graph needs grad (else the analysis would have
    asked for a joint graph), so it runs under no_grad: in-graph mutations of
    inputs that require grad are then allowed, as they were when traced."""
    forward = compiled.forward
    plain = _plain_positions(sig)
    if boundary is not None:  # Note [Subclasses at the boundary]
        def forward(args: list, graph=compiled.forward, layouts=boundary.outputs) -> list:
            return subclass.rebuild_list(layouts, graph(subclass.flatten_all(args)))

    autocast_on = any(_torch.autocast_state())  # at compile time (part of the guard key)

    def run(inputs: list) -> list:
        with torch.no_grad():
            if autocast_on:  # Note [Autocast is traced in]
                with _torch.autocast_disabled():
                    outs = list(forward(list(inputs)))
            else:
                outs = list(forward(list(inputs)))
        _unview(outs, plain)
        return outs

    return run


def _training_runner(sig: Signature, compiled: CompiledGraphs, poisoned: dict[int, str],
                     boundary: subclass.Boundary | None) -> Callable[[list], list]:
    """Note [No double backward]: the compiled backward is a graph over saved
    values that autograd cannot see through, so differentiating its result
    again would silently drop terms.  It runs under no_grad; with
    create_graph=True its gradients are tied to an error node instead."""
    forward, backward = compiled.forward, compiled.backward
    num_out = compiled.num_fwd_outputs
    end_tensors = num_out + compiled.num_saved_tensors
    mask = sig.tangent_mask
    diff = tuple(k for k, m in enumerate(mask) if m)
    non_diff = tuple(k for k, m in enumerate(mask) if not m)
    plain = _plain_positions(sig)
    # Note [Distinct outputs] (compile.py): non-differentiable ones are
    # detached (they share storage, as the runtime needs); others cloned.
    distinct = tuple((k, not mask[k]) for k in compiled.repeated_outputs)
    deps = compiled.tangent_deps
    autocast_on = any(_torch.autocast_state())  # at compile time (part of the guard key)
    # Note [Subclasses at the boundary]: graph inputs, user outputs, tangents
    # and gradients cross between subclass and plain tensors here
    flatten = subclass.flatten_all if boundary is not None else list
    tangent_layouts = [] if boundary is None else \
        [boundary.outputs[k] for k in diff]

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            if autocast_on:
                with _torch.autocast_disabled():
                    outs = forward(flatten(inputs))
            else:
                outs = forward(flatten(inputs))
            ctx.save_for_backward(*outs[num_out:end_tensors])
            ctx.symints = outs[end_tensors:]
            user = list(outs[:num_out])
            for k, detach in distinct:
                if isinstance(user[k], torch.Tensor):
                    user[k] = user[k].detach() if detach else user[k].clone()
            if boundary is not None:
                user = subclass.rebuild_list(boundary.outputs, user)
            _unview(user, plain)
            marks = [user[k] for k in non_diff if isinstance(user[k], torch.Tensor)]
            if marks:
                ctx.mark_non_differentiable(*marks)
            ctx.set_materialize_grads(False)
            # per differentiable output, (shape, dtype, device) of its plain tensors
            ctx.diff_meta = [[(t.shape, t.dtype, t.device)] for t in (user[k] for k in diff)] \
                if boundary is None else \
                [[(p.shape, p.dtype, p.device) for p in flatten([user[k]])] for k in diff]
            return tuple(user)

        @staticmethod
        def backward(ctx, *grads):
            plain_tangents, missing = _tangents(ctx, grads)
            del grads
            # Note [Freeing saved values]: the compiled backward is called boxed
            # with the only references to the saved values and tangents (ctx's
            # are cleared unless retain_graph), so each dies at its last use
            create_graph = torch.is_grad_enabled()
            num_tangents = len(plain_tangents)
            args = [*ctx.symints, *ctx.saved_tensors, *plain_tangents]
            kept = args[len(ctx.symints):] if create_graph else None
            del plain_tangents
            ctx.maybe_clear_saved_tensors()
            # Note [Autocast is traced in]: the graphs hold autocast's casts
            with torch.no_grad(), _torch.autocast_disabled():
                grad_inputs = list(backward(args))
            del args
            if missing:  # Note [Gradients that eager leaves None] (compile.py)
                present = frozenset(j for j in range(num_tangents) if j not in missing)
                grad_inputs = [None if not (deps[i] & present) else g
                               for i, g in enumerate(grad_inputs)]
            if boundary is not None:
                grad_inputs = subclass.rebuild_list(boundary.grads, grad_inputs)
            if create_graph:  # create_graph=True: Note [No double backward]
                return _refuse_double_backward(grad_inputs, kept)
            return tuple(grad_inputs)

    def _tangents(ctx, grads: tuple) -> tuple[list, set[int]]:
        """The backward graph's tangents (plain, contiguous; zeros where
        autograd gave none) and the positions of those zeros."""
        tangents = [grads[k] for k in diff]
        for j, message in poisoned.items():  # Note [Poisoned gradients] (trace.py)
            if tangents[j] is not None:
                raise RuntimeError(message)
        missing: set[int] = set()
        plain_tangents = []
        for j, t in enumerate(tangents):
            if t is None:
                for shape, dtype, device in ctx.diff_meta[j]:
                    missing.add(len(plain_tangents))
                    plain_tangents.append(torch.zeros(shape, dtype=dtype, device=device))
            elif boundary is None:
                plain_tangents.append(t.contiguous())
            else:
                subclass.check_tangent(t, tangent_layouts[j], diff[j])
                plain_tangents.extend(p.contiguous() for p in flatten([t]))
        return plain_tangents, missing

    CompiledFunction.__name__ = "CompiledFunction"
    apply = CompiledFunction.apply

    if compiled.saved_hooks_inlined:
        def run(inputs: list) -> list:
            with hooks_off():  # autograd packs saved tensors when apply returns
                return list(apply(*inputs))
    else:
        def run(inputs: list) -> list:
            return list(apply(*inputs))

    return run


class _RefuseDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, num_grads, *tensors):
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "aotgrad: differentiating the gradient of a compiled function (double backward, "
            "e.g. a gradient penalty) is not supported: the compiled backward is opaque to "
            "autograd. Run that part of the model eagerly.")


def _refuse_double_backward(grad_inputs: list, backward_inputs: list) -> tuple:
    """Gradients that raise a clear error if autograd differentiates them."""
    present = [k for k, g in enumerate(grad_inputs) if g is not None]
    deps = [t for t in backward_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not present or not deps:
        return tuple(grad_inputs)
    wrapped = _RefuseDoubleBackward.apply(len(present), *[grad_inputs[k] for k in present], *deps)
    out = list(grad_inputs)
    for k, g in zip(present, wrapped):
        out[k] = g
    return tuple(out)


# ---------------------------------------------------------------- input mutations

def _alias_guard(sig: Signature, num_params_buffers: int) -> Callable[[list], None] | None:
    """Note [Aliased mutated inputs]: a program compiled for unaliased inputs
    must not run on a call whose mutated inputs share storage with other
    inputs (functionalization would miss the aliasing): raise
    ``AliasedMutatedInputs`` so the caller compiles the rebased program
    (rebase.py).  Parameters and buffers are assumed not to alias each other;
    only mutated inputs and user inputs are compared."""
    mutated = [i for i, x in enumerate(sig.inputs) if x.mutated]
    if not mutated:
        return None
    candidates = sorted(set(mutated) | set(range(num_params_buffers, len(sig.inputs))))

    def check(inputs: list) -> None:
        seen: dict[int, int] = {}
        for i in candidates:
            t = inputs[i]
            if isinstance(t, torch.Tensor):
                ptr = subclass.storage_ptr(t)
                if ptr in seen and (i in mutated or seen[ptr] in mutated):
                    raise AliasedMutatedInputs(alias_groups(inputs))
                seen.setdefault(ptr, i)

    return check


def _mutation_writer(sig: Signature) -> Callable[[list, list], None] | None:
    """Note [Writing mutations back]: for each input the graph returned a new
    value for, in input order: ``set_`` when its storage was swapped;
    otherwise ``as_strided_`` when its metadata changed, then ``copy_`` when
    its data changed.  The copy_ runs under autograd only when the mutation
    is one autograd must see (then the input's history continues through the
    compiled function, as after the eager in-place op)."""
    plan = [(k, i, sig.inputs[i]) for k, i in enumerate(sig.mutated_inputs_out_of_graph)]
    detached = [i for i, x in enumerate(sig.inputs) if x.detached_in_place]
    made_grad = [i for i, x in enumerate(sig.inputs)
                 if not x.requires_grad and x.requires_grad_after and not x.mutation_needs_grad]
    if not plan and not detached and not made_grad:
        return None

    def write_back(inputs: list, outs: list) -> None:
        for i in detached:  # detach_() on an input: before writing its new value
            inputs[i].detach_()
        for k, i, info in plan:
            _write_one(inputs[i], outs[k], info)
        for i in made_grad:  # requires_grad_() on an input
            inputs[i].requires_grad_(True)

    return write_back


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


# ---------------------------------------------------------------- outputs

class _Assembler:
    """Builds the user's outputs from graph outputs, inputs and constants."""

    def __init__(self, sig: Signature, plans: dict[int, AliasPlan], early: frozenset[int]):
        self.sig = sig
        self.plans = plans
        first_user = len(sig.mutated_inputs_out_of_graph)
        self.graph_pos = {i: first_user + j for j, i in enumerate(sig.user_graph_outputs)}
        self.first_user = first_user
        self.first_base = first_user + len(sig.user_graph_outputs)
        # a view made under no_grad of a tensor that requires grad is, in eager,
        # a leaf that requires grad
        self.no_grad_leaves = frozenset(i for i, o in enumerate(sig.outputs) if
                                        o.kind.through_autograd and o.no_grad_view and
                                        o.requires_grad)
        self.simple = all(o.kind.through_autograd for o in sig.outputs) and \
            not self.no_grad_leaves
        # outputs that refer to other outputs come after them
        rank = {OutputKind.ALIAS_OF_INPUT: 1, OutputKind.ALIAS_OF_INTERMEDIATE: 1,
                OutputKind.ALIAS_OF_OUTPUT: 2, OutputKind.SAME_AS_OUTPUT: 3}
        self.order = [i for i in sorted(range(len(sig.outputs)),
                                        key=lambda i: rank.get(sig.outputs[i].kind, 0))
                      if i not in early]

    def rebuild(self, which, outs: list, inputs: list, leaves: Any) -> dict[int, Any]:
        built = {}
        for i in which:
            info = self.sig.outputs[i]
            kind = info.kind
            base = (inputs[info.base] if kind is OutputKind.ALIAS_OF_INPUT else
                    leaves[info.base] if kind is OutputKind.ALIAS_OF_OUTPUT else
                    outs[self.first_base + info.base])
            graph_base = (outs[self.graph_pos[info.base]] if kind is OutputKind.ALIAS_OF_OUTPUT
                          else outs[self.first_base + info.base]
                          if kind is OutputKind.ALIAS_OF_INTERMEDIATE else None)
            built[i] = rebuild_alias(base, outs[self.graph_pos[i]], info, self.plans.get(i),
                                     graph_base)
        return built

    def __call__(self, outs: list, inputs: list, built: dict[int, Any]) -> Any:
        sig = self.sig
        if self.simple:
            return pytree.tree_unflatten(outs[self.first_user:], sig.out_spec)
        leaves: list = [None] * len(sig.outputs)
        for i, v in built.items():
            leaves[i] = v
        for i in self.order:
            info = sig.outputs[i]
            kind = info.kind
            if kind.through_autograd:
                leaves[i] = outs[self.graph_pos[i]]
                if i in self.no_grad_leaves:
                    leaves[i] = leaves[i].detach().requires_grad_()
            elif kind is OutputKind.IS_INPUT:
                leaves[i] = inputs[info.base]
            elif kind is OutputKind.CONSTANT:
                leaves[i] = info.constant
            elif kind is OutputKind.SAME_AS_OUTPUT:
                leaves[i] = leaves[info.base]
            else:
                leaves[i] = self.rebuild((i,), outs, inputs, leaves)[i]
        return pytree.tree_unflatten(leaves, sig.out_spec)


def rebuild_alias(base: torch.Tensor, value: torch.Tensor, info: OutputInfo,
                  plan: AliasPlan | None, graph_base: torch.Tensor | None = None) -> torch.Tensor:
    """Note [Rebuilding aliased outputs]: the graph computed ``value`` as an
    alias of ``base``; the user must get a tensor autograd knows is a view of
    ``base`` (so in-place ops on either, and gradients, behave as in eager).
    With a view-replay plan the view ops that made ``value`` run again on
    ``base`` (grad_fns as in eager); otherwise ``as_strided`` with the
    metadata the analysis recorded (or ``value``'s, when it shares ``base``'s
    storage, or its offset relative to ``graph_base``, the graph's value of
    ``base``).  An eager output that did not require grad is rebuilt under
    no_grad (a view) or detached (not a view, e.g. ``.detach()``)."""
    if info.via_detached_alias:
        base = base.detach()  # eager's view chain went through .detach()
    grad_ctx = torch.no_grad() if info.no_grad_view or not info.requires_grad \
        else contextlib.nullcontext()
    with grad_ctx:
        if plan is not None:
            out = replay(base, plan.steps)
        else:
            if info.alias_meta is not None:
                size, stride, offset = info.alias_meta
            elif _same_storage(base, value):
                size, stride, offset = value.size(), value.stride(), value.storage_offset()
            elif graph_base is not None and _same_storage(graph_base, value):
                size, stride = value.size(), value.stride()
                offset = base.storage_offset() + value.storage_offset() - graph_base.storage_offset()
            else:
                raise RuntimeError(
                    "aotgrad: the compiled graph returned an output that should alias one of "
                    "its inputs or outputs but does not share its storage; the compiler broke "
                    "aliasing. Use a compiler that preserves output aliasing, or return a copy "
                    "(.clone()).")
            out = base.as_strided(size, stride, offset)
    if not info.is_view and out._is_view():
        out = out.detach()  # e.g. eager's .detach(): shares storage, not a view
    return out


def _with_output_checks(run: Callable[[list], list], sig: Signature) -> Callable[[list], list]:
    """Note [debug_assert]: check the compiled graph returns what analysis predicted."""
    expected = sig.graph_output_meta

    def checked(inputs: list) -> list:
        outs = run(inputs)
        if len(outs) != len(expected):
            raise AssertionError(
                f"aotgrad debug_assert: the compiled graph returned {len(outs)} outputs, "
                f"the analysis predicted {len(expected)}")
        for k, (o, meta) in enumerate(zip(outs, expected)):
            if meta is None:
                continue  # a symbolic size
            shape, dtype, _ = meta
            if not isinstance(o, torch.Tensor) or o.dtype != dtype or o.dim() != len(shape):
                raise AssertionError(
                    f"aotgrad debug_assert: graph output {k} is "
                    f"{type(o).__name__}{getattr(o, 'dtype', '')} with "
                    f"{getattr(o, 'dim', lambda: '?')()} dims; expected {dtype} with "
                    f"{len(shape)} dims")
        return outs

    return checked
