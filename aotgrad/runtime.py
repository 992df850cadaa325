"""Stage 7 — runtime: the callable the user gets.

It takes the flat leaves of one call, picks the graph inputs, runs the
compiled graphs and rebuilds the user's output pytree:

* inference: the compiled inference graph is called directly;
* training: a ``torch.autograd.Function`` made for this one compiled program
  runs the compiled forward, keeps the saved values on its ctx, and its
  backward runs the compiled backward (both boxed: see ``compile.py``).

Outputs the graph does not compute are put back here: an output that *is* an
input is the caller's tensor object itself; a constant output is the traced
constant.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import config
from .analyze import OutputKind, Signature
from .compile import CompiledGraphs
from .flatten import FlatInputs
from ._torch import pytree
from .saved_hooks import hooks_off


def build_runtime(flat: FlatInputs, sig: Signature, compiled: CompiledGraphs) -> Callable[[list], Any]:
    """A function of the call's flat leaves returning the user's output."""
    graph_leaf = flat.graph_leaf
    run_graphs = (_training_runner(sig, compiled) if compiled.backward is not None
                  else _inference_runner(compiled))
    if config.debug_assert:
        run_graphs = _with_output_checks(run_graphs, sig)
    assemble = _output_assembler(sig)

    def call(leaves: list) -> Any:
        inputs = [leaves[i] for i in graph_leaf]
        return assemble(run_graphs(inputs), inputs)

    return call


def _inference_runner(compiled: CompiledGraphs) -> Callable[[list], list]:
    forward = compiled.forward

    def run(inputs: list) -> list:
        return forward(list(inputs))

    return run


def _training_runner(sig: Signature, compiled: CompiledGraphs) -> Callable[[list], list]:
    """Note [No double backward]: the compiled backward is a graph over saved
    values that autograd cannot see through, so differentiating its result
    again would silently drop terms.  It runs under no_grad; with
    create_graph=True its gradients are tied to an error node instead."""
    forward, backward = compiled.forward, compiled.backward
    num_out = compiled.num_fwd_outputs
    end_tensors = num_out + compiled.num_saved_tensors
    diff = sig.differentiable_outputs
    graph_infos = [sig.outputs[i] for i in sig.graph_outputs]
    non_diff = tuple(k for k, o in enumerate(graph_infos)
                     if not o.requires_grad and o.dtype is not None)

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outs = forward(list(inputs))
            ctx.save_for_backward(*outs[num_out:end_tensors])
            ctx.symints = outs[end_tensors:]
            user = outs[:num_out]
            if non_diff:
                ctx.mark_non_differentiable(*[user[k] for k in non_diff])
            return tuple(user)

        @staticmethod
        def backward(ctx, *grads):
            tangents = [grads[k].contiguous() for k in diff]
            saved = ctx.saved_tensors
            with torch.no_grad():
                grad_inputs = backward([*ctx.symints, *saved, *tangents])
            if torch.is_grad_enabled():  # create_graph=True: Note [No double backward]
                return _refuse_double_backward(grad_inputs, [*saved, *tangents])
            return tuple(grad_inputs)

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


def _output_assembler(sig: Signature) -> Callable[[list, list], Any]:
    kinds = [o.kind for o in sig.outputs]
    out_spec = sig.out_spec
    if all(k is OutputKind.FRESH for k in kinds):
        return lambda graph_outs, inputs: pytree.tree_unflatten(graph_outs, out_spec)
    plan = []  # (source, index): 0 graph output, 1 input, 2 constant
    g = 0
    for o in sig.outputs:
        if o.kind is OutputKind.FRESH:
            plan.append((0, g))
            g += 1
        elif o.kind is OutputKind.IS_INPUT:
            plan.append((1, o.base))
        elif o.kind is OutputKind.CONSTANT:
            plan.append((2, o.constant))
        else:
            raise AssertionError(f"aotgrad runtime: output kind {o.kind} is not handled")

    def assemble(graph_outs: list, inputs: list) -> Any:
        sources = (graph_outs, inputs)
        leaves = [v if src == 2 else sources[src][v] for src, v in plan]
        return pytree.tree_unflatten(leaves, out_spec)

    return assemble


def _with_output_checks(run: Callable[[list], list], sig: Signature) -> Callable[[list], list]:
    """Note [debug_assert]: check the compiled graph returns what analysis predicted."""
    expected = [sig.outputs[i] for i in sig.graph_outputs]

    def checked(inputs: list) -> list:
        outs = run(inputs)
        if len(outs) != len(expected):
            raise AssertionError(
                f"aotgrad debug_assert: the compiled graph returned {len(outs)} outputs, "
                f"the analysis predicted {len(expected)}")
        for k, (o, info) in enumerate(zip(outs, expected)):
            if info.dtype is None:
                continue  # a symbolic size
            if not isinstance(o, torch.Tensor) or o.dtype != info.dtype or \
                    o.dim() != len(info.shape):
                raise AssertionError(
                    f"aotgrad debug_assert: graph output {k} is "
                    f"{type(o).__name__}{getattr(o, 'dtype', '')} with "
                    f"{getattr(o, 'dim', lambda: '?')()} dims; expected {info.dtype} with "
                    f"{len(info.shape)} dims")
            if o.requires_grad != (info.requires_grad and torch.is_grad_enabled()):
                raise AssertionError(
                    f"aotgrad debug_assert: graph output {k} has requires_grad="
                    f"{o.requires_grad}, the analysis predicted {info.requires_grad}")
        return outs

    return checked
