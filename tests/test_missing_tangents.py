"""Note [Missing tangents] (aotgrad/missing.py): outputs whose gradient
autograd does not give are absent from the backward, as in eager -- not zeros
that meet an infinite or nan value."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import aotgrad
from aotgrad import aot_function, aot_module, nop


class Counting:
    """A backward compiler that counts its graphs and runs them as given."""

    def __init__(self):
        self.graphs: list = []

    def __call__(self, gm, _):
        self.graphs.append(gm)
        return gm


def log_and_double(x):
    return x.log(), 2 * x


def sqrt_and_triple(x):
    return torch.sqrt(x), x * 3


def grads(fn, x, use):
    """x.grad after backward through the outputs numbered in ``use``."""
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    sum(outs[i].sum() for i in use).backward()
    return x.grad


def check(compiled, eager, x, uses=((1,), (0, 1), (0,))):
    for use in uses:
        torch.testing.assert_close(grads(compiled, x, use), grads(eager, x, use),
                                   equal_nan=True, msg=lambda m: f"{use}: {m}")


def test_an_unused_output_does_not_make_nan():
    """Eager: x.grad == 2 at x == 0 when only ``2 * x`` is used; zeros
    through log's backward would give 0 / 0 = nan."""
    x = torch.tensor([0.0, 1.0, 4.0])
    assert grads(log_and_double, x, (1,)).tolist() == [2.0, 2.0, 2.0]
    for f in (log_and_double, sqrt_and_triple):
        check(aot_function(f, nop), f, x)


def test_through_modules_and_torch_compile():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 0.0, 2.0]))

        def forward(self, x):
            return (x * self.w).log(), self.w * 5 + x

    x = torch.tensor([1.0, 2.0, 0.0])
    m = M()
    compiled = [aot_module(m, nop),
                torch.compile(m, backend=aotgrad.backends.aot_eager, fullgraph=True)]
    for c in compiled:
        torch._dynamo.reset()
        for use in ((1,), (0, 1)):
            for p in m.parameters():
                p.grad = None
            xe = x.clone().requires_grad_()
            sum(m(xe)[i].sum() for i in use).backward()
            expect = (m.w.grad.clone(), xe.grad.clone())
            m.w.grad = None
            xc = x.clone().requires_grad_()
            sum(c(xc)[i].sum() for i in use).backward()
            torch.testing.assert_close((m.w.grad, xc.grad), expect, equal_nan=True)
            assert not m.w.grad.isnan().any() or len(use) == 2


