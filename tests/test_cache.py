"""AOTAutogradCache: hits in memory and on disk, keys, bypass."""

import functools
import os
import tempfile
import unittest
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn
from torch._dynamo.utils import counters

import aotgrad
from aotgrad import AOTAutogradCache, SerializableAOTDispatchCompiler, aot_module_simplified, nop


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return (self.lin(x).relu() * 2,)


def traced(seed=0):
    torch.manual_seed(seed)
    return fx.symbolic_trace(Small())


class TestAutogradCache(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.patch = aotgrad.config.patch(enable_autograd_cache=True, cache_dir=self.tmp.name)
        self.patch.__enter__()
        AOTAutogradCache.clear()
        counters.clear()

    def tearDown(self):
        AOTAutogradCache.clear()
        self.patch.__exit__(None, None, None)
        self.tmp.cleanup()

    def check_against_eager(self, gm, f, x):
        out = f(x)[0]
        torch.testing.assert_close(out, gm(x)[0])
        out.sum().backward()
        got = [p.grad.clone() for p in gm.parameters()]
        gm.zero_grad()
        gm(x)[0].sum().backward()
        for a, p in zip(got, gm.parameters()):
            torch.testing.assert_close(a, p.grad)

    def test_memory_hit_then_disk_hit(self):
        x = torch.randn(2, 4, requires_grad=True)
        gm1, gm2, gm3 = traced(0), traced(1), traced(2)
        self.check_against_eager(gm1, aot_module_simplified(gm1, [x], nop), x)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_miss"], 1)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_saved"], 1)
        # same code, other parameter values: a hit that uses gm2's parameters
        self.check_against_eager(gm2, aot_module_simplified(gm2, [x], nop), x)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 1)
        # a new process would start with an empty memory: load from disk,
        # without tracing again
        AOTAutogradCache._memory.clear()
        with mock.patch("aotgrad.cache.trace_call", side_effect=AssertionError("traced")):
            f3 = aot_module_simplified(gm3, [x], nop)
        self.check_against_eager(gm3, f3, x)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 2)
        files = [f for _, _, fs in os.walk(AOTAutogradCache.directory()) for f in fs]
        self.assertEqual(len(files), 1)

    def test_disk_hit_keeps_descriptors_and_bindings(self):
        # Note [Graphs on disk]: two outputs, a gradient for one only: the
        # loaded backward must know which tangent each gradient reads (eager
        # leaves the other input's grad None), and nop still uses bindings
        class Two(nn.Module):
            def forward(self, a, b):
                return (a.sin() * 2, b.cos())

        gm = fx.symbolic_trace(Two())
        a = torch.randn(3, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        aot_module_simplified(gm, [a, b], nop)
        AOTAutogradCache._memory.clear()
        with mock.patch("aotgrad.cache.trace_call", side_effect=AssertionError("traced")):
            f = aot_module_simplified(gm, [a, b], nop)
        out = f(a, b)
        out[0].sum().backward()
        torch.testing.assert_close(a.grad, 2 * a.detach().cos())
        self.assertIsNone(b.grad)
        run = AOTAutogradCache._memory[next(iter(AOTAutogradCache._memory))]
        self.assertTrue(run.program.training)

    def test_other_metadata_misses(self):
        gm = traced()
        aot_module_simplified(gm, [torch.randn(2, 4)], nop)
        aot_module_simplified(gm, [torch.randn(3, 4)], nop)
        with torch.no_grad():
            aot_module_simplified(gm, [torch.randn(3, 4)], nop)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_miss"], 3)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 0)

    def test_config_is_part_of_the_key(self):
        gm = traced()
        x = torch.randn(2, 4)
        aot_module_simplified(gm, [x], nop)
        with aotgrad.config.patch(debug_assert=True):
            aot_module_simplified(gm, [x], nop)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_miss"], 2)

    def test_subgraphs_constants_and_decompositions_are_part_of_the_key(self):
        """Note [Cache key]: torch.cond's branches (named alike by dynamo in
        both programs), a tensor constant's content and what a decomposition
        does: each program its own entry, eager's values (they shared one,
        the first program's values coming back silently)."""
        def branches(first, second):
            return lambda x: torch.cond(x.sum() > 0, first, second, (x,))

        programs = [branches(torch.sin, torch.cos), branches(torch.exp, torch.tanh)]
        for f in programs:
            torch._dynamo.reset()
            x = torch.ones(3, requires_grad=True)
            out = torch.compile(f, backend=aotgrad.backends.aot_eager)(x)
            out.sum().backward()
            x2 = torch.ones(3, requires_grad=True)
            want = f(x2)
            want.sum().backward()
            torch.testing.assert_close((out, x.grad), (want, x2.grad))
        aten = torch.ops.aten
        gelus = [lambda x, approximate="none": x * torch.sigmoid(1.702 * x),
                 lambda x, approximate="none": x * 0.5 * (1 + torch.erf(x / 2 ** 0.5))]
        x = torch.tensor([1.0, 2.0])
        got = []
        for gelu in gelus:
            torch._dynamo.reset()
            backend = functools.partial(aotgrad.backends.aot_eager,
                                        decompositions={aten.gelu.default: gelu})
            got.append(torch.compile(torch.nn.functional.gelu, backend=backend)(x))
        torch.testing.assert_close(got[0], gelus[0](x))
        torch.testing.assert_close(got[1], gelus[1](x))

    def test_clear_empties_disk(self):
        aot_module_simplified(traced(), [torch.randn(2, 4)], nop)
        AOTAutogradCache.clear()
        self.assertFalse(os.path.exists(AOTAutogradCache.directory()))
        aot_module_simplified(traced(), [torch.randn(2, 4)], nop)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_miss"], 2)

    def test_unknown_compiler_bypasses(self):
        gm = traced()
        for _ in range(2):
            aot_module_simplified(gm, [torch.randn(2, 4)], lambda g, i: g)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 2)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 0)

    def test_serializable_compiler_is_cached_and_type_checked(self):
        compiler = SerializableAOTDispatchCompiler(fx.GraphModule, lambda g, i: g)
        gm = traced()
        x = torch.randn(2, 4, requires_grad=True)
        aot_module_simplified(gm, [x], compiler)
        self.check_against_eager(gm, aot_module_simplified(gm, [x], compiler), x)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 1)
        bad = SerializableAOTDispatchCompiler(int, lambda g, i: g)
        with self.assertRaisesRegex(TypeError, "declared to return int"):
            aot_module_simplified(traced(), [torch.randn(5, 4)], bad)

    def test_disabled_by_default(self):
        with aotgrad.config.patch(enable_autograd_cache=False):
            aot_module_simplified(traced(), [torch.randn(2, 4)], nop)
        self.assertEqual(sum(counters["aot_autograd"].values()), 0)


