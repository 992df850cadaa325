"""The backends' settings (issue 18, item 3): torch's defaults (min-cut,
inference input mutations kept), torch.compile's mode= / options= reaching
inductor, and unknown keywords refused; compared with torch's own backends."""

import contextlib
import functools
import logging

import pytest
import torch
import torch.nn as nn
from torch._dynamo.backends.common import aot_autograd
from torch.testing import assert_close

import aotgrad
import aotgrad.backends as backends
from aotgrad import _torch


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.b(self.a(x).sin().cos().sin()).cos().sum()


def _saved(backend_for, **config):
    """The number of values the backward takes (saved tensors and sizes)."""
    torch._dynamo.reset()
    graphs = {}

    def keep(gm, example_inputs):
        graphs["bw"] = gm
        return aotgrad.nop(gm, example_inputs)

    torch.manual_seed(0)
    net, x = MLP(), torch.randn(4, 8, requires_grad=True)
    with aotgrad.config.patch(**config), torch._functorch.config.patch(**config):
        out = torch.compile(net, backend=backend_for(keep))(x)
    out.backward()
    assert_close(out, MLP.forward(net, x))
    names = [n.name for n in graphs["bw"].graph.find_nodes(op="placeholder")]
    return sum(not n.startswith("tangents") for n in names)


def test_aot_eager_saves_what_torchs_aot_eager_saves():
    from functorch.compile import min_cut_rematerialization_partition as torch_min_cut

    ours = _saved(lambda keep: functools.partial(backends.aot_eager, bw_compiler=keep))
    theirs = _saved(lambda keep: aot_autograd(fw_compiler=aotgrad.nop, bw_compiler=keep,
                                              partition_fn=torch_min_cut,
                                              keep_inference_input_mutations=True))
    default = _saved(lambda keep: functools.partial(
        backends.aot_eager, bw_compiler=keep, partition_fn=aotgrad.default_partition))
    assert ours == theirs < default


def test_activation_memory_budget_applies_under_torch_compile():
    full = _saved(lambda keep: functools.partial(backends.aot_eager, bw_compiler=keep))
    none = _saved(lambda keep: functools.partial(backends.aot_eager, bw_compiler=keep),
                  activation_memory_budget=0.0)
    assert none < full


def test_inference_input_mutations_stay_in_the_graph():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    def f(buf, x):
        buf.add_(1)
        return x * 2

    torch._dynamo.reset()
    buf, x = torch.zeros(3), torch.ones(3)
    out = torch.compile(f, backend=functools.partial(backends.aot_eager, fw_compiler=keep,
                                                     inference_compiler=keep))(buf, x)
    assert_close(out, x * 2)
    assert_close(buf, torch.ones(3))
    assert any(n.target is torch.ops.aten.copy_.default for n in graphs[0].graph.nodes)


@pytest.fixture
def inductor_calls(monkeypatch):
    calls = []
    real = _torch.inductor_compile

    def spy(gm, example_inputs, **kwargs):
        calls.append(kwargs)
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(_torch, "inductor_compile", spy)
    return calls


def test_mode_and_options_reach_inductor(inductor_calls):
    def f(x):
        return x.sin() * 2

    x = torch.randn(8)
    torch._dynamo.reset()
    out = torch.compile(f, backend=backends.inductor, mode="max-autotune-no-cudagraphs")(x)
    assert_close(out, f(x))
    assert inductor_calls[-1]["config_patches"]["max_autotune"] is True
    torch._dynamo.reset()
    out = torch.compile(f, backend=backends.inductor,
                        options={"epilogue_fusion": False, "debug_index_asserts": True})(x)
    assert_close(out, f(x))
    assert inductor_calls[-1]["config_patches"] == {"epilogue_fusion": False,
                                                   "debug_index_asserts": True}


def test_unknown_settings_are_refused():
    x = torch.randn(3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Unexpected optimization option no_such_option"):
        torch.compile(torch.sin, backend=backends.inductor, options={"no_such_option": 1})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Unrecognized mode"):
        torch.compile(torch.sin, backend=backends.inductor, mode="fastest-please")(x)
    gm = torch.fx.symbolic_trace(lambda x: x.sin())
    with pytest.raises(TypeError, match="parition_fn"):
        aotgrad.aot_module_simplified(gm, [x], aotgrad.nop, parition_fn=aotgrad.default_partition)
    with pytest.raises(TypeError):
        backends.aot_eager(gm, [x], fw_compilr=aotgrad.nop)


def test_aot_eager_warns_that_it_ignores_mode(caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="aotgrad.backends"):
        out = torch.compile(torch.sin, backend=backends.aot_eager,
                            options={"max_autotune": True})(torch.ones(2))
    assert_close(out, torch.ones(2).sin())
    assert "ignores mode" in caplog.text


def test_pre_grad_passes_run_first():
    seen = []

    def mark(gm, example_inputs):
        seen.append(len(example_inputs))
        return gm

    gm = torch.fx.symbolic_trace(lambda x: (x.sin(),))
    compiled = aotgrad.aot_module_simplified(gm, [torch.randn(3)], aotgrad.nop,
                                             pre_grad_passes=mark)
    x = torch.randn(3)
    assert_close(compiled(x)[0], x.sin())
    assert seen == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_gives_cuda_graph_trees():
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    torch.manual_seed(0)
    net, ref_net = MLP().cuda(), MLP().cuda()
    ref_net.load_state_dict(net.state_dict())
    compiled = torch.compile(net, backend=backends.inductor, mode="reduce-overhead")
    for step in range(3):
        x = torch.randn(4, 8, device="cuda", requires_grad=True)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x)
        ref = ref_net(x)
        assert_close(out, ref)
        out.backward()
        ref.backward()
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert_close(p.grad, q.grad)
            p.grad = q.grad = None   # the graphs' outputs are overwritten by the next step
    assert cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager is not None


