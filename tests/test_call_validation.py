"""Calls unlike the one a program was compiled for (issue 17, point 3): each
gets eager's values, through a program compiled for it where needed."""

import pytest
import torch

import aotgrad
from aotgrad import aot_function, aot_module_simplified, nop


class Mul(torch.nn.Module):
    def forward(self, a, b):
        return (a * b,)


def _compiles():
    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return nop(gm, example_inputs)

    return compiler, graphs


@pytest.mark.parametrize("traced,called", [("same", "distinct"), ("distinct", "same")])
def test_simplified_with_a_tensor_passed_twice(traced, called):
    # Note [Calls unlike the example] (api.py): a program traced with one tensor
    # twice has one graph input; called with two it read only the first
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    pick = {"same": (x, x), "distinct": (x, y)}
    compiler, graphs = _compiles()
    f = aot_module_simplified(Mul(), list(pick[traced]), fw_compiler=compiler)
    args = pick[called]
    (out,) = f(*args)
    torch.testing.assert_close(out, args[0] * args[1])
    got = torch.autograd.grad(out.sum(), (x, y), allow_unused=True)
    (ref,) = Mul()(*args)
    want = torch.autograd.grad(ref.sum(), (x, y), allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("traced_rg,called_rg", [(False, True), (True, False)])
def test_simplified_with_other_requires_grad(traced_rg, called_rg):
    x = torch.randn(3, requires_grad=traced_rg)
    y = torch.randn(3)
    f = aot_module_simplified(Mul(), [x, y], fw_compiler=nop)
    a = torch.randn(3, requires_grad=called_rg)
    (out,) = f(a, y)
    assert out.requires_grad == called_rg  # eager's
    if called_rg:
        out.sum().backward()
        torch.testing.assert_close(a.grad, y)


def test_simplified_call_with_too_few_arguments_fails_clearly():
    x = torch.randn(3)
    f = aot_module_simplified(Mul(), [x, x.clone()], fw_compiler=nop)
    with pytest.raises(TypeError):
        f(x)


def test_overlapping_mutated_inputs_under_dynamic_shapes():
    # the rebased program for aliased inputs is compiled on the call's own
    # inputs, where dynamo's symbolic sizes are ints (was: IndexError)
    def f(a, b):
        a.add_(1)
        return a * b

    torch._dynamo.reset()
    g = torch.compile(f, backend=aotgrad.backends.aot_eager, dynamic=True)
    base = torch.arange(6.0)
    torch.testing.assert_close(g(base[:3], base[3:]), f(*torch.arange(6.0).split(3)))
    for n in (4, 5):
        got_base, want_base = torch.arange(8.0), torch.arange(8.0)
        got = g(got_base[:n], got_base[8 - n:])
        want = f(want_base[:n], want_base[8 - n:])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_base, want_base)


def test_aot_function_recompiles_for_repeated_tensors_and_requires_grad():
    compiler, graphs = _compiles()
    f = aot_function(lambda a, b: a * b, compiler)
    x, y = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    for args in [(x, y), (x, x), (x, y.detach()), (x, x)]:
        out = f(*args)
        torch.testing.assert_close(out, args[0] * args[1])
        assert out.requires_grad
    assert len(graphs) == 3 * 2  # a forward and a backward per kind of call
