"""Stage 1 — flatten: from the user's call to a flat list of graph inputs.

The user calls ``fn(*args, **kwargs)`` with pytrees.  This stage flattens
``(args, kwargs)`` into leaves and decides which leaves become graph inputs:

* tensors (and symbolic sizes, which dynamo hands over) become graph inputs, in leaf order (for ``aot_module`` the
  parameters and buffers come first: they are the first leaves);
* a tensor passed more than once (the same object) becomes one graph input;
* a tensor subclass (``TwoTensor``, ``DTensor`` ...) is one graph input here;
  the graphs get its plain inner tensors (Note [Subclasses at the boundary]);
* every other leaf (ints, floats, None, strings ...) is a constant, baked
  into the graph; the guard key holds its value, so a new value recompiles;
* an object of a type pytree does not open (a Hugging Face cache, a plain
  object) is a constant too, which the program may read and write: restored
  after each run of the trace, its writes replayed on each call, refused when
  the program computes with tensors it holds (Note [Objects passed in],
  objects.py).

    leaves:       [2, None, t0, t1, t0]
    leaf_slot:    [-1, -1,   0,  1,  0]      (-1: constant)
    graph_leaf:   [2, 3]                     (graph input k = leaves[graph_leaf[k]])

What ``fn`` returns is flattened the same way (``FlatFunction``); an output
holding objects pytree cannot open (a dataclass, a Hugging Face cache) is
opened by opened.py: its tensors become output leaves, and the output
TreeSpec builds a new object per call (Note [Opened output objects]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _torch, objects
from ._torch import pytree
from .opened import open_output


@dataclass(frozen=True)
class FlatInputs:
    in_spec: Any                     # TreeSpec of (args, kwargs)
    leaf_slot: tuple[int, ...]       # per leaf: graph input index, or -1 for a constant
    graph_leaf: tuple[int, ...]      # per graph input: the leaf it comes from
    constants: tuple[Any, ...]       # per leaf: its value when constant, else None
    num_params_buffers: int
    object_leaves: tuple[int, ...] = ()   # objects passed in (Note [Objects passed in])

    @property
    def num_graph_inputs(self) -> int:
        return len(self.graph_leaf)


def flatten_inputs(leaves: list[Any], in_spec: Any, num_params_buffers: int = 0) -> FlatInputs:
    """Decide the graph inputs of one call (see the module docstring)."""
    slot_of_tensor: dict[int, int] = {}
    leaf_slot: list[int] = []
    graph_leaf: list[int] = []
    constants: list[Any] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            _check_supported_tensor(leaf, i)
            slot = slot_of_tensor.get(id(leaf))
            if slot is None:
                slot = slot_of_tensor[id(leaf)] = len(graph_leaf)
                graph_leaf.append(i)
            leaf_slot.append(slot)
            constants.append(None)
        elif isinstance(leaf, _torch.sym_types):
            # a symbolic size handed over by dynamo: an input, never a constant
            leaf_slot.append(len(graph_leaf))
            graph_leaf.append(i)
            constants.append(None)
        else:
            leaf_slot.append(-1)
            constants.append(leaf)
    return FlatInputs(in_spec, tuple(leaf_slot), tuple(graph_leaf), tuple(constants),
                      num_params_buffers, objects.object_leaves(constants))


def _check_supported_tensor(t: torch.Tensor, position: int) -> None:
    if t.layout != torch.strided:
        raise NotImplementedError(
            f"aotgrad: input {position} has layout {t.layout}; only strided (dense) tensors "
            "can be graph inputs. Convert it with .to_dense() first.")


def select_graph_inputs(flat: FlatInputs, leaves: list[Any]) -> list[Any]:
    return [leaves[i] for i in flat.graph_leaf]


def make_flat_fn(fn: Callable, flat: FlatInputs) -> "FlatFunction":
    return FlatFunction(fn, flat)


class FlatFunction:
    """``fn`` seen as a function of the graph inputs returning a flat list.

    Calling it rebuilds the user's ``(args, kwargs)`` from the graph inputs and
    the baked constants, calls ``fn`` and flattens what it returns; the output
    TreeSpec is kept in ``out_spec`` (the same on every call).
    """

    def __init__(self, fn: Callable, flat: FlatInputs):
        self.fn = fn
        self.flat = flat
        self.out_spec: Any = None
        self.labels: list[str] = []
        if flat.object_leaves:  # Note [Objects passed in] (objects.py)
            self.labels = objects.leaf_labels(flat.in_spec, getattr(fn, "aotgrad_leading_args", 0))

    def __call__(self, *graph_inputs: Any) -> list[Any]:
        flat = self.flat
        leaves = [graph_inputs[s] if s >= 0 else c for s, c in zip(flat.leaf_slot, flat.constants)]
        args, kwargs = pytree.tree_unflatten(leaves, flat.in_spec)
        if not flat.object_leaves:
            return self._flat_output(self.fn(*args, **kwargs), None)
        snapshot = objects.Snapshot(leaves, flat.object_leaves, self.labels)
        try:
            try:
                out = self.fn(*args, **kwargs)
            except Exception as error:
                explained = snapshot.explained(error)
                if explained is error:
                    raise
                raise explained from error
            return self._flat_output(out, snapshot.passed())
        finally:
            snapshot.restore()

    def _flat_output(self, out: Any, passed: objects.Passed | None) -> list[Any]:
        out_leaves, out_spec = pytree.tree_flatten(out)
        unknown = next((type(leaf) for leaf in out_leaves
                        if not isinstance(leaf, _KNOWN_OUTPUT_TYPES)), None)
        if passed is not None and passed.writes or unknown is not None:
            # Note [Opened output objects] (opened.py)
            opened = open_output(out, out_leaves, passed, unknown)
            if opened is not None:
                out_leaves, out_spec = opened
        self.out_spec = out_spec
        return out_leaves


# Output leaves pytree gives that need no opening (Note [Opened output
# objects], opened.py: any other leaf makes the whole output opened).
_KNOWN_OUTPUT_TYPES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype,
                       torch.device, torch.layout, torch.memory_format, torch.SymInt,
                       torch.SymFloat, torch.SymBool, torch.ScriptObject)
