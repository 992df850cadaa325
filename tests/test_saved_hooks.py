"""Saved-tensor hooks active at compile time are inlined into the graphs."""

import unittest

import torch

import aotgrad
from helpers import GraphRecorder

calls = {"pack": 0, "unpack": 0}
contexts = []


def pack_fp16(x):
    calls["pack"] += 1
    contexts.append(aotgrad.saved_tensor_hook_context())
    if not x.dtype.is_floating_point:
        return x
    return (x.dtype, x.to(torch.float16))


def unpack_fp16(packed):
    calls["unpack"] += 1
    if isinstance(packed, torch.Tensor):
        return packed
    dtype, t = packed
    return t.to(dtype)


def fn(x, w, idx):
    return ((x @ w).relu()[idx] * x.sum()).sum()


def inputs():
    torch.manual_seed(0)
    return (torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True),
            torch.tensor([0, 2]))


class TestSavedTensorHooks(unittest.TestCase):
    def setUp(self):
        calls.update(pack=0, unpack=0)
        contexts.clear()

    # eager packs every saved tensor, inputs too: the "all" filtering mode
    @aotgrad.config.patch(saved_tensors_hooks_filtering_mode="all")
    def test_inlined_and_equal_to_eager_with_hooks(self):
        rec = GraphRecorder()
        f = aotgrad.aot_function(fn, rec)
        x, w, idx = inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            out = f(x, w, idx)
        traced_calls = dict(calls)
        self.assertGreater(traced_calls["pack"], 0)
        out.backward()
        # at run time the hooks do not run again: they live in the graphs now
        self.assertEqual(calls, traced_calls)
        fw = rec.last("forward")
        saved = fw.graph.output_node().args[0][1:]
        float_saved = [n for n in saved if n.meta["val"].is_floating_point()]
        self.assertTrue(float_saved)
        self.assertTrue(all(n.meta["val"].dtype == torch.float16 for n in float_saved))
        self.assertIn("torch.float32", rec.last("backward").code)

        x2, w2, idx2 = inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            ref = fn(x2, w2, idx2)
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w.grad, w2.grad)

    def test_context_while_tracing_only(self):
        f = aotgrad.aot_function(fn, aotgrad.nop)
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            f(*inputs()).backward()
        self.assertTrue(contexts)
        for ctx in contexts:
            self.assertEqual(set(ctx), {"_fw_graph", "_bw_graph", "_node"})
            self.assertIsInstance(ctx["_node"], torch.fx.Node)
        self.assertIsNone(aotgrad.saved_tensor_hook_context())

    def test_hooks_are_part_of_the_guard(self):
        rec = GraphRecorder()
        f = aotgrad.aot_function(fn, rec)
        f(*inputs()).backward()
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            f(*inputs()).backward()
        f(*inputs()).backward()
        self.assertEqual(len(rec.graphs["forward"]), 2)
        plain, hooked = rec.graphs["forward"]
        self.assertNotIn("float16", plain.code)
        self.assertIn("float16", hooked.code)


def _neg(x):
    return x.neg()


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return ((x @ self.w).relu() * x.sum()).sum()


class TestFilteringMode(unittest.TestCase):
    """config.saved_tensors_hooks_filtering_mode, against torch's AOTAutograd
    (which inlines hooks given as GraphModules) and eager."""

    def hooked(self, lib, cfg, mode, make):
        graphs = []
        comp = lib.make_boxed_compiler(lambda gm, i: (graphs.append(gm), gm)[1])
        f, args = make(lib, comp)
        pack = unpack = torch.fx.symbolic_trace(_neg)   # exact: hooks that change nothing
        with cfg.patch(saved_tensors_hooks_filtering_mode=mode), \
                torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = f(*args)
        out.backward()
        fw = graphs[0]
        grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return sum(1 for n in fw.graph.nodes if n.target is torch.ops.aten.neg.default), \
            fw, out, grads

    def test_modes_match_torch(self):
        import functorch.compile as reference
        import torch._functorch.config as reference_config

        def make(lib, comp):
            return lib.aot_function(fn, comp, comp), inputs()

        x, w, idx = inputs()
        eager = fn(x, w, idx)
        eager.backward()
        counts = {}
        for mode in ("donated", "no_static", "all"):
            ours, _, out, grads = self.hooked(aotgrad, aotgrad.config, mode, make)
            theirs, *_ = self.hooked(reference, reference_config, mode, make)
            self.assertEqual(ours, theirs, mode)
            counts[mode] = ours
            torch.testing.assert_close(out, eager)
            torch.testing.assert_close(grads, [x.grad, w.grad])
        # the inputs x, w, idx are saved too: only "donated" leaves them alone
        self.assertEqual(counts["all"] - counts["donated"], 3)
        self.assertEqual(counts["no_static"], counts["all"])  # no parameters here

    def test_no_static_spares_parameters(self):
        def make(lib, comp):
            torch.manual_seed(0)
            return lib.aot_module(Mlp(), comp, comp), [torch.randn(4, 4, requires_grad=True)]

        _, fw, *_ = self.hooked(aotgrad, aotgrad.config, "no_static", make)
        saved = fw.graph.output_node().args[0][1:]
        names = {n.name for n in saved}
        self.assertIn("primals_1", names)       # the parameter, not hooked
        self.assertNotIn("primals_2", names)    # the input x, hooked
        _, fw, *_ = self.hooked(aotgrad, aotgrad.config, "all", make)
        self.assertFalse({"primals_1", "primals_2"} & {n.name for n in fw.graph.output_node().args[0][1:]})

    def test_unknown_mode(self):
        f = aotgrad.aot_function(fn, aotgrad.nop)
        with aotgrad.config.patch(saved_tensors_hooks_filtering_mode="some"), \
                torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16), \
                self.assertRaisesRegex(ValueError, "filtering_mode must be one of"):
            f(*inputs())


if __name__ == "__main__":
    unittest.main()