@pytest.mark.parametrize("freezing", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_inductor_with_subclass_parameters(freezing, grad):
    # was: the inference graph compiled with the subclass (not its inner
    # tensors) as example inputs; freezing is not applied, with a warning
    from torch.testing._internal.two_tensor import TwoTensor

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(TwoTensor(torch.randn(4, 4), torch.randn(4, 4)),
                                  requires_grad=grad)

        def forward(self, x):
            return x @ self.w

    m, x = M().eval(), torch.randn(2, 4)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing), \
            pytest.warns(UserWarning, match="does not freeze") if freezing else \
            contextlib.nullcontext():
        out = torch.compile(m, backend=backends.inductor)(x)
    assert_close(out, m(x))


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("donated", [True, False])
def test_donated_buffers(monkeypatch, tmp_path, donated, cache):
    # Note [Donated buffers]: inductor may reuse saved values' memory in the
    # backward; retain_graph=True still gives eager's gradients, twice -- with
    # inductor's FX graph cache on too, whose key did not hold the donated
    # buffers: the retain_graph backward got the donating code back (silent)
    import torch._inductor.graph as inductor_graph

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    seen = []
    real = inductor_graph.get_donated_idxs
    monkeypatch.setattr(inductor_graph, "get_donated_idxs", lambda: seen.append(real()) or seen[-1])

    def f(x, w):
        return (x @ w).sin().cos().sum()

    torch._dynamo.reset()
    x, w = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    ref, = torch.autograd.grad(f(x, w), x)
    with aotgrad.config.patch(donated_buffer=donated), \
            torch._inductor.config.patch(fx_graph_cache=cache):
        g = torch.compile(f, backend=backends.inductor)
        out = g(x, w)
        assert_close(torch.autograd.grad(out, x)[0], ref)
        out = g(x, w)
        for _ in range(3):
            assert_close(torch.autograd.grad(out, x, retain_graph=True)[0], ref)
    assert any(seen) == donated


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(8, 32), nn.Linear(32, 4), nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(self.a(x).relu())).sum()


def test_inductor_takes_dropout_as_torchs_inductor_does():
    """Note [Inductor's graph passes]: dropout reaches inductor as its seeded
    random ops (without the joint passes its lowering refuses ``aten.rand``),
    and, drawing from the same generator state, gives torch's inductor's values."""
    torch.manual_seed(0)
    net, x = _DropoutNet(), torch.randn(16, 8)
    results = {}
    for name, backend in [("torch", "inductor"), ("aotgrad", backends.inductor)]:
        torch._dynamo.reset()
        net.zero_grad()
        compiled = torch.compile(net, backend=backend)
        torch.manual_seed(1)
        out = compiled(x)
        out.backward()
        results[name] = (out.detach(), [p.grad.clone() for p in net.parameters()])
    assert_close(results["aotgrad"], results["torch"])
    with torch.no_grad():  # and without dropout, eager's values
        net.eval()
        assert_close(torch.compile(net, backend=backends.inductor)(x), net(x))


def test_inductor_input_writes_move_version_counters():
    """Note [Versions of inputs written in the graph] (runtime.py): inductor
    writes a mutated input from its own kernel; the version counter did not
    move, and a backward that saved the input used the new value silently
    (an SGD-like step between a loss and its backward) where eager raises."""
    @torch.no_grad()
    def step(p, g):
        p.add_(g, alpha=-0.5)

    def train(x, y):   # a training program writing an input that needs no grad
        y.mul_(3)
        return (x * y).sum()

    for f, args in ((step, lambda p: (p, torch.ones(3))),
                    (train, lambda p: (torch.ones(3, requires_grad=True), p))):
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=backends.inductor)
        for fn in (f, compiled):
            p, w = torch.ones(3), torch.ones(3, requires_grad=True)
            loss = (w * p).sum()          # saves p
            fn(*args(p))
            assert p._version == 1
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


def test_inductor_donates_no_buffer_an_input_takes_over(monkeypatch, tmp_path):
    """Note [Donated buffers] (compile.py): after ``x.data = x.data * 2`` in the
    program the saved product is x's memory; inductor's backward was allowed
    to overwrite it and left x's gradient in x (after another program's
    compile, with the FX graph cache on: a fresh cache folder)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def f(x):
        x.data = x.data * 2
        return x.cos()

    torch._dynamo.reset()
    y = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    torch.compile(lambda y: (y * 2).cos(), backend=backends.inductor)(y).sum().backward()
    for fn in (f, torch.compile(f, backend=backends.inductor)):
        x = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
        fn(x).sum().backward()
        assert_close(x.detach(), torch.tensor([0.2, 0.4, 0.6]))
        assert_close(x.grad, -torch.tensor([0.2, 0.4, 0.6]).sin())