class TestConfig(unittest.TestCase):
    def test_patch_forms(self):
        cfg = aotgrad.config
        self.assertFalse(cfg.debug_assert)
        with cfg.patch(debug_assert=True):
            self.assertTrue(cfg.debug_assert)
        with cfg.patch({"debug_assert": True, "cache_size_limit": 3}):
            self.assertEqual((cfg.debug_assert, cfg.cache_size_limit), (True, 3))
        with cfg.patch("debug_assert", True):
            self.assertTrue(cfg.debug_assert)
        self.assertFalse(cfg.debug_assert)

        @cfg.patch(debug_assert=True)
        def decorated():
            return cfg.debug_assert
        self.assertTrue(decorated())
        self.assertEqual(decorated.__name__, "decorated")
        self.assertFalse(cfg.debug_assert)

    def test_mock_patch(self):
        with mock.patch("aotgrad.config.debug_assert", True):
            self.assertTrue(aotgrad.config.debug_assert)
        self.assertFalse(aotgrad.config.debug_assert)

    def test_unknown_option(self):
        with self.assertRaisesRegex(AttributeError, "no option 'nonsense'"):
            aotgrad.config.patch(nonsense=1)

    def test_restored_after_exception(self):
        try:
            with aotgrad.config.patch(debug_assert=True):
                raise KeyError
        except KeyError:
            pass
        self.assertFalse(aotgrad.config.debug_assert)


