"""aot_export_joint_with_descriptors / aot_compile_joint_with_descriptors,
side by side with PyTorch 2.13's own and against eager training."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from torch._functorch import aot_autograd as torch_aot
from torch.testing import assert_close

import aotgrad
from aotgrad import aot_compile_joint_with_descriptors, aot_export_joint_with_descriptors
from tests.helpers import GraphRecorder


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.register_buffer("buf", torch.zeros(2))

    def forward(self, x, *, scale=1.0):
        self.buf.add_(1)
        y = self.lin(x) * scale + self.buf
        return {"y": y, "s": y.sum()}


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x).relu()
        return (self.b(h).sum(), h.view(-1))


def _export(api, mod, args, kwargs=None, **options):
    with contextlib.ExitStack() as stack:
        return api(stack, mod, args, kwargs, **options)


def _descs(gm):
    return ([(n.name, repr(n.meta["desc"])) for n in gm.graph.find_nodes(op="placeholder")],
            repr(gm.graph.output_node().meta["desc"]))


@pytest.mark.parametrize("make, args, kwargs, same_text", [
    (Model, lambda: (torch.randn(4, 3),), {"scale": 2.0}, True),
    # torch's text has a detach of a detach before threshold_backward (identities)
    (TwoLayer, lambda: (torch.randn(3, 4),), None, False),
])
def test_graph_and_descriptors_are_torchs(make, args, kwargs, same_text):
    torch.manual_seed(1)
    a = args()
    jd_t = _export(torch_aot.aot_export_joint_with_descriptors, make(), a, kwargs)
    jd = _export(aot_export_joint_with_descriptors, make(), a, kwargs)
    if same_text:
        assert jd.graph_module.code == jd_t.graph_module.code
    # the joints compute the same values, output by output
    prims, tans = [], []
    for node in jd.graph_module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        value = torch.randn(val.shape) if isinstance(val, torch.Tensor) else kwargs["scale"]
        (tans if node.meta["desc"].is_tangent() else prims).append(value)
    got, want = jd.graph_module(prims, tans), jd_t.graph_module(prims, tans)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert_close(g, w)
    assert type(jd.graph_module).__name__ == type(jd_t.graph_module).__name__ == "inner_f"
    assert _descs(jd.graph_module) == _descs(jd_t.graph_module)
    assert (jd.params_spec, jd.buffers_spec) == (jd_t.params_spec, jd_t.buffers_spec)
    assert jd.in_spec == jd_t.in_spec and jd.out_spec == jd_t.out_spec
    assert jd.fake_mode is not None


def test_descriptor_methods():
    jd = _export(aot_export_joint_with_descriptors, Model(), (torch.randn(4, 3),))
    descs = [n.meta["desc"] for n in jd.graph_module.graph.find_nodes(op="placeholder")]
    assert [d.is_param() for d in descs] == [True, True, False, False, False, False]
    assert [d.is_buffer() for d in descs] == [False, False, True, False, False, False]
    assert [d.is_tangent() for d in descs] == [False] * 4 + [True, True]
    assert descs[0].expr() == "self.get_parameter('lin.weight')"
    assert descs[3].expr() == "args[0]"
    assert descs[4].expr() == "__output_tangent(output[0])"
    outs = jd.graph_module.graph.output_node().meta["desc"]
    assert outs[0].expr() == "__input_mutation(self.get_buffer('buf'))"
    assert outs[3].is_grad() and outs[3].expr() == "__grad(self.get_parameter('lin.weight'))"


def _train_step(fn, mod, x, **kwargs):
    out = fn(*mod.parameters(), *mod.buffers(), x, **kwargs)
    out["s"].backward() if isinstance(out, dict) else out[0].backward()
    return out, {n: p.grad.clone() for n, p in mod.named_parameters()}, \
        [b.clone() for b in mod.buffers()]


def test_compiled_joint_trains_like_eager_and_torch():
    x = torch.randn(4, 3)
    results = []
    for api in ("eager", "torch", "aotgrad"):
        mod = Model()
        if api == "eager":
            fn = lambda *a, **k: mod(a[-1], **k)  # noqa: E731
        else:
            export = torch_aot.aot_export_joint_with_descriptors if api == "torch" \
                else aot_export_joint_with_descriptors
            compile_ = torch_aot.aot_compile_joint_with_descriptors if api == "torch" \
                else aot_compile_joint_with_descriptors
            with contextlib.ExitStack() as stack:
                jd = export(stack, mod, (x,), {"scale": 2.0})
                fn = compile_(jd)
        results.append(_train_step(fn, mod, x, scale=2.0))
    for other in results[1:]:
        assert_close(other[0]["y"], results[0][0]["y"])
        assert_close(other[1], results[0][1])
        assert_close(other[2], results[0][2])  # the buffer was updated once


def test_rewritten_joint_is_what_gets_compiled():
    # a graph pass of the kind planners make: scale the weight's gradient
    mod = TwoLayer()
    x = torch.randn(3, 4)
    jd = _export(aot_export_joint_with_descriptors, mod, (x,))
    gm = jd.graph_module
    out = gm.graph.output_node()
    descs = out.meta["desc"]
    k = next(i for i, d in enumerate(descs) if d is not None and d.is_grad() and
             d.grad_of.target == "a.weight")
    grad = out.args[0][k]
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (grad, 10.0))
    scaled.meta["val"] = grad.meta["val"]
    new = list(out.args[0])
    new[k] = scaled
    out.args = (new,)
    gm.recompile()
    fn = aot_compile_joint_with_descriptors(jd)
    fn(*mod.parameters(), x)[0].backward()
    ref = TwoLayer()
    ref(x)[0].backward()
    assert_close(mod.a.weight.grad, 10 * ref.a.weight.grad)
    assert_close(mod.b.weight.grad, ref.b.weight.grad)


def test_compilers_get_the_forward_and_backward():
    rec = GraphRecorder()
    mod = TwoLayer()
    x = torch.randn(3, 4)
    jd = _export(aot_export_joint_with_descriptors, mod, (x,))
    fn = aot_compile_joint_with_descriptors(jd, fw_compiler=aotgrad.make_boxed_compiler(rec),
                                            bw_compiler=aotgrad.make_boxed_compiler(rec))
    out = fn(*mod.parameters(), x)
    out[0].backward()
    assert rec.graphs["forward"] and rec.graphs["backward"]
    ref = TwoLayer()
    ref_out = ref(x)
    ref_out[0].backward()
    assert_close(out[1], ref_out[1])
    assert_close(mod.a.bias.grad, ref.a.bias.grad)


def test_inference_when_nothing_requires_grad():
    mod = Model()
    x = torch.randn(4, 3)
    with torch.no_grad():
        jd_t = _export(torch_aot.aot_export_joint_with_descriptors, Model(), (x,))
        jd = _export(aot_export_joint_with_descriptors, mod, (x,))
    assert not any(d is not None and d.is_tangent()
                   for d in [n.meta["desc"] for n in
                             jd.graph_module.graph.find_nodes(op="placeholder")])
    assert len(jd.graph_module.graph.find_nodes(op="placeholder")) == \
        len(jd_t.graph_module.graph.find_nodes(op="placeholder"))
    fn = aot_compile_joint_with_descriptors(jd)
    with torch.no_grad():
        out = fn(*mod.parameters(), *mod.buffers(), x)
        ref_mod = Model()
        ref = ref_mod(x)
    assert_close(out["y"], ref["y"])
    assert_close(mod.buf, ref_mod.buf)


def test_calls_unlike_the_export_are_refused():
    # Note [Compiled joints check their calls]: torch's compiled joint would
    # silently reuse the baked constant here
    mod = Model()
    x = torch.randn(4, 3)
    fn = aot_compile_joint_with_descriptors(
        _export(aot_export_joint_with_descriptors, mod, (x,), {"scale": 2.0}))
    with pytest.raises(ValueError, match="constant 2.0 baked in"):
        fn(*mod.parameters(), *mod.buffers(), x, scale=3.0)
    with pytest.raises(ValueError, match="has shape"):
        fn(*mod.parameters(), *mod.buffers(), torch.randn(5, 3), scale=2.0)
    with pytest.raises(TypeError, match="keyword arguments"):
        fn(*mod.parameters(), *mod.buffers(), x)
    with pytest.raises(TypeError, match="structured as when exported"):
        fn(*mod.parameters(), x, scale=2.0)


def test_options_aotgrad_cannot_honour_raise():
    mod, x = Model(), torch.randn(4, 3)
    with pytest.raises(TypeError, match="ExitStack"):
        aot_export_joint_with_descriptors(None, mod, (x,))
    with pytest.raises(NotImplementedError, match="disable_functionalization"):
        _export(aot_export_joint_with_descriptors, mod, (x,), disable_functionalization=True)
    jd = _export(aot_export_joint_with_descriptors, mod, (x,))
    with pytest.raises(NotImplementedError, match="serializable"):
        aot_compile_joint_with_descriptors(jd, serializable=True)


def test_lost_descriptor_is_an_error():
    mod, x = TwoLayer(), torch.randn(3, 4)
    jd = _export(aot_export_joint_with_descriptors, mod, (x,))
    jd.graph_module.graph.find_nodes(op="placeholder")[0].meta["desc"] = "?"
    with pytest.raises(RuntimeError, match="keep node.meta\\['desc'\\]"):
        aot_compile_joint_with_descriptors(jd)
