"""Factories for tests/test_cli.py: ``aotgrad explain tests._factories:NAME``.

Each returns ``(model_or_fn, example_inputs)`` as ``aotgrad explain`` expects.
"""

import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make():
    """A module whose output is not a scalar; its input requires grad too."""
    torch.manual_seed(0)
    return MLP(), (torch.randn(5, 8, requires_grad=True),)


def make_fn():
    """A plain function of two tensors returning a tuple."""
    def f(a, b):
        return a.sin() * b, (a @ b.t()).relu()

    return f, [torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]


def make_inference():
    """Nothing requires grad: one inference graph, no backward."""
    return (lambda x: x.cos() + 1), (torch.randn(4),)


_calls = [0]


def make_mismatch():
    """A function that reads Python state: the traced graph bakes a stale value."""
    def f(x):
        _calls[0] += 1
        return x * _calls[0]

    return f, (torch.randn(4, requires_grad=True),)


def make_bad_return():
    return 42


not_callable = 3


def recompute_mm_policy():
    """A MemoryPolicy for ``aotgrad explain --policy``: recompute every matmul
    and the activation between them (else the activation is saved, since the
    backward's matmul reads it: Note [Recompute bans], and no matmul is needed)."""
    import aotgrad

    return aotgrad.MemoryPolicy(recompute=[torch.ops.aten.mm, torch.ops.aten.addmm,
                                           torch.ops.aten.tanh])