if __name__ == "__main__":
    unittest.main()


class TestCacheRobustness(unittest.TestCase):
    def test_unpicklable_graph_is_not_saved_and_still_runs(self):
        from aotgrad.cache import AOTAutogradCache as Cache

        with tempfile.TemporaryDirectory() as tmp, \
                aotgrad.config.patch(enable_autograd_cache=True, cache_dir=tmp):
            Cache.clear()
            gm = traced(0)
            x = torch.randn(2, 4, requires_grad=True)
            with mock.patch("aotgrad.cache.pickle.dumps", side_effect=RuntimeError("not pickleable")):
                f = aot_module_simplified(gm, [x], nop)
            torch.testing.assert_close(f(x)[0], gm(x)[0])
            self.assertEqual([fs for _, _, fs in os.walk(Cache.directory()) if fs], [])
            Cache.clear()


class TestWhatTheKeyHolds(TestAutogradCache):
    """Each a program the key once mistook for another (silently the first
    one's values)."""

    def compile_simplified(self, module, inputs):
        return aot_module_simplified(fx.symbolic_trace(module), inputs, nop)

    def test_which_inputs_are_one_tensor(self):
        class AddTwice(nn.Module):
            def forward(self, a, b):
                return (a * 2 + b,)

        x, a, b = torch.randn(3), torch.randn(3), torch.randn(3)
        torch.testing.assert_close(self.compile_simplified(AddTwice(), [x, x])(x, x)[0], x * 3)
        torch.testing.assert_close(self.compile_simplified(AddTwice(), [a, b])(a, b)[0], a * 2 + b)

    def test_a_submodules_attributes_and_mode(self):
        class Norm(nn.Module):
            def __init__(self, eps):
                super().__init__()
                self.ln = nn.LayerNorm(3, eps=eps)
                self.bn = nn.BatchNorm1d(3)

            def forward(self, x):
                return (self.bn(self.ln(x)),)

        x = torch.randn(4, 3)
        for eps, train in ((1e-5, True), (10.0, True), (1e-5, False)):
            m = Norm(eps).train(train)
            want = Norm(eps).train(train)(x)[0]
            torch.testing.assert_close(self.compile_simplified(m, [x])(x)[0], want)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 0)

    def test_hooks_and_python_functions_are_bypassed(self):
        class Lin(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(2, 2)

            def forward(self, x):
                return (self.lin(x) * 2,)

        x = torch.randn(1, 2)
        gm = fx.symbolic_trace(Lin())
        gm.register_forward_hook(lambda m, i, o: (o[0] * 10,))
        torch.testing.assert_close(aot_module_simplified(gm, [x], nop)(x)[0], gm(x)[0])
        gm = fx.symbolic_trace(Lin())
        gm.lin.register_forward_hook(lambda m, i, o: o * 10)
        aot_module_simplified(gm, [x], nop)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 2)

        def make(k):
            def op(x):
                return x * k
            return op

        for k in (2.0, 5.0):
            graph = fx.Graph()
            p = graph.placeholder("x")
            graph.output((graph.call_function(make(k), (p,)),))
            gm = fx.GraphModule(nn.Module(), graph)
            torch.testing.assert_close(aot_module_simplified(gm, [x], nop)(x)[0], x * k)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 0)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 4)

    def test_negative_zero(self):
        def f(x, s):
            return x / s

        x = torch.ones(2)
        compiled = aotgrad.aot_function(f, nop)
        for s in (0.0, -0.0, 0.0):
            torch.testing.assert_close(compiled(x, s), f(x, s))
