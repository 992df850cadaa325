"""Note [Values read while tracing] (values.py): a program that reads its
tensors' values is compiled for the values its inputs give, with a guard that
recompiles when they change; every call compared with eager."""

import pytest
import torch
import torch.nn as nn

import aotgrad
from aotgrad import aot_function, aot_module, nop


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm


def _grads(out, inputs):
    loss = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))
               if isinstance(o, torch.Tensor) and o.requires_grad)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _check(compiled, fn, *args):
    out, ref = compiled(*args), fn(*args)
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        if isinstance(r, torch.Tensor):
            torch.testing.assert_close(o, r)
        else:
            assert o == r
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves:
        for g, e in zip(_grads(out, leaves), _grads(ref, leaves)):
            torch.testing.assert_close(g, e)


def test_torch_equal_branch_recompiles_on_a_new_value():
    causal = torch.triu(torch.ones(4, 4), 1)

    def f(x, mask):
        if torch.equal(mask, torch.triu(torch.ones(4, 4), 1)):
            return x.sin() * 2
        return x.cos() + mask.sum()

    counter = Counting()
    g = aot_function(f, counter)
    x = torch.randn(4, 4, requires_grad=True)
    _check(g, f, x, causal)
    first = counter.graphs
    _check(g, f, x, causal.clone())        # same values: no new compilation
    assert counter.graphs == first
    _check(g, f, x, causal + 1)            # other values: the other branch
    assert counter.graphs == 2 * first
    _check(g, f, x, causal)                # back: the first compilation again
    _check(g, f, x, causal + 1)
    assert counter.graphs == 2 * first


@pytest.mark.parametrize("dynamic", [False, True])
def test_item_used_as_a_python_number(dynamic):
    def f(x):
        k = int(x.sum().item() > 0)
        return x * (k + 1), x.max().item()

    g = aot_function(f, nop, dynamic=dynamic)
    for x in (torch.randn(3, 5), -torch.rand(3, 5), torch.randn(3, 5), torch.randn(4, 6)):
        _check(g, f, x.requires_grad_())


@pytest.mark.parametrize("program", [
    lambda x: x * x.sum().item(),
    lambda x: x.sin() if x.sum() > 0 else x.cos(),
], ids=["item", "python_if"])
def test_value_dependent_programs_compile(program):
    g = aot_function(program, nop)
    for x in (torch.randn(4), torch.randn(4), -torch.ones(4), torch.ones(4)):
        _check(g, program, x.requires_grad_())


def test_read_of_a_padding_mask():
    # the shape of BART's and DeBERTa's checks: a branch on whether a mask hides anything
    def f(x, mask):
        if (mask == 0).any():
            x = x.masked_fill(mask[:, :, None] == 0, -1.0)
        return torch.softmax(x, -1)

    g = aot_function(f, nop)
    x = torch.randn(2, 3, 4, requires_grad=True)
    for mask in (torch.ones(2, 3), torch.tensor([[1., 1., 0.], [1., 0., 0.]]), torch.ones(2, 3)):
        _check(g, f, x, mask)


def test_read_after_an_input_mutation_does_not_write_twice():
    def f(x, y):
        x.add_(1)
        if x.sum() > 0:
            return y * 2
        return y * 3

    g = aot_function(f, nop)
    y = torch.randn(3, requires_grad=True)
    for start in (torch.ones(3), -5 * torch.ones(3)):
        xe, xc = start.clone(), start.clone()
        _check(lambda *a: g(xc, *a), lambda *a: f(xe, *a), y)
        assert torch.equal(xc, xe)   # written once per call, as eagerly (guard writes nothing)


def test_transformer_encoder_with_a_causal_mask():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    eager = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    compiled_mod = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = aot_module(compiled_mod, nop)
    x = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    other = torch.zeros(5, 5)
    other[0, 4] = float("-inf")
    for mask in (causal, other, causal):
        out, ref = compiled(x, mask=mask), eager(x, mask=mask)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward()
        ref.square().sum().backward()
        for (name, p), q in zip(compiled_mod.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
            p.grad = q.grad = None


def test_a_read_of_random_numbers_is_refused_clearly():
    def f(x):
        if torch.rand(()) > 0.5:
            return x * 2
        return x * 3

    with pytest.raises(ValueError, match="depends on random numbers"):
        aot_function(f, nop)(torch.randn(3))


def test_random_numbers_of_the_compiled_call_are_eagers():
    def f(x):
        y = torch.nn.functional.dropout(x, 0.5)
        if x.sum() > 0:
            return y * 2
        return y

    g = aot_function(f, nop)
    x = torch.ones(64)
    torch.manual_seed(3)
    out = g(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, f(x))


def test_export_does_not_specialise():
    class M(nn.Module):
        def forward(self, x):
            return (x * 2,) if x.sum() > 0 else (x * 3,)

    with pytest.raises(Exception, match="depends on the values|data-dependent|Data"):
        aotgrad.aot_export_module(M(), [torch.randn(3)], trace_joint=False)


def test_aot_module_simplified_with_real_inputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            return (y.relu(),) if y.sum() > 0 else (y.tanh(),)

    m = M()
    compiled = aotgrad.aot_module_simplified(m, [torch.randn(2, 3)], nop)
    for x in (torch.randn(2, 3), -torch.ones(2, 3) * 10, torch.ones(2, 3) * 10):
        (out,), (ref,) = compiled(x), m(x)
        torch.testing.assert_close(out, ref)


def test_a_read_beside_a_higher_order_op():
    # the modes of values.py let torch.cond's own compilation through (Note
    # [Dynamo under aotgrad's modes], hops.py), and eager cond works after
    def f(x):
        y = torch.cond(x.sum() > 0, lambda x: (x.sin(),), lambda x: (x.cos(),), (x,))[0]
        return y * x.max().item()

    g = aot_function(f, nop)
    for x in (torch.randn(4), -torch.rand(4), torch.rand(4)):
        _check(g, f, x.requires_grad_())
    x = torch.randn(4)
    torch.testing.assert_close(torch.cond(x.sum() > 0, lambda x: (x.sin(),),
                                          lambda x: (x.cos(),), (x,))[0],
                               x.sin() if x.sum() > 0 else x.cos())
