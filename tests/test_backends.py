"""aotgrad.backends: torch.compile(fn, backend=aot_eager / inductor) vs eager,
with PyTorch's own AOTAutograd poisoned (as the seed runner does)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import aotgrad
import aotgrad.backends as backends
from aotgrad import _torch

# imported before any poisoning: a module first imported while the poison is
# on would keep the poisoned functions (the fixture restores only what it patched)
import functorch.compile  # noqa: E402,F401

# what /work/shared/seedtests/run_seed.py replaces with functions that raise
POISONED = {
    "torch._functorch.aot_autograd": [
        "aot_function", "aot_module", "aot_module_simplified", "aot_export_module",
        "aot_export_joint_simple", "_aot_export_function", "create_aot_state",
        "aot_export_joint_with_descriptors"],
    "torch._functorch.partitioners": ["default_partition", "min_cut_rematerialization_partition"],
    "torch._functorch._aot_autograd.collect_metadata_analysis": [
        "run_functionalized_fw_and_collect_metadata"],
    "torch._functorch._aot_autograd.graph_capture": [
        "aot_dispatch_base_graph", "aot_dispatch_autograd_graph"],
    "torch._functorch._aot_autograd.graph_compile": [
        "aot_stage1_graph_capture", "aot_stage2_compile", "aot_stage2_export"],
}


class TorchAOTCalled(AssertionError):
    pass


@pytest.fixture(autouse=True)
def poison_torch_aot(monkeypatch):
    """Every reference to torch's AOTAutograd entry points raises while a test runs."""
    forbidden = {}
    for mod_name, names in POISONED.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            if hasattr(mod, name):
                def boom(*args, _name=f"{mod_name}.{name}", **kwargs):
                    raise TorchAOTCalled(f"torch's own AOTAutograd was called: {_name}")

                forbidden[id(getattr(mod, name))] = boom
    prefixes = ("torch._functorch", "functorch", "torch._dynamo", "torch._inductor")
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(prefixes):
            continue
        for attr, val in list(vars(mod).items()):
            if id(val) in forbidden:
                monkeypatch.setattr(mod, attr, forbidden[id(val)])
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_poison_is_effective():
    """torch's own aot_eager backend goes through its AOTAutograd: it must raise."""
    def f(x):
        return x.sin()

    with pytest.raises(Exception, match="torch's own AOTAutograd was called"):
        torch.compile(f, backend="aot_eager")(torch.randn(3, requires_grad=True))


# ---------------------------------------------------------------- helpers

def make_function():
    torch.manual_seed(0)
    w = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)

    def f(x):
        h = F.gelu(x @ w + b)
        return (h * 2).sin().sum(-1), h.tanh()

    return f, [w, b]


