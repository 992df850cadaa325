"""Compiled vs eager for programs that neither mutate nor alias their inputs."""

import unittest

import torch
import torch.nn as nn

import aotgrad
from aotgrad import aot_function, aot_module, nop
from helpers import GraphRecorder, assert_same_as_eager


def rand(*shape, rg=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(rg)


class TestOutputs(unittest.TestCase):
    def test_single_output(self):
        assert_same_as_eager(self, lambda a, b: a + b, [rand(3, 3, rg=True), rand(3, 3)])

    def test_multi_output_tuple_and_list(self):
        assert_same_as_eager(self, lambda a, b: (a + b, a - b), [rand(3, rg=True), rand(3)])
        assert_same_as_eager(self, lambda a, b: [a * b, a / b], [rand(3, rg=True), rand(3, rg=True)])

    def test_nested_pytree_output(self):
        def f(x, y):
            return {"sum": x + y, "parts": [x.sin(), (y.cos(), 3)]}
        assert_same_as_eager(self, f, [rand(2, 3, rg=True), rand(2, 3, rg=True)])

    def test_output_that_does_not_require_grad(self):
        def f(x):
            return x.sin(), x.detach() * 2, x.argmax()
        assert_same_as_eager(self, f, [rand(5, rg=True)])

    def test_constant_and_none_outputs(self):
        def f(x):
            return x * 2, None, 7, "tag"
        _, out = assert_same_as_eager(self, f, [rand(3, rg=True)])
        self.assertEqual(out[1:], (None, 7, "tag"))

    def test_output_is_input(self):
        def f(x, y):
            return x + y, y
        x, y = rand(3, rg=True), rand(3, rg=True)
        out = aot_function(f, nop)(x, y)
        self.assertIs(out[1], y)
        assert_same_as_eager(self, f, [x, y])

    def test_integer_and_complex_outputs(self):
        assert_same_as_eager(self, lambda x: (x * 2).abs().sum(), [rand(4, rg=True, dtype=torch.complex64)])
        assert_same_as_eager(self, lambda x: (x.long() + 1, x.exp()), [rand(4, rg=True)])


class TestInputs(unittest.TestCase):
    def test_non_tensor_and_none_inputs(self):
        def f(a, b, c):
            return a * c
        for rg in (True, False):
            assert_same_as_eager(self, f, [2, None, rand(3, 3, rg=rg)])

    def test_pytree_inputs_and_kwargs(self):
        def f(d, scale=1.0, *, extra):
            return d["a"] * scale + d["b"][0] - extra
        compiled = aot_function(f, nop)
        d = {"a": rand(3, rg=True), "b": [rand(3, rg=True)]}
        e = rand(3)
        torch.testing.assert_close(compiled(d, 2.0, extra=e), f(d, 2.0, extra=e))

    def test_inputs_that_do_not_require_grad_get_no_grad(self):
        a, b = rand(3, rg=True), rand(3)
        out = aot_function(lambda a, b: a * b, nop)(a, b)
        out.sum().backward()
        self.assertIsNone(b.grad)
        torch.testing.assert_close(a.grad, b)

    def test_unused_input_gets_no_grad(self):
        a, b = rand(3, rg=True), rand(3, rg=True)
        aot_function(lambda a, b: a * 2, nop)(a, b).sum().backward()
        self.assertIsNone(b.grad)
        torch.testing.assert_close(a.grad, torch.full((3,), 2.0))

    def test_same_tensor_passed_twice(self):
        rec = GraphRecorder()
        a = rand(3, rg=True)
        f = aot_function(lambda x, y: x * y, rec)
        f(a, a).sum().backward()
        torch.testing.assert_close(a.grad, 2 * a.detach())
        self.assertEqual(len(rec.last("forward").graph.find_nodes(op="placeholder")), 1)

    def test_tensor_constant_changes_recompile(self):
        rec = GraphRecorder()
        f = aot_function(lambda x, k: x * k, rec)
        x = rand(3)
        torch.testing.assert_close(f(x, 2), x * 2)
        torch.testing.assert_close(f(x, 3), x * 3)
        self.assertEqual(len(rec.graphs["inference"]), 2)


class TestInferencePath(unittest.TestCase):
    def test_no_grad_uses_inference_compiler(self):
        fw, inf = GraphRecorder(), GraphRecorder()
        f = aot_function(lambda x: x.sin(), fw, inference_compiler=inf)
        x = rand(3, rg=True)
        with torch.no_grad():
            out = f(x)
        self.assertFalse(out.requires_grad)
        self.assertEqual(len(inf.graphs["inference"]), 1)
        self.assertEqual(fw.graphs["inference"], [])
        self.assertIn("arg0_1", inf.last("inference").code)

    def test_no_input_requires_grad(self):
        rec = GraphRecorder()
        f = aot_function(lambda x, y: x @ y, rec)
        x, y = rand(2, 3), rand(3, 4)
        torch.testing.assert_close(f(x, y), x @ y)
        self.assertEqual(len(rec.graphs["inference"]), 1)
        self.assertEqual(rec.graphs["forward"], [])

    def test_grad_mode_switch_recompiles(self):
        rec = GraphRecorder()
        f = aot_function(lambda x: x.exp(), rec)
        x = rand(3, rg=True)
        f(x).sum().backward()
        with torch.no_grad():
            f(x)
        self.assertEqual(len(rec.graphs["forward"]), 1)
        self.assertEqual(len(rec.graphs["inference"]), 1)


class TestGuards(unittest.TestCase):
    def test_recompiles_on_new_metadata(self):
        rec = GraphRecorder()
        f = aot_function(lambda x: x.cos() * 2, rec)
        calls = [rand(3, rg=True), rand(3, rg=True), rand(4, rg=True),
                 rand(4, rg=True, dtype=torch.float64), rand(4), rand(2, 2).t().requires_grad_()]
        for x in calls:
            assert_same_as_eager(self, lambda x: x.cos() * 2, [x], compiled=f)
        n_compiles = len(rec.graphs["forward"]) + len(rec.graphs["inference"])
        self.assertEqual(n_compiles, 5)  # the second call hits the first entry

    def test_cache_size_limit(self):
        f = aot_function(lambda x: x + 1, nop)
        with aotgrad.config.patch(cache_size_limit=2):
            f(rand(1))
            f(rand(2))
            with self.assertRaisesRegex(RuntimeError, "cache_size_limit"):
                f(rand(3))

    def test_dynamic_serves_other_sizes(self):
        rec = GraphRecorder()
        f = aot_function(lambda x: (x * 2).sum(0), rec, dynamic=True)
        for n in (3, 5, 8):
            assert_same_as_eager(self, lambda x: (x * 2).sum(0), [rand(n, 4, rg=True)], compiled=f)
        self.assertEqual(len(rec.graphs["forward"]), 1)


    def test_dynamic_respects_shape_guards(self):
        def f(x):
            return x * 2 if x.shape[0] > 3 else x * 3  # the trace assumes a branch
        rec = GraphRecorder()
        c = aot_function(f, rec, dynamic=True)
        for n in (5, 6, 2, 3, 7):
            x = rand(n, 7)
            torch.testing.assert_close(c(x), f(x))
        self.assertEqual(len(rec.graphs["inference"]), 2)  # one per branch


class TestModules(unittest.TestCase):
    def test_params_and_buffers_lifted_first(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)
                self.register_buffer("scale", torch.full((3,), 2.0))

            def forward(self, x):
                return self.lin(x) * self.scale

        m = M()
        rec = GraphRecorder()
        cm = aot_module(m, rec)
        x = rand(5, 4)
        out = cm(x)
        torch.testing.assert_close(out, m(x))
        out.sum().backward()
        g = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        m(x).sum().backward()
        for a, b in zip(g, m.parameters()):
            torch.testing.assert_close(a, b.grad)
        fw = rec.last("forward")
        names = [n.name for n in fw.graph.find_nodes(op="placeholder")]
        self.assertEqual(names, ["primals_1", "primals_2", "primals_3", "primals_4"])
        # weight, bias, buffer, input: the input comes last
        shapes = [tuple(n.meta["val"].shape) for n in fw.graph.find_nodes(op="placeholder")]
        self.assertEqual(shapes, [(3, 4), (3,), (3,), (5, 4)])

    def test_module_sees_new_parameter_values(self):
        m = nn.Linear(3, 3)
        cm = aot_module(m, nop)
        x = rand(2, 3)
        cm(x)
        with torch.no_grad():
            m.weight.mul_(2)
        torch.testing.assert_close(cm(x), m(x))

    def test_complex_linear(self):
        m = nn.Linear(10, 10, dtype=torch.complex64)
        x = torch.randn(1, 10, 10, dtype=torch.complex64)
        cm = aot_module(m, nop)
        cm(x).sum().abs().backward()
        g = m.weight.grad.clone()
        m.zero_grad()
        m(x).sum().abs().backward()
        torch.testing.assert_close(g, m.weight.grad)

    def test_transformer_layer(self):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        ref = __import__("copy").deepcopy(layer)
        x = rand(2, 5, 16)
        out = aot_module(layer, nop)(x)
        out.square().mean().backward()
        ref(x).square().mean().backward()
        for p, q in zip(layer.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


class TestDecompositions(unittest.TestCase):
    def test_decompositions_apply_during_tracing(self):
        from torch._decomp import get_decompositions
        aten = torch.ops.aten
        rec = GraphRecorder()
        decomps = get_decompositions([aten.gelu, aten.gelu_backward])
        f = aot_function(lambda x: torch.nn.functional.gelu(x), rec, decompositions=decomps)
        assert_same_as_eager(self, lambda x: torch.nn.functional.gelu(x), [rand(4, rg=True)], compiled=f)
        for gm in (rec.last("forward"), rec.last("backward")):
            targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
            self.assertNotIn(aten.gelu.default, targets)
            self.assertNotIn(aten.gelu_backward.default, targets)


class TestViewsOfIntermediates(unittest.TestCase):
    def test_view_of_unreturned_intermediate(self):
        assert_same_as_eager(self, lambda x: (x * 2).view(-1), [rand(2, 3, rg=True)])

    def test_in_place_on_such_an_output(self):
        x = rand(2, 3, rg=True)
        out = aot_function(lambda x: (x * 2).view(-1), nop)(x)
        out.mul_(3)
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((2, 3), 6.0))


class TestRuntime(unittest.TestCase):
    def test_boxed_inputs_list_is_cleared(self):
        seen = []

        def compiler(gm, example_inputs):
            def run(args):
                seen.append(len(args))
                out = gm(*args)
                args.clear()
                return out
            run._boxed_call = True
            return run

        x, y = rand(3, rg=True), rand(3, rg=True)
        f = aot_function(lambda a, b: (a * b).sin(), compiler)
        assert_same_as_eager(self, lambda a, b: (a * b).sin(), [x, y], compiled=f)
        self.assertEqual(seen[0], 2)       # the forward got both primals
        self.assertGreater(len(seen), 1)   # the backward ran boxed too
        # the caller's tensors survive the callee clearing its list
        self.assertEqual(x.shape, (3,))

    def test_unboxed_compiler_is_adapted(self):
        f = aot_function(lambda a: a.exp(), lambda gm, inps: gm.forward)
        assert_same_as_eager(self, lambda a: a.exp(), [rand(3, rg=True)], compiled=f)

    def test_compilation_context(self):
        seen = []

        def compiler(gm, inps):
            seen.append(aotgrad.get_aot_compilation_context()[0])
            return gm
        aot_function(lambda a: a.exp(), compiler)(rand(3, rg=True))
        aot_function(lambda a: a.exp(), compiler)(rand(3))
        # as torch names them: the compiled program's number, then the role
        n = int(seen[0][0].split("_")[0])
        self.assertEqual(seen, [[f"{n}_forward"], [f"{n}_backward"], [f"{n + 1}_inference"]])
        self.assertEqual(aotgrad.get_aot_compilation_context()[0], [])

    def test_graph_names_match_torch(self):
        from functorch.compile import aot_function as torch_aot_function
        from functorch.compile import get_aot_compilation_context, get_aot_graph_name

        def recorder(context, name, seen):
            def compiler(gm, inps):
                graphs, model, nth = context()
                seen.append((graphs[0].split("_", 1)[1], model, name().split("__")[1].rsplit(
                    "_", 1)[0].split("_", 1)[1]))
                return gm
            return compiler

        ours, theirs = [], []
        for aot, context, name, seen in [
                (aot_function, aotgrad.get_aot_compilation_context, aotgrad.get_aot_graph_name,
                 ours),
                (torch_aot_function, get_aot_compilation_context, get_aot_graph_name, theirs)]:
            f = aot(lambda a: a.exp(), recorder(context, name, seen))
            f(rand(3, rg=True)).sum().backward()
        self.assertEqual(ours, theirs)
        self.assertEqual(ours, [("forward", "model", "forward"), ("backward", "model", "backward")])

    def test_debug_assert_catches_a_wrong_compiler(self):
        def bad_compiler(gm, inps):
            return lambda *args: (args[0].double(),)
        with aotgrad.config.patch(debug_assert=True):
            f = aot_function(lambda a: a + 1, bad_compiler)
            with self.assertRaisesRegex(AssertionError, "debug_assert"):
                f(rand(3))

    def test_backward_twice_with_retain_graph(self):
        x = rand(3, rg=True)
        out = aot_function(lambda a: a.sin() * a, nop)(x)
        out.sum().backward(retain_graph=True)
        g1 = x.grad.clone()
        out.sum().backward()
        torch.testing.assert_close(x.grad, 2 * g1)

    def test_double_backward_matches_eager(self):
        # Note [Higher-order backward]; more in tests/test_higher_order.py
        x = rand(3, rg=True)
        out = aot_function(lambda a: a.sin().exp(), nop)(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        torch.testing.assert_close(g, x.cos() * x.sin().exp())
        self.assertTrue(g.requires_grad)  # as in eager: it depends on x
        (gg,) = torch.autograd.grad(g.sum(), x)
        xe = x.detach().requires_grad_()
        (ge,) = torch.autograd.grad(xe.sin().exp().sum(), xe, create_graph=True)
        torch.testing.assert_close(gg, torch.autograd.grad(ge.sum(), xe)[0])


if __name__ == "__main__":
    unittest.main()
