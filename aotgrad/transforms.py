"""Compiled functions under torch.func transforms and forward-mode AD.

Note [Under transforms]
~~~~~~~~~~~~~~~~~~~~~~~
A compiled program is made for plain tensors.  Called under a torch.func
transform (``grad``, ``vjp``, ``jacrev``, ``hessian``, ``vmap``, ``jvp``,
``jacfwd``, their compositions) its inputs are functorch wrappers, and with
``torch.autograd.forward_ad`` they carry tangents that a compiled kernel never
sees (a kernel's outputs would come back without tangents: wrong values,
silently).  Such a call (``needed``: a transform is active, or an input is a
dual tensor) runs as one ``autograd.Function`` of the program instead
(``Lifted``: per input structure; ``_Transformed``), whose every rule is an
aotgrad-compiled program, compiled with the user's compilers at its first use
and kept:

* forward: the program itself, on the tensors with every transform level
  peeled off (functorch calls it at the bottom of its stack), under no_grad:
  its inference program;
* backward (a ``grad`` level): ``vjp``, the program's VJP with
  ``torch.func.vjp`` traced into the graph, per set of inputs that need
  gradients;
* jvp (a ``jvp`` level, dual tensors): the program's JVP with
  ``torch.func.jvp`` traced in, per set of inputs that have tangents;
* vmap (a ``vmap`` level): ``torch.func.vmap`` of the program traced in, per
  ``in_dims`` and randomness: the batched program is one compiled graph.

Functorch peels one level at a time (``custom_function_call``) and calls
these rules at the level below, where each rule is again a compiled
function: ``jacrev`` is the compiled vmap of the compiled VJP, ``hessian``
the compiled JVP of it, to any depth.  The backward and the JVP run the
program again from its inputs (no values are saved between the rules), so
they compute its forward a second time: ``grad`` of a compiled function
costs a forward more than the program's own backward would.

Refused, with an error at the rule that would be wrong: a program that draws
random numbers, differentiated (its second run would draw others: the RNG
state is compared around the first), and a program that changes its inputs
in place (autograd at the transform's level would not see the change).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD

from . import _torch
from ._torch import pytree
from .subclass import hashable


def needed(leaves: list) -> bool:
    """Note [Under transforms]: whether a call with these leaves must be lifted.
    Wrappers of a transform no longer running (a ``vjp`` function called
    after ``vjp`` returned) are unwrapped in ``leaves``, as
    ``autograd.Function.apply`` does."""
    if _torch.functorch_transforms_active():
        return True
    leaves[:] = _alive(leaves)
    return _torch.forward_ad_level() >= 0 and _torch.forward_grad_enabled() and any(
        isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in leaves)


def _alive(tensors: Any) -> list:
    """The tensors, those a finished transform wrapped unwrapped (a compiled
    program's fast path takes its arguments as they come)."""
    return [_torch.unwrap_if_dead(t) if isinstance(t, torch.Tensor) else t for t in tensors]


def lifted_key(leaves: list, in_spec: Any, flat: bool) -> tuple:
    return ("transforms", flat, in_spec,
            tuple(None if isinstance(v, torch.Tensor) else (type(v), hashable(v)) for v in leaves))


class Lifted:
    """Note [Under transforms]: one input structure of a compiled function
    (its tree and constants), called as ``run(leaves)`` like a compiled program."""

    def __init__(self, owner: Any, leaves: list, in_spec: Any, flat: bool):
        self.owner = owner            # the AOTFunction
        self.in_spec = in_spec
        self.flat = flat
        self.slots = tuple(k for k, v in enumerate(leaves) if isinstance(v, torch.Tensor))
        self.constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self.out_spec: Any = None
        self._programs: dict[tuple, Callable] = {}
        self.__name__ = owner.__name__

    def __call__(self, leaves: list) -> Any:
        if _torch.functorch_transforms_active() and _torch.functionalize_running():
            raise RuntimeError(
                f"aotgrad: torch.func.functionalize of the compiled function {self.__name__} "
                "is not supported. aotgrad's graphs are functional already: call the compiled "
                "function itself, or functionalize the original function.")
        out = _Transformed.apply(self, *[leaves[k] for k in self.slots])
        return pytree.tree_unflatten(list(out[:-1]), self.out_spec)

    def leaves(self, tensors: tuple) -> list:
        leaves = list(self.constants)
        for k, t in zip(self.slots, tensors):
            leaves[k] = t
        return leaves

    def call(self, tensors: tuple) -> list:
        """The compiled program on plain tensors: its output leaves."""
        args, kwargs = pytree.tree_unflatten(self.leaves(tensors), self.in_spec)
        run, leaves, in_spec, key = self.owner.lookup(args, kwargs, self.flat, lift=False)
        out, spec = pytree.tree_flatten(self.owner.run(run, leaves, in_spec, key))
        self.out_spec = spec
        return out

    def function(self, *tensors: torch.Tensor) -> tuple:
        """The user's function on the tensor leaves (traced by the rules' programs)."""
        args, kwargs = pytree.tree_unflatten(self.leaves(tensors), self.in_spec)
        out, spec = pytree.tree_flatten(self.owner.fn(*args, **kwargs))
        self.out_spec = spec
        return tuple(out)

    def rule_program(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        """A rule's compiled program, made at its first use."""
        program = self._programs.get(key)
        if program is None:
            options = self.owner.options
            options = dataclasses.replace(options, num_params_buffers=0,
                                          keep_inference_input_mutations=False)
            program = self._programs[key] = options.compile_function(make(), options)
        return program


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class _Rule:
    """A rule's function of the program (traced by its own compiled program)."""

    def __init__(self, lifted: Lifted, kind: str, *spec: Any):
        self.lifted = lifted
        self.spec = spec
        self.__name__ = f"{lifted.__name__}_{kind}"


class _VJP(_Rule):
    """``(*tensors, *cotangents of outputs diff) -> grads of inputs wrt``."""

    def __call__(self, *args: Any) -> tuple:
        wrt, diff = self.spec
        n = len(self.lifted.slots)
        tensors, cotangents = list(args[:n]), args[n:]

        def of_wrt(*values: torch.Tensor) -> tuple:
            for i, v in zip(wrt, values):
                tensors[i] = v
            out = self.lifted.function(*tensors)
            return tuple(out[k] for k in diff)

        _, pullback = torch.func.vjp(of_wrt, *[tensors[i] for i in wrt])
        return tuple(pullback(tuple(cotangents)))


class _JVP(_Rule):
    """``(*tensors, *tangents of inputs given) -> tangents of outputs diff``."""

    def __call__(self, *args: Any) -> tuple:
        given, diff = self.spec
        n = len(self.lifted.slots)
        tensors, tangents = list(args[:n]), args[n:]

        def of_given(*values: torch.Tensor) -> tuple:
            for i, v in zip(given, values):
                tensors[i] = v
            out = self.lifted.function(*tensors)
            return tuple(out[k] for k in diff)

        # a primal whose elements overlap (an expanded cotangent, in a VJP
        # program) would get its tangent laid out as it, and copied into
        primals = tuple(tensors[i].contiguous() for i in given)
        with _torch.jvp_in_open_dual_level():  # forward_ad's duals: their level is open
            return tuple(torch.func.jvp(of_given, primals, tuple(tangents))[1])


class _Vmapped(_Rule):
    """``vmap`` of the program over ``in_dims``: its outputs, batched at 0."""

    def __call__(self, *tensors: torch.Tensor) -> tuple:
        in_dims, randomness = self.spec
        others: dict[int, Any] = {}  # outputs that are no tensors: vmap returns tensors only

        def batched(*values: torch.Tensor) -> tuple:
            out = self.lifted.function(*values)
            others.update((k, v) for k, v in enumerate(out) if not isinstance(v, torch.Tensor))
            return tuple(v for v in out if isinstance(v, torch.Tensor))

        out = iter(torch.func.vmap(batched, in_dims=in_dims, randomness=randomness)(*tensors))
        return tuple(others[k] if k in others else next(out)
                     for k in range(self.lifted.out_spec.num_leaves))


def _rng_marks(tensors: tuple) -> tuple:
    """What changes when a program draws random numbers (the default generators
    of the CPU and of the inputs' CUDA devices)."""
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return (torch.random.get_rng_state(),
            *(torch.cuda.default_generators[d].get_offset() for d in cuda))


def _drew_random(before: tuple, after: tuple) -> bool:
    return not torch.equal(before[0], after[0]) or before[1:] != after[1:]


def _check_unchanged(lifted: Lifted, tensors: tuple, versions: list) -> None:
    changed = [k for k, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
    if changed:
        raise RuntimeError(
            f"aotgrad: {lifted.__name__} changes its input(s) {changed} (tensor leaves) in "
            "place, and it was called under a torch.func transform or with forward-mode "
            "dual tensors: the transform would not see the change, so aotgrad does not "
            "support it. Return the new values instead of writing into the inputs, or call "
            "the function outside the transform.")


def _refuse_random(ctx: Any, what: str) -> None:
    if ctx.drew_random:
        raise RuntimeError(
            f"aotgrad: {ctx.lifted.__name__} draws random numbers (dropout, rand, ...), and "
            f"its {what} under a torch.func transform or forward-mode AD would run it again "
            "and draw other numbers: the result would be wrong. Put it in eval mode (or "
            "without random ops), use torch.autograd.grad / .backward() for reverse mode, "
            "or apply the transform inside the compiled function.")


class _Transformed(torch.autograd.Function):
    """Note [Under transforms]: outputs ``(*program outputs, drew_random)``."""

    @staticmethod
    def forward(lifted: Lifted, *tensors: torch.Tensor) -> tuple:
        versions = [t._version for t in tensors]
        before = _rng_marks(tensors)
        out = lifted.call(tensors)
        _check_unchanged(lifted, tensors, versions)
        return (*out, _drew_random(before, _rng_marks(tensors)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.lifted = inputs[0]
        ctx.drew_random = output[-1]
        ctx.diff = tuple(k for k, o in enumerate(output[:-1]) if _differentiable(o))
        tensors = inputs[1:]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx: Any, *cotangents: Any) -> tuple:
        _refuse_random(ctx, "gradient")
        lifted, diff = ctx.lifted, ctx.diff
        tensors = ctx.saved_tensors
        wrt = tuple(k for k, need in enumerate(ctx.needs_input_grad[1:]) if need)
        grads: list = [None] * (1 + len(tensors))
        if not wrt or not diff:
            return tuple(grads)
        vjp = lifted.rule_program(("vjp", wrt, diff), lambda: _VJP(lifted, "vjp", wrt, diff))
        # (a cotangent may be a wrapper of the vjp that has returned: ``_alive``)
        for i, g in zip(wrt, vjp(*_alive(tensors), *_alive([cotangents[k] for k in diff]))):
            grads[1 + i] = g
        return tuple(grads)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple:
        _refuse_random(ctx, "derivative")
        lifted, diff = ctx.lifted, ctx.diff
        tensors = ctx.saved_tensors
        given = tuple(k for k, t in enumerate(tangents[1:]) if t is not None)
        out: list = [None] * (lifted.out_spec.num_leaves + 1)
        if given and diff:
            jvp = lifted.rule_program(("jvp", given, diff), lambda: _JVP(lifted, "jvp", given, diff))
            for k, t in zip(diff, jvp(*_alive(tensors), *_alive([tangents[1 + i] for i in given]))):
                out[k] = t
        return tuple(out)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, lifted: Lifted, *tensors: torch.Tensor) -> tuple:
        dims = tuple(in_dims[1:])
        program = lifted.rule_program(("vmap", dims, info.randomness),
                                 lambda: _Vmapped(lifted, "vmap", dims, info.randomness))
        versions = [t._version for t in tensors]
        before = _rng_marks(tensors)
        out = program(*tensors)
        _check_unchanged(lifted, tensors, versions)
        return ((*out, _drew_random(before, _rng_marks(tensors))),
                (*[0 if isinstance(o, torch.Tensor) else None for o in out], None))
