"""Stage 2 — analyze: run the program once on fake tensors and describe it.

The program runs under fake tensors and functionalization, once, before any
tracing.  What it does to its inputs and how its outputs relate to them is
recorded in a ``Signature``: the single source of truth for every later stage.

Per input:  does it require grad? is its data mutated? its metadata? its
            storage swapped (``set_``)? are all its mutations under no_grad or
            hidden from autograd?
Per output: is it a tensor or a constant? does it require grad? is it fresh,
            an input itself, a view of an input, or a view of an intermediate?

Example — ``def f(a, b): return a + b, a.view(-1), a``::

    inputs:  [InputInfo(requires_grad=True, ...), InputInfo(requires_grad=False, ...)]
    outputs: [OutputInfo(FRESH), OutputInfo(ALIAS_OF_INPUT, base=0), OutputInfo(IS_INPUT, base=0)]
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import _torch
from .flatten import FlatFunction


class OutputKind(enum.Enum):
    FRESH = "fresh"                          # a new tensor, computed by the graph
    IS_INPUT = "is_input"                    # the input tensor itself
    ALIAS_OF_INPUT = "alias_of_input"        # a view of an input
    ALIAS_OF_INTERMEDIATE = "alias_of_intermediate"  # a view of a tensor made inside
    CONSTANT = "constant"                    # not a tensor: returned as traced


@dataclass(frozen=True)
class InputInfo:
    requires_grad: bool
    mutates_data: bool = False
    mutates_metadata: bool = False
    mutates_storage: bool = False            # set_() swapped its storage
    mutations_under_no_grad: bool = False
    mutations_hidden_from_autograd: bool = False

    @property
    def mutated(self) -> bool:
        return self.mutates_data or self.mutates_metadata or self.mutates_storage


@dataclass(frozen=True)
class OutputInfo:
    kind: OutputKind
    requires_grad: bool = False
    base: int | None = None                  # input index for IS_INPUT / ALIAS_OF_INPUT
    constant: Any = None                     # the value for CONSTANT
    dtype: torch.dtype | None = None
    shape: tuple | None = None               # may hold SymInts (dynamic=True)
    device: torch.device | None = None

    @property
    def from_graph(self) -> bool:
        """Whether the compiled graph computes this output."""
        return self.kind is OutputKind.FRESH


@dataclass(frozen=True)
class Signature:
    inputs: tuple[InputInfo, ...]
    outputs: tuple[OutputInfo, ...]
    out_spec: Any                            # TreeSpec of the user's output
    needs_autograd: bool                     # a backward graph is needed

    @property
    def graph_outputs(self) -> tuple[int, ...]:
        """Indices of the user outputs that the graph computes, in order."""
        return tuple(i for i, o in enumerate(self.outputs) if o.from_graph)

    @property
    def differentiable_outputs(self) -> tuple[int, ...]:
        """Indices (into graph_outputs) of the outputs that receive a tangent."""
        return tuple(k for k, i in enumerate(self.graph_outputs)
                     if self.outputs[i].requires_grad)


def analyze(flat_fn: FlatFunction, fake_inputs: Sequence[torch.Tensor], *,
            grad_enabled: bool) -> Signature:
    """Run ``flat_fn`` on fake inputs under functionalization; describe it."""
    with _torch.functional_mode():
        f_inputs = [_torch.to_functional(x) for x in fake_inputs]
        outs = flat_fn(*f_inputs)
        input_infos = tuple(_describe_input(x, fx) for x, fx in zip(fake_inputs, f_inputs))
        storage_owner = {_torch.storage_of(fx): i for i, fx in enumerate(f_inputs)
                         if isinstance(fx, torch.Tensor)}
        shared = _storages_shared_by_outputs(outs)
        output_infos = tuple(_describe_output(o, f_inputs, storage_owner, shared) for o in outs)
    needs_autograd = grad_enabled and any(i.requires_grad for i in input_infos)
    sig = Signature(input_infos, output_infos, flat_fn.out_spec, needs_autograd)
    check_supported(sig)
    return sig


def _describe_input(x: Any, fx: Any) -> InputInfo:
    if not isinstance(x, torch.Tensor):
        return InputInfo(requires_grad=False)  # a symbolic size
    data = _torch.has_data_mutation(fx)
    meta = _torch.has_metadata_mutation(fx)
    storage = _torch.was_storage_changed(fx)
    mutated = data or meta or storage
    return InputInfo(
        requires_grad=x.requires_grad,
        mutates_data=data,
        mutates_metadata=meta,
        mutates_storage=storage,
        mutations_under_no_grad=mutated and _torch.mutations_under_no_grad(fx),
        mutations_hidden_from_autograd=mutated and _torch.mutations_hidden_from_autograd(fx),
    )


def _storages_shared_by_outputs(outs: list) -> set:
    seen: set = set()
    shared: set = set()
    for o in outs:
        if isinstance(o, torch.Tensor):
            s = _torch.storage_of(o)
            (shared if s in seen else seen).add(s)
    return shared


def _describe_output(o: Any, f_inputs: list, storage_owner: dict, shared: set) -> OutputInfo:
    if isinstance(o, _torch.sym_types):
        return OutputInfo(OutputKind.FRESH)  # a symbolic size: the graph computes it
    if not isinstance(o, torch.Tensor):
        return OutputInfo(OutputKind.CONSTANT, constant=o)
    common = dict(requires_grad=o.requires_grad, dtype=o.dtype, shape=tuple(o.shape),
                  device=o.device)
    for i, fx in enumerate(f_inputs):
        if o is fx:
            return OutputInfo(OutputKind.IS_INPUT, base=i, **common)
    owner = storage_owner.get(_torch.storage_of(o))
    if owner is not None:
        return OutputInfo(OutputKind.ALIAS_OF_INPUT, base=owner, **common)
    # Note [Views of unreturned intermediates]: a view of an intermediate that
    # no other output shares storage with is returned as a fresh tensor: values,
    # gradients and in-place updates behave as in eager; only ._base differs.
    if o._is_view() and _torch.storage_of(o) in shared:
        return OutputInfo(OutputKind.ALIAS_OF_INTERMEDIATE, **common)
    return OutputInfo(OutputKind.FRESH, **common)


def check_supported(sig: Signature) -> None:
    """Raise a clear error for programs this version cannot compile exactly."""
    for i, info in enumerate(sig.inputs):
        if info.mutated:
            what = ("its storage is swapped with set_()" if info.mutates_storage else
                    "its metadata is changed in place" if info.mutates_metadata else
                    "its data is changed in place")
            raise NotImplementedError(
                f"aotgrad: graph input {i} is mutated ({what}); programs that mutate their "
                "inputs are not supported yet. Clone the input inside the function, or "
                "run this function eagerly.")
    for i, out in enumerate(sig.outputs):
        if out.kind in (OutputKind.ALIAS_OF_INPUT, OutputKind.ALIAS_OF_INTERMEDIATE):
            what = "input " + str(out.base) if out.base is not None else "an intermediate"
            raise NotImplementedError(
                f"aotgrad: output {i} is a view of {what}; outputs that alias other tensors "
                "are not supported yet. Return a copy (.clone()) instead.")
