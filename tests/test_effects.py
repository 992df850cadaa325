"""Effectful ops (issue 18, item 1: ``with_effects``) through aot_function
and both torch.compile backends, static and dynamic, with and without
grad, against eager: values, gradients, the effects themselves (how many,
in which order, forward or backward), and the effect tokens in the graphs
the compilers get, against torch's own AOTAutograd (Note [Effect tokens in
compiled graphs], Note [Effects in the backward], tokens.py)."""

import operator

import pytest
import torch
from torch.testing import assert_close

import aotgrad
from aotgrad import backends

try:
    from torch._library.effects import EffectType
except ImportError:  # older torch
    from torch._higher_order_ops.effects import _EffectType as EffectType

LOG: list = []   # what the effectful custom ops saw, in order; markers between runs


@torch.library.custom_op("aotgrad_test_effects::record", mutates_args=())
def record(x: torch.Tensor, tag: str) -> None:
    LOG.append((tag, x.detach().clone()))


@record.register_fake
def _(x, tag):
    return None


record.register_effect(EffectType.ORDERED)


@torch.library.custom_op("aotgrad_test_effects::scaled", mutates_args=())
def scaled(x: torch.Tensor, tag: str) -> torch.Tensor:
    LOG.append(("scaled " + tag, x.detach().clone()))
    return x * 3


@scaled.register_fake
def _(x, tag):
    return torch.empty_like(x)


def _scaled_backward(ctx, grad):
    record(grad, "d scaled")               # an effect the derivative runs
    return scaled(grad, "in backward"), None


scaled.register_autograd(_scaled_backward)
scaled.register_effect(EffectType.ORDERED)


class _EffectsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        torch.ops.aten._print("backward starts")   # reads no tangent
        record(x, "saved, in backward")            # reads a forward value only
        record(grad, "grad, in backward")
        return grad * 2


def _prints(x):
    torch.ops.aten._print("first")
    y = x.sin()
    torch.ops.aten._print("second")
    return y * 2


def _records(x):
    record(x, "in")
    y = x.sin()
    record(y, "mid")
    z = y.cos() * x
    record(z, "out")
    return z


def _scaled_chain(x):
    y = scaled(x, "f1")   # saved for the backward: never run again there
    record(y, "mid")
    return scaled(y.cos(), "f2") + x


def _backward_effects(x):
    record(x, "before")
    torch.ops.aten._print("forward")
    y = _EffectsInBackward.apply(x.sin())
    record(y, "after")
    return y.cos()


def _hop_print(x):
    torch._higher_order_ops.print("hop print {}", "first")
    y = x.sin() * 2
    record(y, "between")
    torch._higher_order_ops.print("hop print {}", "second")
    return y


PROGRAMS = {
    "prints": _prints,
    "records": _records,
    "scaled_chain": _scaled_chain,
    "backward_effects": _backward_effects,
    "hop_print": _hop_print,
}


def _compiled(how, fn, dynamic):
    torch._dynamo.reset()
    if how == "aot_function":
        return aotgrad.aot_function(fn, aotgrad.nop, dynamic=dynamic)
    backend = {"aot_eager": backends.aot_eager, "inductor": backends.inductor}[how]
    return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)


def _run(fn, sizes, grad, capfd):
    """Each call's output, gradient and effects: the custom ops' log and what
    was printed (C++ ``_print`` and the print HOP write to stdout), for the
    forward, the backward and a no_grad call apart."""
    torch.manual_seed(0)
    results = []
    for n in sizes:
        x = torch.randn(n, requires_grad=grad)
        LOG.clear()
        capfd.readouterr()
        out = fn(x)
        forward = (list(LOG), capfd.readouterr().out)
        LOG.clear()
        if grad:
            out.sum().backward()
        backward = (list(LOG), capfd.readouterr().out)
        LOG.clear()
        with torch.no_grad():
            again = fn(x.detach() + 1)
        inference = (list(LOG), capfd.readouterr().out)
        results.append((out.detach(), x.grad, again, forward, backward, inference))
    return results


