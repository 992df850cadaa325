"""Symbolic shapes, sparse gradients and autocast, each against eager."""

import unittest

import torch
import torch.nn as nn
from expecttest import TestCase

import aotgrad
from aotgrad import aot_function, aot_module, nop
from helpers import GraphRecorder


def grads_of(fn, *inputs):
    args = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*args)
    out.sum().backward()
    return out, [a.grad for a in args]


class TestDynamicShapes(TestCase):
    def test_one_graph_serves_other_sizes_with_saved_symints(self):
        rec = GraphRecorder()

        def f(x, y):
            # x.shape[0] is used by the backward (through the reshape and the scale)
            return (x.reshape(-1) * x.shape[0]).sin() * y.sum()

        compiled = aot_function(f, rec, rec, dynamic=True)
        for n in (3, 5, 8):
            x, y = torch.randn(n, 2, requires_grad=True), torch.randn(4, requires_grad=True)
            want, want_grads = grads_of(f, x, y)
            got, got_grads = grads_of(compiled, x, y)
            torch.testing.assert_close(got, want)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w)
        self.assertEqual(len(rec.graphs["forward"]), 1)
        self.assertEqual(len(rec.graphs["backward"]), 1)
        fw, bw = rec.last("forward"), rec.last("backward")
        # the forward returns a symbolic size that the backward takes first
        bw_inputs = [n.meta["val"] for n in bw.graph.find_nodes(op="placeholder")]
        self.assertIsInstance(bw_inputs[0], torch.SymInt)
        fw_out = fw.graph.output_node().args[0]
        self.assertTrue(any(isinstance(o.meta.get("val"), torch.SymInt) for o in fw_out
                            if hasattr(o, "meta")))

    def test_sizes_the_trace_specialised_get_their_own_graph(self):
        """Note [Shape guards]: a first call at size 1 (or 0) specialises that
        size; the shape guard left static sizes out, so the graph was reused
        at other sizes (``x.sum(0) / x.shape[0]``: 4x eager's mean at batch 4).
        Each call now gives eager's values and gradients."""
        programs = [lambda x: x.sum(0) / x.shape[0], lambda x: x + x.shape[0],
                    lambda x: x.unfold(0, 2, 1).sum(-1) * x.shape[0]]
        for f, sizes in zip(programs, ([1, 4, 1, 3], [0, 3, 1, 5], [2, 7, 3])):
            compiled = aot_function(f, nop, dynamic=True)
            for n in sizes:
                x = torch.arange(n * 2, dtype=torch.float).reshape(n, 2).requires_grad_()
                got, got_grads = grads_of(compiled, x)
                want, want_grads = grads_of(f, x)
                torch.testing.assert_close(got, want)
                torch.testing.assert_close(got_grads, want_grads)

    def test_mark_dynamic_through_torch_compile(self):
        torch._dynamo.reset()
        rec = GraphRecorder()

        def backend(gm, example_inputs):
            return aotgrad.aot_module_simplified(gm, example_inputs, rec, rec)

        def f(x):
            return (x * x.shape[0]).cos().sum(0)

        compiled = torch.compile(f, backend=backend)
        for n in (4, 6, 9):
            x = torch.randn(n, 3)
            want, want_grads = grads_of(f, x.requires_grad_())
            x = x.detach().requires_grad_()
            torch._dynamo.mark_dynamic(x, 0)
            got = compiled(x)
            got.sum().backward()
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(x.grad, want_grads[0])
        self.assertEqual(len(rec.graphs["forward"]), 1)
        first = rec.last("forward").graph.find_nodes(op="placeholder")
        self.assertTrue(any(isinstance(n.meta.get("val"), torch.SymInt) or
                            (isinstance(n.meta.get("val"), torch.Tensor) and
                             isinstance(n.meta["val"].shape[0], torch.SymInt)) for n in first))


class TestSparse(TestCase):
    def test_embedding_bag_sparse_gradient(self):
        torch.manual_seed(0)
        eager = nn.EmbeddingBag(10, 3, mode="sum", sparse=True)
        mod = nn.EmbeddingBag(10, 3, mode="sum", sparse=True)
        mod.load_state_dict(eager.state_dict())
        compiled = aot_module(mod, nop)
        idx, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])
        want, got = eager(idx, offsets), compiled(idx, offsets)
        torch.testing.assert_close(got, want)
        (want * torch.arange(3.0)).sum().backward()
        (got * torch.arange(3.0)).sum().backward()
        self.assertEqual(mod.weight.grad.layout, torch.sparse_coo)
        torch.testing.assert_close(mod.weight.grad.to_dense(), eager.weight.grad.to_dense())


class TestAutocast(TestCase):
    def run_under_autocast(self, setting):
        rec = GraphRecorder()

        def f(a, b):
            return torch.mm(a, b).relu().sum()

        a, b = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
        with aotgrad.config.patch(backward_pass_autocast=setting):
            compiled = aot_function(f, rec, rec)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want, want_grads = grads_of(f, a, b)
                got, got_grads = grads_of(compiled, a, b)
        torch.testing.assert_close(got, want)
        return rec, got_grads, want_grads

    def test_forward_is_traced_under_autocast(self):
        rec, got, want = self.run_under_autocast("same_as_forward")
        self.assertIn("torch.bfloat16", rec.last("forward").code)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

    def test_backward_same_as_forward_casts_its_matmuls(self):
        rec, _, _ = self.run_under_autocast("same_as_forward")
        mms = [n for n in rec.last("backward").graph.nodes if n.target == torch.ops.aten.mm.default]
        self.assertTrue(mms)
        self.assertTrue(all(n.meta["val"].dtype == torch.bfloat16 for n in mms))

    def test_backward_autocast_off(self):
        rec, _, _ = self.run_under_autocast("off")
        mms = [n for n in rec.last("backward").graph.nodes if n.target == torch.ops.aten.mm.default]
        self.assertTrue(mms)
        # the incoming bf16 gradient meets saved bf16 values: no casts to float32 are added
        self.assertNotIn("torch.float32", rec.last("backward").code.split("mm")[0])

    def test_backward_autocast_with_explicit_kwargs(self):
        rec, _, _ = self.run_under_autocast([{"device_type": "cpu", "dtype": torch.float16}])
        self.assertIn("torch.float16", rec.last("backward").code)

    def test_autocast_dtype_is_part_of_the_guard(self):
        """A program traced under bfloat16 autocast was reused under float16
        autocast (the guard key held only whether autocast was on): bfloat16
        results where eager gives float16.  Now each dtype has its program."""
        def f(x, w):
            return x @ w

        compiled = aot_function(f, nop)
        x, w = torch.randn(4, 4), torch.randn(4, 4, requires_grad=True)
        for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                got, want = compiled(x, w), f(x, w)
            self.assertEqual(got.dtype, want.dtype)
            torch.testing.assert_close(got, want)
            got.sum().backward()

    def test_bad_setting_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "backward_pass_autocast"):
            self.run_under_autocast("sometimes")


if __name__ == "__main__":
    unittest.main()