def test_backward_compiled_again_only_where_zeros_would_differ():
    """A program whose missing tangents only meet views and sums compiles one
    backward; one where they meet a product compiles a second backward, once
    per missing set, reused at later calls."""
    exact = Counting()
    f = aot_function(lambda x: (x + 1, (2 * x).view(-1)), nop, exact)
    x = torch.randn(3)
    check(f, lambda x: (x + 1, (2 * x).view(-1)), x)
    assert len(exact.graphs) == 1

    absorbing = Counting()
    g = aot_function(log_and_double, nop, absorbing)
    x = torch.tensor([0.0, 1.0])
    for _ in range(3):
        check(g, log_and_double, x, uses=((1,),))
    assert len(absorbing.graphs) == 2
    check(g, log_and_double, x, uses=((0, 1),))
    assert len(absorbing.graphs) == 2
    specialised = absorbing.graphs[1]
    targets = {n.target for n in specialised.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.div.Tensor not in targets and \
        torch.ops.aten.reciprocal.default not in targets, specialised.code


def max_cat_and_quadruple(x):
    m, _ = x.max(dim=0)
    halves = (1 / x).split(1, dim=0)     # split's gradient: cat of the pieces' gradients
    return m, halves[0] * x[1:], x * 4, halves[1] * 2


@pytest.mark.parametrize("backend", ["nop", "aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_multi_output_ops_and_materialised_zeros(backend, dynamic):
    """Zeros that meet a non-zero gradient in a ``cat`` are materialised
    before it (with ``full``: inductor refuses ``zeros``, which it decomposes)."""
    f = max_cat_and_quadruple
    if backend == "nop":
        if dynamic:
            pytest.skip("aot_function traces static shapes")
        compiled = aot_function(f, nop)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=getattr(aotgrad.backends, backend),
                                 dynamic=dynamic, fullgraph=True)
    for x in (torch.tensor([[0.0, 1.0], [2.0, 0.5]]), torch.tensor([[1.0, 0.0, 3.0]] * 2)):
        check(compiled, f, x, uses=((0,), (2,), (1,), (3,), (0, 2), (1, 3), (0, 1, 2, 3)))


def test_dynamic_shapes():
    def f(x):
        return x.log() * x.shape[0], (2 * x).sum(0)

    c = torch.compile(f, backend=aotgrad.backends.aot_eager, dynamic=True, fullgraph=True)
    for n in (3, 5):
        x = torch.zeros(n, 2)
        x[0] = 1.0
        check(c, f, x)


def test_double_backward_with_an_unused_output():
    f = aot_function(log_and_double, nop)
    for fn in (log_and_double, f):
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        _, b = fn(x)
        (g,) = torch.autograd.grad((b * b).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        if fn is log_and_double:
            expect = (g.detach(), gg)
        else:
            torch.testing.assert_close((g.detach(), gg), expect)
            assert not g.isnan().any()


class Affine(torch.autograd.Function):
    """A custom backward that is not linear in its gradients: eager passes it
    zeros for the unused output (materialize_grads) and it uses them."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin(), x * 2

    @staticmethod
    def backward(ctx, ga, gb):
        (x,) = ctx.saved_tensors
        return x + ga * x + ga.cos() * x + ga / x + 2 * gb


def affine_outputs(x):
    a, b = Affine.apply(x)
    return b, a


def affine_inside(x):
    a, b = Affine.apply(x)
    return b * 1.0, (a * 3).sum()     # a reaches only the second output


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
@pytest.mark.parametrize("f", [affine_outputs, affine_inside])
def test_a_custom_backward_gets_zeros_as_in_eager(how, f):
    """Note [Missing tangents]: a program whose backward runs a custom
    Function's is not specialised -- eager's ``x + x + 0/x + 2`` (nan at 0),
    not the linear rule's ``2``."""
    torch._dynamo.reset()
    compiled = aot_function(f, nop) if how == "aot_function" else \
        torch.compile(f, backend=aotgrad.backends.aot_eager, fullgraph=True)
    x = torch.tensor([0.0, 0.5, 2.0])
    want = grads(f, x, (0,))
    assert want.isnan()[0] and want[1:].tolist() == [3.0, 6.0]   # the test's premise
    check(compiled, f, x, uses=((0,), (1,), (0, 1)))


class _AddAuxiliaryLoss(torch.autograd.Function):
    """As mixture-of-experts models write it: the auxiliary loss's gradient
    is ``ones``, whatever reaches the output."""

    @staticmethod
    def forward(ctx, x, loss):
        return x

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(1, dtype=g.dtype)


class _Constant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2, x * 3

    @staticmethod
    def backward(ctx, g1, g2):
        return torch.full((3,), 7.0)


def _moe_block(x, w_gate, w, w_stats):
    scores = (x @ w_gate).softmax(-1)
    aux = (scores.mean(0) ** 2).sum().reshape(1) * 0.01
    h = _AddAuxiliaryLoss.apply(x @ w, aux)
    return h, scores, (x @ w_stats).tanh()   # scores and the stats: returned, not used


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
def test_gradients_that_read_no_tangent_are_kept(how):
    """Note [Gradients that eager leaves None]: a custom backward's value that
    reads no tangent (the auxiliary loss's ones) reaches the router's weight
    although the scores' gradient is missing -- it was dropped to None
    (the router silently never trained); a weight reached only from outputs
    nobody used is still None, as in eager."""
    compile_ = {"aot_function": lambda f: aot_function(f, nop),
                "torch.compile": lambda f: torch.compile(
                    f, backend=aotgrad.backends.aot_eager, fullgraph=True)}[how]
    torch._dynamo.reset()

    def run(fn):
        torch.manual_seed(0)
        x = torch.randn(8, 4)
        ws = [torch.randn(4, k, requires_grad=True) for k in (3, 4, 2)]
        h, _, _ = fn(x, *ws)
        h.sum().backward()
        return [w.grad for w in ws]

    got, want = run(compile_(_moe_block)), run(_moe_block)
    assert want[0] is not None and want[2] is None
    assert (got[2] is None) and got[0] is not None
    torch.testing.assert_close(got[:2], want[:2])
    x = torch.ones(3, requires_grad=True)
    compile_(lambda x: _Constant.apply(x))(x)[0].sum().backward()
    assert x.grad.tolist() == [7.0, 7.0, 7.0]


class _TwoOutputs(torch.autograd.Function):
    """The gradient of ``b`` is the (materialised) gradient of the first
    output: zeros when that output is unused -- a tensor, not None."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.save_for_backward(x)
        return x * 2 + b, x.sin()

    @staticmethod
    def backward(ctx, g0, g1):
        (x,) = ctx.saved_tensors
        return g0 * 2 + g1 * x.cos(), BACKWARD_OF_B["b"](g0)


BACKWARD_OF_B = {"b": lambda g0: g0}


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
@pytest.mark.parametrize("of_b", ["g0", "g0 * 3", "g0.clone()", "zeros_like(g0)"])
def test_a_custom_backward_that_ran_gives_tensors_not_none(how, of_b, monkeypatch):
    """Note [Gradients that eager leaves None]: once a custom Function's node
    runs, what its backward returns reaches the inputs, zeros included
    (SGD with momentum and weight decay then moves ``b``; it skips a None);
    a custom node reached only from an unused output does not run (None)."""
    monkeypatch.setitem(BACKWARD_OF_B, "b", {
        "g0": lambda g0: g0, "g0 * 3": lambda g0: g0 * 3, "g0.clone()": lambda g0: g0.clone(),
        "zeros_like(g0)": lambda g0: torch.zeros_like(g0)}[of_b])
    compile_ = {"aot_function": lambda f: aot_function(f, nop),
                "torch.compile": lambda f: torch.compile(
                    f, backend=aotgrad.backends.aot_eager, fullgraph=True)}[how]

    def f(x, b, c):
        p, q = _TwoOutputs.apply(x, b)
        r, _ = _TwoOutputs.apply(c, c * 1)    # reached only from r, never used
        return p, q, r, c * 2

    for used in ((1,), (0,), (3,), (1, 3)):
        torch._dynamo.reset()
        results = []
        for fn in (f, compile_(f)):
            x, b, c = (torch.ones(3, requires_grad=True) for _ in range(3))
            outs = fn(x, b, c)
            sum(outs[k].sum() for k in used).backward()
            results.append([t.grad for t in (x, b, c)])
        want, got = results
        for w, g in zip(want, got):
            assert (g is None) == (w is None), (used, want, got)
            if w is not None:
                torch.testing.assert_close(g, w)


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
def test_missing_tangents_of_a_subclass_program(how):
    """Note [Missing tangents] for tensor subclass programs: the unused
    output's zeros never meet ``1 / x`` (log's backward) at ``x = 0``, and the
    gradient is rebuilt from all its plain tensors (``without(whole=True)``);
    it was nan where eager gives 2."""
    from torch.testing._internal.two_tensor import TwoTensor

    def f(x):
        return x.log(), 2 * x, x.sin()

    compile_ = {"aot_function": lambda f: aot_function(f, nop),
                "torch.compile": lambda f: torch.compile(
                    f, backend=aotgrad.backends.aot_eager, fullgraph=True)}[how]
    torch._dynamo.reset()
    compiled = compile_(f)
    for used in ((1,), (2,), (1, 2), (0, 1)):
        results = []
        for fn in (f, compiled):
            x = TwoTensor(torch.tensor([0.0, 1.0, 2.0]),
                          torch.tensor([0.0, 3.0, 4.0])).requires_grad_()
            outs = fn(x)
            sum(outs[k].sum() for k in used).backward()
            results.append((x.grad.a, x.grad.b))
        want, got = results
        torch.testing.assert_close(got, want, equal_nan=True)


class _NoneForFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * b

    @staticmethod
    def backward(ctx, g):
        return None, 2 * g


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, g * a


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
@pytest.mark.parametrize("leaves", [True, False])
def test_which_gradients_eager_leaves_none_with_custom_backwards(how, leaves):
    """Note [Gradients that eager leaves None]: an edge a custom backward
    returns None for carries no gradient (x got zeros from the unused
    ``x * 3``); inputs that are not leaves are found at their gradient edges
    (every gradient, y's too, came back None)."""
    compile_ = {"aot_function": lambda f: aot_function(f, nop),
                "torch.compile": lambda f: torch.compile(
                    f, backend=aotgrad.backends.aot_eager, fullgraph=True)}[how]

    def f(x, y, z):
        return (_NoneForFirst.apply(x.sin(), y), x * 3, y.sin(), y + z,
                _Product.apply(x, z * y))

    for used in ((0,), (2,), (1, 3), (4,), (0, 4)):
        torch._dynamo.reset()
        results = []
        for fn in (f, compile_(f)):
            torch.manual_seed(0)
            base = [torch.randn(4, requires_grad=True) for _ in range(3)]
            ins = base if leaves else [t * 1.5 for t in base]
            outs = fn(*ins)
            sum(outs[k].sum() for k in used).backward()
            results.append([t.grad for t in base])
        want, got = results
        for w, g in zip(want, got):
            assert (g is None) == (w is None), (used, want, got)
            if w is not None:
                torch.testing.assert_close(g, w)


class _SumBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * b, a + b

    @staticmethod
    def backward(ctx, g0, g1):
        return g0 + g1, g0 + g1


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
def test_custom_backward_in_a_subclass_program(how):
    """Note [Gradients that eager leaves None] for tensor subclass programs:
    the runtime's missing sets count plain tangents (two per TwoTensor
    output), and AutogradReach's roots do too (y's and z's real gradients
    were dropped to None)."""
    from torch.testing._internal.two_tensor import TwoTensor

    def f(x, y, z):
        p, q = _SumBoth.apply(x, y)
        return p, q, z * y

    compile_ = {"aot_function": lambda f: aot_function(f, nop),
                "torch.compile": lambda f: torch.compile(
                    f, backend=aotgrad.backends.aot_eager, fullgraph=True)}[how]
    for used in ((0,), (1,), (2,), (0, 2)):
        torch._dynamo.reset()
        results = []
        for fn in (f, compile_(f)):
            ins = [TwoTensor(torch.ones(4) * (i + 1), torch.ones(4) * (i + 2)).requires_grad_()
                   for i in range(3)]
            outs = fn(*ins)
            sum(outs[k].sum() for k in used).backward()
            results.append([None if t.grad is None else (t.grad.a, t.grad.b) for t in ins])
        want, got = results
        for w, g in zip(want, got):
            assert (g is None) == (w is None), (used, want, got)
            if w is not None:
                torch.testing.assert_close(g, w)


class _Triple(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * 3


class _CosBackward(torch.autograd.Function):
    """A backward that is not linear in its gradient: ``cos(0) = 1``."""

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g.cos()


def log_beside_a_custom_function(x):
    return x.log(), _Triple.apply(x)


def custom_function_unused(x):
    return _CosBackward.apply(x), x * 2


def one_custom_node_runs(x):
    return _CosBackward.apply(x), _CosBackward.apply(x * 2)


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
@pytest.mark.parametrize("f, want", [(log_beside_a_custom_function, [3.0, 3.0]),
                                     (custom_function_unused, [2.0, 2.0]),
                                     (one_custom_node_runs, [2 * 1.0 - 1 + 1.0806, 1.0806])])
def test_tangents_that_reach_no_custom_backward_are_absent(how, f, want):
    """Note [Tangents that reach no custom backward]: with the first output
    unused, its zeros are symbolic when they reach no custom node that runs --
    no nan from the log's formula at 0, no ``cos(0)`` from a custom backward
    eager does not run -- while the custom node that runs still gets zeros."""
    torch._dynamo.reset()
    compiled = aot_function(f, nop) if how == "aot_function" else \
        torch.compile(f, backend=aotgrad.backends.aot_eager, fullgraph=True)
    x = torch.tensor([0.0, 1.0])
    eager = grads(f, x, (1,))
    if f is not one_custom_node_runs:
        assert eager.tolist() == want   # the test's premise
    torch.testing.assert_close(grads(compiled, x, (1,)), eager)
    check(compiled, f, x)