def _check(compiled, fn, grad, dynamic, capfd, **tolerance):
    sizes = (4, 6) if dynamic else (4,)
    expected = _run(fn, sizes, grad, capfd)
    got = _run(compiled, sizes, grad, capfd)
    for exp, res in zip(expected, got):
        for a, b in zip(res[:3], exp[:3]):
            if b is None:
                assert a is None
            else:
                assert_close(a, b, **tolerance)
        for (log, out), (exp_log, exp_out) in zip(res[3:], exp[3:]):
            assert out == exp_out                  # prints: once each, in order
            assert [t for t, _ in log] == [t for t, _ in exp_log]
            for (_, v), (_, w) in zip(log, exp_log):
                assert_close(v, w, **tolerance)
    if grad:  # the effects really ran in the backward
        assert any(exp[4][0] or exp[4][1] for exp in expected) == \
            (fn in (_scaled_chain, _backward_effects))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("how", ["aot_function", "aot_eager"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_effects(name, how, grad, dynamic, capfd):
    fn = PROGRAMS[name]
    _check(_compiled(how, fn, dynamic), fn, grad, dynamic, capfd)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ["prints", "scaled_chain", "backward_effects", "hop_print"])
def test_effects_inductor(name, dynamic, capfd):
    fn = PROGRAMS[name]
    _check(_compiled("inductor", fn, dynamic), fn, True, dynamic, capfd, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the graphs


def _capturing(graphs, key):
    def compiler(gm, example_inputs):
        graphs.setdefault(key, []).append(gm)
        return aotgrad.make_boxed_func(gm)
    return compiler


def _torch_graphs(fn, grad):
    """The graphs torch's AOTAutograd hands its compilers (the reference)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=_capturing(graphs, "fw"),
                           bw_compiler=_capturing(graphs, "bw"))
    with torch.set_grad_enabled(grad):
        out = torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(4, requires_grad=True))
        if grad:
            out.sum().backward()
    return graphs


def _aotgrad_graphs(fn, grad):
    graphs = {}
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        return aotgrad.aot_module_simplified(gm, example_inputs,
                                             fw_compiler=_capturing(graphs, "fw"),
                                             bw_compiler=_capturing(graphs, "bw"))
    with torch.set_grad_enabled(grad):
        out = torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(4, requires_grad=True))
        if grad:
            out.sum().backward()
    return graphs


def _chain(gm):
    """The effects of ``gm``, in order, checking that one token threads them:
    each ``with_effects`` takes the token the one before returned; the first
    takes the graph's token (a placeholder, or made in the graph) and the
    last one's token leaves the graph (an output, or sunk)."""
    graph = gm.graph
    effects = graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    assert not [n for n in graph.nodes if n.op == "call_function" and
                isinstance(n.target, torch._ops.OpOverload) and
                n.target in (torch.ops.aten._print.default, record._opoverload,
                             scaled._opoverload)], "an effect outside the chain"
    token = None
    for n in effects:
        source = n.args[0]
        if token is None:
            assert source.op == "placeholder" or \
                source.target is torch.ops.prims._make_token.default, n.format_node()
        else:
            assert source is token, n.format_node()
        (token,) = [u for u in n.users if u.args[1] == 0]
        assert token.target is operator.getitem
    if token is not None:
        (user,) = token.users
        assert user.op == "output" or user.target is torch.ops.prims._sink_tokens.default
    return [n.args[1] for n in effects]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_graphs_thread_tokens_as_torch_does(name, grad):
    fn = PROGRAMS[name]
    ours, reference = _aotgrad_graphs(fn, grad), _torch_graphs(fn, grad)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        for gm, ref in zip(ours[key], reference[key], strict=True):
            assert _chain(gm) == _chain(ref), (key, gm.code, ref.code)
            # unlifted (torch's form for inductor): the calling convention is aotgrad's
            assert not [p for p in gm.graph.find_nodes(op="placeholder") if "token" in p.name]
    if grad and name in ("scaled_chain", "backward_effects"):
        assert _chain(ours["bw"][0])


def test_effects_in_the_backward_stay_there():
    """Note [Effects in the backward]: an effect of the backward that reads no
    tangent (a print) or no gradient needs runs in the backward graph, not
    the forward; the forward value it reads is saved for it."""
    graphs = {}
    compiled = aotgrad.aot_function(_backward_effects, _capturing(graphs, "fw"),
                                    _capturing(graphs, "bw"))
    compiled(torch.randn(4, requires_grad=True)).sum().backward()
    fw, bw = _chain(graphs["fw"][0]), _chain(graphs["bw"][0])
    assert fw == [record._opoverload, torch.ops.aten._print.default, record._opoverload]
    assert bw == [torch.ops.aten._print.default, record._opoverload, record._opoverload]
    for partition_fn in (aotgrad.min_cut_rematerialization_partition,):
        graphs.clear()
        compiled = aotgrad.aot_function(_backward_effects, _capturing(graphs, "fw"),
                                        _capturing(graphs, "bw"), partition_fn=partition_fn)
        compiled(torch.randn(4, requires_grad=True)).sum().backward()
        assert _chain(graphs["bw"][0]) == bw


def test_aotgrad_graphs_keep_the_ops_themselves():
    """Note [Effect tokens] (record.py): the joint graph a partitioner gets
    records each effect as the op itself; only the compiled graphs thread tokens."""
    joints = []

    def partition(joint, inputs, **kwargs):
        joints.append(joint)
        return aotgrad.default_partition(joint, inputs, **kwargs)

    aotgrad.aot_function(_records, aotgrad.nop, partition_fn=partition)(
        torch.randn(3, requires_grad=True)).sum().backward()
    targets = [n.target for n in joints[0].graph.nodes]
    assert targets.count(record._opoverload) == 3
    assert torch.ops.higher_order.with_effects not in targets


def test_a_leaf_function_runs_once_per_call():
    """``torch._dynamo.decorators.leaf_function``: an effectful higher-order
    op (``invoke_leaf_function``) with a backward of its own.  (inductor
    cannot lower it, with torch's AOTAutograd or aotgrad's.)"""
    leaf_function = pytest.importorskip("torch._dynamo.decorators").leaf_function

    @leaf_function
    def stats(x):
        LOG.append(("leaf", x.detach().clone()))
        return (x.mean() * x,)

    @stats.register_fake
    def _(x):
        return (x.mean() * x,)

    def fn(x):
        (z,) = stats(x.sin())
        record(z, "after the leaf")
        return z * 2

    for how in ("aot_function", "aot_eager"):
        runs = []
        for f in (fn, _compiled(how, fn, False)):
            torch.manual_seed(0)
            x = torch.randn(4, requires_grad=True)
            LOG.clear()
            out = f(x)
            out.sum().backward()
            runs.append((out.detach(), x.grad, [t for t, _ in LOG]))
        (out, grad, log), (ref, ref_grad, ref_log) = runs[1], runs[0]
        assert_close(out, ref)
        assert_close(grad, ref_grad)
        assert log == ref_log == ["leaf", "after the leaf"]


def test_export_chains_effectful_higher_order_ops_as_torch_does():
    """Note [Effect tokens in export]: an effectful higher-order op (the print
    HOP) joins the same token chain as an effectful ATen op."""
    from torch._functorch import aot_autograd as torch_aot

    class M(torch.nn.Module):
        def forward(self, x):
            torch._higher_order_ops.print("hop print {}", "first")
            torch.ops.aten._print("second")
            return (x.sin(),)

    x = torch.randn(3)
    gm, sig = aotgrad.aot_export_module(M(), [x], trace_joint=False)
    gm_t, sig_t = torch_aot.aot_export_module(M(), [x], trace_joint=False)
    assert gm.code == gm_t.code
    assert (sig.input_tokens, sig.output_tokens) == (sig_t.input_tokens, sig_t.output_tokens)
    assert _chain(gm) == [torch.ops.higher_order.print, torch.ops.aten._print.default]
