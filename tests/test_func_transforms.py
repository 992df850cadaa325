"""torch.func transforms and forward-mode AD over compiled functions
(Note [Under transforms], transforms.py), against eager.

Every compiled graph runs through ``strict``: it refuses functorch wrappers
and dual tensors among its inputs and runs with forward AD off, as a real
kernel would (a kernel computes no tangents and batches nothing).  So a result
equal to eager's shows the transform was traced into compiled graphs, not
applied to the compiled code.
"""

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import aotgrad

DT = torch.float64


class Strict:
    """A compiler whose graphs take plain tensors only; counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        def run(*args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    assert not torch._C._functorch.is_functorch_wrapped_tensor(a), \
                        "a compiled graph got a functorch wrapper"
                    assert torch.autograd.forward_ad._current_level < 0 or \
                        fwAD.unpack_dual(a).tangent is None, "a compiled graph got a dual tensor"
            self.calls += 1
            with fwAD._set_fwd_grad_enabled(False):
                return gm(*args)
        return run


def mlp(x, w1, w2):
    return torch.tanh(torch.tanh(x @ w1) @ w2).sin().sum(-1)


def scalar(x, w1, w2):
    return mlp(x, w1, w2).pow(2).sum()


def _inputs(batch=3):
    torch.manual_seed(0)
    return (torch.randn(batch, 4, dtype=DT), torch.randn(4, 5, dtype=DT),
            torch.randn(5, 2, dtype=DT))


def _close(a, b):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert isinstance(x, torch.Tensor) == isinstance(y, torch.Tensor)
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y)
        else:
            assert x == y


CASES = {
    "grad": lambda F, x, w1, w2: grad(lambda *a: F(*a).pow(2).sum())(x, w1, w2),
    "grad_argnums": lambda F, x, w1, w2: grad(lambda *a: F(*a).pow(2).sum(),
                                              argnums=(1, 2))(x, w1, w2),
    "grad_and_value": lambda F, x, w1, w2: torch.func.grad_and_value(
        lambda *a: F(*a).pow(2).sum())(x, w1, w2),
    "vjp": lambda F, x, w1, w2: vjp(F, x, w1, w2)[1](torch.linspace(-1, 1, 3, dtype=DT)),
    "jvp": lambda F, x, w1, w2: jvp(F, (x, w1, w2), (torch.ones_like(x), w1.cos(), w2.sin())),
    "vmap": lambda F, x, w1, w2: vmap(F, in_dims=(0, None, None))(x.unsqueeze(1), w1, w2),
    "vmap_all": lambda F, x, w1, w2: vmap(F)(x.unsqueeze(1), w1.expand(3, 4, 5),
                                           w2.expand(3, 5, 2) * 2),
    "vmap_vmap": lambda F, x, w1, w2: vmap(vmap(F, in_dims=(0, None, None)),
                                           in_dims=(0, None, None))(x.reshape(3, 1, 1, 4),
                                                                    w1, w2),
    "jacrev": lambda F, x, w1, w2: jacrev(F, argnums=(0, 1))(x, w1, w2),
    "jacfwd": lambda F, x, w1, w2: jacfwd(F, argnums=(0, 2))(x, w1, w2),
    "hessian": lambda F, x, w1, w2: hessian(lambda *a: F(*a).pow(2).sum())(x, w1, w2),
    "jacrev_jacrev": lambda F, x, w1, w2: jacrev(jacrev(lambda *a: F(*a).sum()))(x, w1, w2),
    "vmap_grad": lambda F, x, w1, w2: vmap(grad(lambda x, w1, w2: F(x, w1, w2).sum()),
                                           in_dims=(0, None, None))(x.unsqueeze(1), w1, w2),
    "grad_vmap": lambda F, x, w1, w2: grad(lambda w1: vmap(F, in_dims=(0, None, None))(
        x.unsqueeze(1), w1, w2).sum())(w1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_transform_of_a_compiled_function_equals_eager(name):
    case = CASES[name]
    x, w1, w2 = _inputs()
    strict = Strict()
    compiled = aotgrad.aot_function(mlp, strict)
    expected = case(mlp, x, w1, w2)
    _close(case(compiled, x, w1, w2), expected)
    assert strict.calls > 0
    _close(case(compiled, x, w1, w2), expected)  # again: the programs are kept
    # and the plain call still takes the usual program
    torch.testing.assert_close(compiled(x, w1, w2), mlp(x, w1, w2))


def test_transforms_with_inputs_that_require_grad_and_dynamic_shapes():
    x, w1, w2 = _inputs()
    w1.requires_grad_()
    compiled = aotgrad.aot_function(mlp, Strict(), dynamic=True)
    for batch in (3, 5):
        x = torch.randn(batch, 4, dtype=DT)
        _close(jacrev(compiled)(x, w1, w2), jacrev(mlp)(x, w1, w2))
        _close(vmap(compiled, in_dims=(0, None, None))(x.unsqueeze(1), w1, w2),
               vmap(mlp, in_dims=(0, None, None))(x.unsqueeze(1), w1, w2))


def test_pytree_inputs_and_outputs():
    def f(d, scale: float, flag: bool):
        y = torch.tanh(d["x"] @ d["w"]) * scale
        return {"y": y, "n": 3, "pair": (y.sum(), y.mean() if flag else y.max())}

    x, w1, _ = _inputs()
    compiled = aotgrad.aot_function(f, Strict())

    def loss(F, x, w):
        out = F({"x": x, "w": w}, 2.0, True)
        assert out["n"] == 3
        return out["y"].pow(2).sum() + out["pair"][0] * out["pair"][1]

    _close(grad(lambda x, w: loss(compiled, x, w), argnums=(0, 1))(x, w1),
           grad(lambda x, w: loss(f, x, w), argnums=(0, 1))(x, w1))
    # the compiled function returns an int too: vmap of it, as of eager's, takes
    # the tensors
    _close(vmap(lambda x: compiled({"x": x, "w": w1}, 0.5, False)["pair"])(x.unsqueeze(1)),
           vmap(lambda x: f({"x": x, "w": w1}, 0.5, False)["pair"])(x.unsqueeze(1)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_per_sample_gradients_of_a_compiled_module():
    torch.manual_seed(0)
    net = Net().to(DT)
    compiled = aotgrad.aot_module(net, Strict())
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)

    def per_sample(model, prefix):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(params, x, y):
            out = functional_call(model, params, (x.unsqueeze(0),))
            return (out - y).pow(2).sum()

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return {k[len(prefix):]: v for k, v in grads.items()}

    _close(per_sample(compiled, "orig_module."), per_sample(net, ""))
    # a module's jacobian wrt its input, and the module still trains as before
    _close(jacrev(compiled)(x), jacrev(net)(x))
    compiled(x).sum().backward()
    assert net.a.weight.grad is not None


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_dual_tensors(requires_grad):
    x, w1, w2 = _inputs()
    w1.requires_grad_(requires_grad)
    strict = Strict()
    compiled = aotgrad.aot_function(mlp, strict)
    tx, tw = torch.randn_like(x), torch.randn_like(w2)
    with fwAD.dual_level():
        for _ in range(2):
            out = compiled(fwAD.make_dual(x, tx), w1, fwAD.make_dual(w2, tw))
            ref = mlp(fwAD.make_dual(x, tx), w1, fwAD.make_dual(w2, tw))
            _close(fwAD.unpack_dual(out).primal, fwAD.unpack_dual(ref).primal)
            _close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(ref).tangent)
            if requires_grad:
                _close(torch.autograd.grad(out.sum(), w1), torch.autograd.grad(ref.sum(), w1))
    assert strict.calls > 0


def test_a_program_drawing_random_numbers_is_refused_when_differentiated():
    def f(x, w):
        return torch.nn.functional.dropout(x @ w, 0.5, training=True).sum()

    x, w1, _ = _inputs()
    compiled = aotgrad.aot_function(f, Strict())
    with pytest.raises(RuntimeError, match="draws random numbers"):
        grad(compiled, argnums=1)(x, w1)
    with pytest.raises(RuntimeError, match="draws random numbers"):
        jvp(compiled, (x, w1), (x, w1))
    # without randomness the same works
    g = aotgrad.aot_function(lambda x, w: torch.nn.functional.dropout(x @ w, 0.5,
                                                                      training=False).sum(),
                             Strict())
    _close(grad(g, argnums=1)(x, w1), grad(lambda x, w: (x @ w).sum(), argnums=1)(x, w1))


def test_a_program_writing_into_its_inputs_is_refused():
    def f(x, buf):
        buf.add_(1)
        return (x * buf).sum()

    x = torch.randn(3, dtype=DT)
    compiled = aotgrad.aot_function(f, Strict())
    with pytest.raises(RuntimeError, match="in place"):
        grad(compiled)(x, torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_transforms_over_torch_compile_with_aotgrad(backend):
    # dynamo does not trace a compiled function called under a transform from
    # eager (torch's backends alike): it runs the frame eagerly, and with
    # fullgraph=True raises its own error
    x, w1, w2 = _inputs()
    for fullgraph in (False, True):
        torch._dynamo.reset()
        ours = torch.compile(mlp, backend=getattr(aotgrad.backends, backend),
                             fullgraph=fullgraph)
        theirs = torch.compile(mlp, backend="aot_eager", fullgraph=fullgraph)
        for name in ("grad", "vmap", "jacrev", "jvp"):
            if not fullgraph:
                _close(CASES[name](ours, x, w1, w2), CASES[name](mlp, x, w1, w2))
                continue
            with pytest.raises(Exception) as their_error:
                CASES[name](theirs, x, w1, w2)
            with pytest.raises(type(their_error.value)):
                CASES[name](ours, x, w1, w2)


def test_functionalize_of_a_compiled_function_says_what_to_do():
    compiled = aotgrad.aot_function(lambda x: x.sin(), Strict())
    with pytest.raises(RuntimeError, match="functional already"):
        torch.func.functionalize(compiled)(torch.randn(3))


def test_gradcheck_through_transforms_of_a_compiled_function():
    x, w1, w2 = _inputs()
    compiled = aotgrad.aot_function(scalar, Strict())
    x.requires_grad_()
    # autograd (reverse mode, outside) over torch.func.grad and jvp (inside)
    assert torch.autograd.gradcheck(lambda x: grad(compiled)(x, w1, w2), (x,))
    assert torch.autograd.gradcheck(
        lambda x: jvp(lambda x: compiled(x, w1, w2), (x,), (torch.ones_like(x),))[1], (x,))
    assert torch.autograd.gradgradcheck(lambda x: vmap(compiled, in_dims=(0, None, None))(
        x.unsqueeze(1), w1, w2), (x,))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_transforms_with_inductor_kernels(device):
    """The rules' programs compiled by inductor (real kernels: a wrapper or a
    dual tensor reaching one would fail or lose its tangent)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from aotgrad import _torch

    compilers = dict(
        fw_compiler=functools.partial(_torch.inductor_compile, is_backward=False),
        bw_compiler=functools.partial(_torch.inductor_compile, is_backward=True),
        inference_compiler=functools.partial(_torch.inductor_compile, is_inference=True),
        decompositions=_torch.inductor_decompositions())
    x, w1, w2 = (t.to(device) for t in _inputs())
    compiled = aotgrad.aot_function(mlp, **compilers)
    for name in ("grad", "jacrev", "vmap", "jvp"):
        _close(CASES[name](compiled, x, w1, w2), CASES[name](mlp, x, w1, w2))
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        out = compiled(fwAD.make_dual(x, tx), w1, w2)
        ref = mlp(fwAD.make_dual(x, tx), w1, w2)
        _close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(ref).tangent)
