"""Compiled autograd (``torch._dynamo.config.compiled_autograd``) through
aotgrad's backends, and graphs whose inputs are lists (Note [Nested graph
inputs], aotgrad/graph_inputs.py).

Compiled autograd hands the backend the backward as a dynamo graph whose
first input is one list of tensors; before the fix aotgrad's backends failed
on it (a pytree ValueError from aot_module_simplified) where torch's aot_eager
compiles it.  Torch's own AOTAutograd is poisoned while these tests run.
"""

from __future__ import annotations

import operator
import shutil

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.testing import assert_close

import aotgrad
from test_backends import poison_torch_aot  # noqa: F401  (autouse fixture)

TOL = dict(atol=1e-6, rtol=1e-6)


class Recording:
    """A dynamo backend: records each graph's example inputs and the ATen
    graphs aotgrad's backend compiles for it, then compiles with it."""

    def __init__(self, backend, **kwargs):
        self.inputs, self.aten = [], []
        self.backend, self.kwargs = backend, kwargs

    def record(self, gm, example_inputs):
        self.aten.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    def __call__(self, gm, example_inputs):
        self.inputs.append([type(x) for x in example_inputs])
        kwargs = dict(self.kwargs)
        if self.backend is aotgrad.backends.aot_eager:
            kwargs.update(fw_compiler=self.record, bw_compiler=self.record,
                          inference_compiler=self.record)
        return self.backend(gm, example_inputs, **kwargs)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def _train(step, model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, params = [], []
    for x in batches:
        opt.zero_grad()
        losses.append(step(model, x).detach())
        opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    return losses, params


def _step(model, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def _compiled_autograd_run(backend, dynamic, batches):
    torch._dynamo.reset()
    model = _mlp()
    with torch._dynamo.config.patch(compiled_autograd=True):
        step = torch.compile(_step, backend=backend, dynamic=dynamic)
    try:
        return model, _train(step, model, batches)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_autograd_trains_like_eager(dynamic):
    torch.manual_seed(1)
    sizes = [3, 5, 7] if dynamic else [3, 3, 3]
    batches = [torch.randn(n, 4) for n in sizes]
    eager = _mlp()
    ref_losses, ref_params = _train(_step, eager, batches)
    rec = Recording(aotgrad.backends.aot_eager)
    _, (losses, params) = _compiled_autograd_run(rec, dynamic, batches)
    for a, b in zip(losses, ref_losses):
        assert_close(a, b, **TOL)
    for ps, qs in zip(params, ref_params):
        for p, q in zip(ps, qs):
            assert_close(p, q, **TOL)
    # compiled autograd's backward graph reached aotgrad: it takes a list ...
    assert any(list in types for types in rec.inputs), rec.inputs
    # ... and aotgrad traced the backward's matmuls from it (the forward graph
    # holds addmm; only a backward graph has the weight gradients' mm)
    assert any("aten.mm.default" in ops for ops in rec.aten), rec.aten


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_autograd_through_inductor():
    torch.manual_seed(1)
    batches = [torch.randn(3, 4) for _ in range(2)]
    ref_losses, ref_params = _train(_step, _mlp(), batches)
    rec = Recording(aotgrad.backends.inductor)
    _, (losses, params) = _compiled_autograd_run(rec, False, batches)
    for a, b in zip(losses, ref_losses):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    for ps, qs in zip(params, ref_params):
        for p, q in zip(ps, qs):
            assert_close(p, q, atol=1e-5, rtol=1e-5)
    assert any(list in types for types in rec.inputs), rec.inputs


def _list_graph(steal: bool) -> fx.GraphModule:
    """(xs: [a, b], (c, [d]), y) -> ((a + b) * y + c * d,) read with getitem, as dynamo writes."""
    g = fx.Graph()
    xs, nest, y = g.placeholder("xs"), g.placeholder("nest"), g.placeholder("y")
    xs.meta["steal_arg"] = steal
    a, b = (g.call_function(operator.getitem, (xs, i)) for i in range(2))
    c = g.call_function(operator.getitem, (nest, 0))
    d = g.call_function(operator.getitem, (g.call_function(operator.getitem, (nest, 1)), 0))
    s = g.call_function(torch.add, (a, b))
    out = g.call_function(torch.add, (g.call_function(torch.mul, (s, y)),
                                      g.call_function(torch.mul, (c, d))))
    g.output((out,))
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("steal", [True, False])
def test_list_graph_inputs_flattened(backend, steal):
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    torch.manual_seed(0)
    a, b, c, d, y = (torch.randn(3, requires_grad=True) for _ in range(5))
    gm = _list_graph(steal)
    compiled = getattr(aotgrad.backends, backend)(gm, [[a, b], (c, [d]), y])
    xs = [a, b]
    (out,) = compiled(xs, (c, [d]), y)
    # a stolen list is the callee's: emptied; any other is left alone
    assert xs == ([] if steal else [a, b])
    ref = (a + b) * y + c * d
    assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (a, b, c, d, y))
    ref_grads = torch.autograd.grad(ref.sum(), (a, b, c, d, y))
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def test_dict_graph_input_is_a_clear_error():
    g = fx.Graph()
    kw = g.placeholder("kw")
    g.output((g.call_function(operator.getitem, (kw, "x")),))
    gm = fx.GraphModule(nn.Module(), g)
    with pytest.raises(TypeError, match=r"graph input 0 is a dict"):
        aotgrad.backends.aot_eager(gm, [{"x": torch.randn(2)}])


def test_aot_module_simplified_refuses_nested_example_inputs():
    gm = _list_graph(steal=False)
    t = torch.randn(3)
    with pytest.raises(TypeError, match=r"flat example inputs.*example input 0 is a list"):
        aotgrad.aot_module_simplified(gm, [[t, t], (t, [t]), t], fw_compiler=aotgrad.nop)


def test_flattened_graph_keeps_node_meta():
    gm = _list_graph(steal=True)
    for n in gm.graph.nodes:
        n.meta["stack_trace"] = f"line of {n.name}"
    seen = []

    def keep(g, example_inputs):
        seen.append(g)
        return g

    compiled = aotgrad.backends.aot_eager(
        gm, [[torch.randn(3), torch.randn(3)], (torch.randn(3), [torch.randn(3)]),
             torch.randn(3)], fw_compiler=keep, inference_compiler=keep)
    assert callable(compiled)
    traces = {n.meta.get("stack_trace") for g in seen for n in g.graph.nodes}
    assert "line of add" in traces or "line of mul" in traces, traces
