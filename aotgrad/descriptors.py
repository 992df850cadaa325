"""Small typed names for the inputs and outputs of graphs.

A graph's placeholders and outputs are identified by *role*, never by
matching substrings of node names.  Each placeholder node carries its
descriptor in ``node.meta["desc"]``; a joint graph's output node carries the
tuple of output descriptors in ``node.meta["desc"]``.  See Note [Calling
convention] in ``aotgrad/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

DESC = "desc"  # the node.meta key


@dataclass(frozen=True)
class Primal:
    """The i-th graph input of the forward (a user tensor, parameter or buffer)."""
    index: int


@dataclass(frozen=True)
class Tangent:
    """The gradient flowing into the i-th differentiable forward output."""
    index: int


@dataclass(frozen=True)
class UserOutput:
    """The i-th tensor output that the graph computes for the user."""
    index: int


@dataclass(frozen=True)
class MutatedInput:
    """The new value of input ``index``, written back by the runtime."""
    index: int


@dataclass(frozen=True)
class IntermediateBase:
    """An intermediate that some user output is a view of (regenerated outside)."""
    index: int


@dataclass(frozen=True)
class Grad:
    """The gradient of primal ``index`` (None when it does not require grad)."""
    index: int


@dataclass(frozen=True)
class MutatedInBackward:
    """The new value of input ``index`` after the backward wrote to it (Note
    [Mutations in the backward], trace.py): a backward output after the grads."""
    index: int


@dataclass(frozen=True)
class MutatedTangent:
    """The new value of the gradient given for tangent ``index``, which the
    backward wrote to (Note [Mutations in the backward], trace.py)."""
    index: int


@dataclass(frozen=True)
class EffectToken:
    """The effect token of an exported graph, lifted to an input and an output
    (Note [Effect tokens in export], tokens.py)."""
    index: int


@dataclass(frozen=True)
class Saved:
    """A value the forward keeps for the backward (tensor or symbolic int)."""
    name: str


Descriptor = (Primal | Tangent | UserOutput | MutatedInput | IntermediateBase | Grad |
              MutatedInBackward | MutatedTangent | EffectToken | Saved)
