"""aotgrad.compilers: ts_compile, nnc_jit, default_decompositions,
memory_efficient_fusion — each compared against eager."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import assert_close

import aotgrad
from aotgrad.compilers import (
    default_decompositions,
    memory_efficient_fusion,
    nnc_jit,
    ts_compile,
)

aten = torch.ops.aten


def _clone_args(args):
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            else a for a in args]


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_vs_eager(compiled, fn, *args):
    """Outputs and the gradients of every input requiring grad match eager."""
    ref_args = _clone_args(args)
    outs, refs = _as_tuple(compiled(*args)), _as_tuple(fn(*ref_args))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert_close(o, r)
        assert o.requires_grad == r.requires_grad
    diff = [(o, r) for o, r in zip(outs, refs) if r.requires_grad]
    if not diff:
        return
    # a non-trivial cotangent: weights of 1, 2, 3, ...
    sum((o.double() * torch.arange(1, o.numel() + 1, dtype=torch.double).view_as(o)).sum()
        for o, _ in diff).backward()
    sum((r.double() * torch.arange(1, r.numel() + 1, dtype=torch.double).view_as(r)).sum()
        for _, r in diff).backward()
    for a, b in zip(args, ref_args):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- seed tests

def test_nnc_jit():
    def f(x):
        return torch.sin(x)

    inp = torch.randn(3)
    assert_close(nnc_jit(f)(inp), f(inp))


def test_nnc_scalar():
    def f(x):
        return torch.sin(x)

    inp = torch.randn(())
    assert_close(nnc_jit(f)(inp), f(inp))


def test_nnc_pytrees():
    def f(x):
        return [torch.sin(x[0])]

    inp = [torch.randn(3)]
    out = nnc_jit(f)(inp)
    assert isinstance(out, list) and len(out) == 1
    assert_close(out, f(inp))


def test_external_calls():
    def f(a, b):
        return torch.mv(a, b)

    inp = [torch.randn(3, 3), torch.randn(3)]
    assert_close(nnc_jit(f)(*inp), f(*inp))


def test_nnc_passthrough():
    def f(x, y):
        return x + y, y

    inp = (torch.randn(3), torch.randn(3))
    out = nnc_jit(f)(*inp)
    assert_close(out, f(*inp))
    assert out[1] is inp[1]  # returned as-is, like eager

    def g(x):
        x["a"] = x["a"] * 2
        return x

    a, b = torch.randn(3), torch.randn(3)
    out = nnc_jit(g)({"a": a, "b": b})
    ref = g({"a": a, "b": b})
    assert set(out) == {"a", "b"}
    assert_close(out, ref)
    assert out["b"] is b


# ---------------------------------------------------------------- nnc_jit with gradients

def test_nnc_jit_grad_with_passthrough_and_constant():
    def f(x, y, scale):
        z = F.gelu(x) * torch.ones(3, device="cpu") * scale
        return z.sum(0), y

    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(3)
    check_vs_eager(nnc_jit(f), f, x, y, 2.5)


def test_nnc_jit_static_argnums():
    def f(x, n):
        return x * n

    jit_f = nnc_jit(f, static_argnums=(1,))
    x = torch.randn(3)
    assert_close(jit_f(x, 3), f(x, 3))
    assert_close(jit_f(x, 4), f(x, 4))
    with pytest.raises(TypeError, match="static"):
        jit_f(x, torch.tensor(2.0))


# ---------------------------------------------------------------- ts_compile on many ops

def _layer_norm(x, w, b):
    return F.layer_norm(x, (4,), w, b).relu()


def _max_pool(x):
    return F.max_pool2d(x, 2)


def _misc(x, m):
    y = x.masked_fill(m, float("-inf")).softmax(-1)
    z = torch.full_like(x, 2.0) + torch.arange(4, dtype=torch.float32)
    idx = torch.tensor([0, 2])
    return (y * z, x[:, idx], x.to(torch.float64).sum(), torch.where(m, x, 0.0),
            F.leaky_relu(x), F.hardswish(x))


def _conv(x, w):
    return F.conv2d(x, w, padding=1).sigmoid()


def _embedding(idx, w):
    return F.embedding(idx, w).tanh().mean()


CASES = {
    "layer_norm": (_layer_norm, lambda: (torch.randn(3, 4, requires_grad=True),
                                         torch.randn(4, requires_grad=True),
                                         torch.randn(4, requires_grad=True))),
    "max_pool": (_max_pool, lambda: (torch.randn(1, 2, 4, 4, requires_grad=True),)),
    "misc": (_misc, lambda: (torch.randn(3, 4, requires_grad=True), torch.rand(3, 4) > 0.5)),
    "conv": (_conv, lambda: (torch.randn(1, 2, 5, 5, requires_grad=True),
                             torch.randn(3, 2, 3, 3, requires_grad=True))),
    "embedding": (_embedding, lambda: (torch.tensor([[0, 1], [2, 1]]),
                                       torch.randn(3, 4, requires_grad=True))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ts_compile_vs_eager(name):
    fn, make_args = CASES[name]
    torch.manual_seed(0)
    check_vs_eager(nnc_jit(fn), fn, *make_args())


@pytest.mark.parametrize("name", ["layer_norm", "misc"])
def test_ts_compile_inference_vs_eager(name):
    fn, make_args = CASES[name]
    torch.manual_seed(0)
    args = make_args()
    with torch.no_grad():
        out = nnc_jit(fn)(*args)
        assert_close(out, fn(*args))


def test_ts_compile_dynamic_symint_inputs():
    seen = []

    def spy(gm, example_inputs):
        seen.append(gm)
        return ts_compile(gm, example_inputs)

    def f(x):
        return (x.sin() * x.shape[0]).view(-1, 1).expand(-1, x.shape[0]).sum()

    g = aotgrad.aot_function(f, fw_compiler=spy, dynamic=True)
    for n in (5, 7):
        x = torch.randn(n, requires_grad=True)
        check_vs_eager(g, f, x)
    # one compile for both sizes, and the backward takes a SymInt
    assert len(seen) == 2
    bw_placeholders = [n.meta.get("val") for n in seen[1].graph.find_nodes(op="placeholder")]
    assert any(isinstance(v, torch.SymInt) for v in bw_placeholders)


# ---------------------------------------------------------------- ts_compile as a compiler

def _graph_with_none_and_list_outputs():
    def f(x, y):
        return (torch.sin(x), None, [y * 2, 3])

    return make_fx(f)(torch.randn(3), torch.randn(3))


def test_ts_compile_boxed_and_restores_output_structure():
    gm = _graph_with_none_and_list_outputs()
    code_before = gm.code
    targets_before = [n.target for n in gm.graph.nodes]
    fn = ts_compile(gm, [torch.randn(3), torch.randn(3)])
    assert getattr(fn, "_boxed_call", False)
    x, y = torch.randn(3), torch.randn(3)
    out = fn([x, y])
    ref = gm(x, y)
    assert isinstance(out, tuple) and out[1] is None and isinstance(out[2], list)
    assert out[2][1] == 3
    assert_close(out[0], ref[0])
    assert_close(out[2][0], ref[2][0])
    # the caller's graph is untouched
    assert gm.code == code_before
    assert [n.target for n in gm.graph.nodes] == targets_before


def test_ts_compile_fake_example_inputs_not_run():
    gm = make_fx(lambda x: torch.cos(x) + 1)(torch.randn(4))
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode().from_tensor(torch.randn(4))
    fn = ts_compile(gm, [fake])
    x = torch.randn(4)
    assert_close(fn([x]), torch.cos(x) + 1)  # single output stays single


def test_ts_compile_device_and_dtype_kwargs():
    def f(x):
        a = torch.zeros(2, 3, dtype=torch.float64, device=x.device)
        b = torch.scalar_tensor(1.5, device="cpu")
        return (x.to(torch.float64) + a) * b, torch.ones_like(x, dtype=torch.int32)

    gm = make_fx(f)(torch.randn(2, 3))
    assert "device(type='cpu')" in gm.code
    fn = ts_compile(gm, [torch.randn(2, 3)])
    x = torch.randn(2, 3)
    out, ref = fn([x]), f(x)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    assert out[1].dtype == torch.int32


def test_ts_compile_get_attr_constant_is_frozen():
    const = torch.randn(3)

    def f(x):
        return x * const

    gm = make_fx(f)(torch.randn(3))
    assert gm.graph.find_nodes(op="get_attr")
    fn = ts_compile(gm, [torch.randn(3)])
    x = torch.randn(3)
    assert_close(fn([x]), f(x))
    assert not hasattr(fn.scripted, "_tensor_constant0")  # frozen: inlined as a constant


# ---------------------------------------------------------------- default_decompositions

def test_default_decompositions_table():
    assert all(isinstance(k, torch._ops.OpOverload) for k in default_decompositions)
    for op in (aten.gelu_backward.default, aten.sigmoid_backward.default,
               aten.tanh_backward.default, aten.threshold_backward.default,
               aten.leaky_relu.default, aten.hardswish.default, aten.elu.default,
               aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.detach.default):
        assert op in default_decompositions, op


def test_default_decompositions_applied():
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    def f(x):
        return F.gelu(F.leaky_relu(x)).tanh().sigmoid()

    g = aotgrad.aot_function(f, fw_compiler=spy, decompositions=default_decompositions)
    check_vs_eager(g, f, torch.randn(4, 3, requires_grad=True))
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for op in (aten.gelu_backward.default, aten.leaky_relu.default,
               aten.leaky_relu_backward.default, aten.tanh_backward.default,
               aten.sigmoid_backward.default):
        assert op not in targets, op


# ---------------------------------------------------------------- memory_efficient_fusion

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return torch.tanh(self.fc2(F.gelu(self.fc1(x)))) * 2


def test_memory_efficient_fusion_module():
    torch.manual_seed(0)
    mod = MLP()
    compiled = memory_efficient_fusion(mod)
    assert isinstance(compiled, nn.Module)
    x = torch.randn(3, 4, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in mod.parameters()]
    x_grad = x.grad.clone()
    mod.zero_grad()
    x.grad = None
    ref = mod(x)
    ref.sum().backward()
    assert_close(out, ref)
    assert_close(x_grad, x.grad)
    for a, p in zip(grads, mod.parameters()):
        assert_close(a, p.grad)


def test_memory_efficient_fusion_function():
    def f(x, y):
        return (F.silu(x) * y).sin(), F.hardtanh(y)

    check_vs_eager(memory_efficient_fusion(f), f,
                   torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True))


def test_memory_efficient_fusion_kwargs_override():
    calls = []

    def spy(gm, example_inputs):
        calls.append(gm)
        return ts_compile(gm, example_inputs)

    def f(x):
        return x.cos() * 3

    g = memory_efficient_fusion(f, fw_compiler=spy, partition_fn=aotgrad.default_partition)
    check_vs_eager(g, f, torch.randn(3, requires_grad=True))
    assert len(calls) == 1  # forward via spy; backward still ts_compile


def test_memory_efficient_fusion_uses_min_cut(monkeypatch):
    import aotgrad.partition as partition

    calls = []
    real = partition.min_cut_rematerialization_partition

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(partition, "min_cut_rematerialization_partition", spy)

    def f(x):
        return x.sin().cos() * x

    check_vs_eager(memory_efficient_fusion(f), f, torch.randn(4, requires_grad=True))
    assert calls == [1]