def run_train(fn, params, x):
    """Outputs and grads of (x, *params) for a fixed non-trivial cotangent."""
    for p in [x, *params]:
        p.grad = None
    outs = fn(x)
    loss = sum((o * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in [x, *params]]


def check_training(backend, fullgraph=True):
    f, params = make_function()
    x = torch.randn(3, 4, requires_grad=True)
    compiled = torch.compile(f, backend=backend, fullgraph=fullgraph)
    for _ in range(2):  # second call: the cached compiled code
        outs, grads = run_train(compiled, params, x)
        ref_outs, ref_grads = run_train(f, params, x)
        assert_close(outs, ref_outs)
        assert_close(grads, ref_grads)


def check_inference(backend):
    f, _ = make_function()
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = torch.compile(f, backend=backend)(x)
        ref = f(x)
    assert_close(out, ref)
    assert not any(o.requires_grad for o in out)


# ---------------------------------------------------------------- aot_eager

def test_aot_eager_training_fullgraph():
    check_training(backends.aot_eager, fullgraph=True)


def test_aot_eager_dynamic_shapes():
    """A new size makes dynamo hand over symbolic sizes (and SymInt inputs)."""
    torch._dynamo.reset()
    f, params = make_function()
    compiled = torch.compile(f, backend=backends.aot_eager)
    for n in (2, 3, 5, 7):
        x = torch.randn(n, 4, requires_grad=True)
        outs, grads = run_train(compiled, params, x)
        ref_outs, ref_grads = run_train(f, params, x)
        assert_close(outs, ref_outs)
        assert_close(grads, ref_grads)
    marked = torch.randn(6, 4, requires_grad=True)
    torch._dynamo.mark_dynamic(marked, 0)
    assert_close(run_train(torch.compile(f, backend=backends.aot_eager, dynamic=True), params,
                           marked), run_train(f, params, marked))


def test_binding_checks_never_specialize_symbolic_sizes():
    # Note [Verified bindings] (codegen.py): a verdict is made on meta tensors of
    # the node's sizes; for symbolic sizes that would add a guard that
    # specializes them. With no verdict cached (a fresh process), the marked
    # dimension must stay dynamic.
    from aotgrad import codegen

    codegen._verdicts.clear()
    torch._dynamo.reset()
    f, params = make_function()
    marked = torch.randn(6, 4, requires_grad=True)
    torch._dynamo.mark_dynamic(marked, 0)
    assert_close(run_train(torch.compile(f, backend=backends.aot_eager, dynamic=True), params,
                           marked), run_train(f, params, marked))


def test_aot_eager_inference():
    check_inference(backends.aot_eager)


def test_aot_eager_module_with_graph_break():
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    def f(x):
        y = mod(x)
        torch._dynamo.graph_break()
        return F.silu(y) * 3

    x = torch.randn(5, 4, requires_grad=True)
    params = list(mod.parameters())
    outs, grads = run_train(lambda x: (torch.compile(f, backend=backends.aot_eager)(x),),
                            params, x)
    ref_outs, ref_grads = run_train(lambda x: (f(x),), params, x)
    assert_close(outs, ref_outs)
    assert_close(grads, ref_grads)


def test_aot_eager_kwargs_override():
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    import functools

    backend = functools.partial(backends.aot_eager, fw_compiler=spy)
    check_training(backend)
    assert graphs  # forward graphs went through the override


# ---------------------------------------------------------------- inductor
# Inductor compiles take seconds on CPU: three compiles in all (fw, bw, inference).

@pytest.fixture
def inductor_calls(monkeypatch):
    calls = []
    real = _torch.inductor_compile

    def spy(gm, example_inputs, **kwargs):
        out = real(gm, example_inputs, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(_torch, "inductor_compile", spy)
    return calls


def test_inductor_training_fullgraph(inductor_calls):
    check_training(backends.inductor, fullgraph=True)
    kinds = [kw.get("is_backward", False) for kw, _ in inductor_calls]
    assert kinds == [False, True]
    for _, compiled in inductor_calls:
        assert getattr(compiled, "_boxed_call", False)  # inductor's OutputCode


def test_inductor_inference(inductor_calls):
    check_inference(backends.inductor)
    assert [kw.get("is_inference") for kw, _ in inductor_calls] == [True]


# ---------------------------------------------------------------- subclasses and symbolic sizes

def _two_tensor_step(compiled, f, n):
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(n)
    a, b = torch.randn(n, 4), torch.randn(n, 4)
    w = torch.randn(4, requires_grad=True)
    results = []
    for fn in (f, compiled):
        x = TwoTensor(a.clone(), b.clone()).requires_grad_()
        w.grad = None
        out = fn(x, w)
        out.sum().backward()
        results.append((out, x.grad, w.grad.clone()))
    (want, want_gx, want_gw), (got, got_gx, got_gw) = results
    assert type(got) is type(want) and type(got_gx) is type(want_gx)
    for g, e in ((got.a, want.a), (got.b, want.b), (got_gx.a, want_gx.a),
                 (got_gx.b, want_gx.b), (got_gw, want_gw)):
        assert_close(g, e)


def _subclass_program(x, w):
    return (x * w).sin() * x.shape[0]


def test_aot_eager_subclass_inputs_dynamic_fullgraph():
    compiled = torch.compile(_subclass_program, backend=backends.aot_eager, fullgraph=True,
                             dynamic=True)
    for n in (3, 5):
        _two_tensor_step(compiled, _subclass_program, n)


def test_inductor_subclass_inputs_dynamic_fullgraph(inductor_calls):
    compiled = torch.compile(_subclass_program, backend=backends.inductor, fullgraph=True,
                             dynamic=True)
    for n in (3, 5):
        _two_tensor_step(compiled, _subclass_program, n)
    # one forward and one backward, both symbolic: the second size reused them
    assert [kw.get("is_backward", False) for kw, _ in inductor_calls] == [False, True]


# ---------------------------------------------------------------- Python floats (dynamic=True)
# Note [Python floats for inductor] (_torch/inductor.py): dynamo passes a float
# argument as a 0-d float64 tensor read with .item(); inductor lowers that read
# only after the float is made tensor ops (it raised KeyError: 'unbacked_bindings').

def _scaled(x, a):
    return (x * a + 1).sin() - a / 2


@pytest.mark.parametrize("requires_grad", [False, True])
def test_inductor_python_float_argument_dynamic(inductor_calls, requires_grad):
    compiled = torch.compile(_scaled, backend=backends.inductor, dynamic=True)
    for n, a in ((3, 0.5), (4, 2.5), (5, -3.25)):
        x = torch.randn(n, requires_grad=requires_grad)
        xe = x.detach().clone().requires_grad_(requires_grad)
        out, ref = compiled(x, a), _scaled(xe, a)
        assert_close(out, ref)
        if requires_grad:
            out.sum().backward()
            ref.sum().backward()
            assert_close(x.grad, xe.grad)
    # the float stayed symbolic: one compile serves every value
    assert len(inductor_calls) == (2 if requires_grad else 1)


def test_inductor_python_float_used_as_python_value():
    """A float the pass cannot make tensor ops (math.floor) is specialised:
    dynamo traces the frame again with it a constant."""
    import math

    def f(x, a):
        return x * math.floor(a)

    compiled = torch.compile(f, backend=backends.inductor, dynamic=True)
    for a in (0.5, 2.5, 2.5):
        x = torch.randn(3)
        assert_close(compiled(x, a), f(x, a))


def test_inductor_adam_step_dynamic():
    """A compiled optimizer step (its hyperparameters are Python floats)."""
    results = []
    for backend in (None, backends.inductor):
        torch._dynamo.reset()
        torch.manual_seed(0)
        mod = nn.Linear(3, 2)
        opt = torch.optim.Adam(mod.parameters(), lr=0.01)
        step = opt.step if backend is None else torch.compile(opt.step, backend=backend,
                                                             dynamic=True)
        for n in (4, 2):
            opt.zero_grad()
            mod(torch.ones(n, 3)).pow(2).sum().backward()
            step()
        results.append([p.detach().clone() for p in mod.parameters()])
    assert_close(results[1], results[0])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_an_int_input_returned_after_arithmetic(requires_grad):
    """A step counter returned next to the loss: from the second call dynamo
    passes the int as a symbolic graph input that only ``n + 1`` reads; the
    light tracer refuses symbolic inputs (make_fx traces the arithmetic)
    -- it raised AttributeError ('_Tracked' object has no attribute
    'symnode_tracker')."""
    torch._dynamo.reset()

    def f(x, n):
        return x.cos() * 2, n + 1

    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager)
    for n in range(1, 4):
        x = torch.ones(3, requires_grad=requires_grad)
        got, want = compiled(x, n), f(x, n)
        torch.testing.assert_close(got[0], want[0])
        assert got[1] == want[1]
