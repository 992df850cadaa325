"""aotgrad.config: torch's option names and defaults, closed to misspellings,
and the options aotgrad honours (each against eager, and against torch's
AOTAutograd run side by side where the graph is the contract)."""

from __future__ import annotations

import pickle
import re
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

import aotgrad
from aotgrad import config
from aotgrad.views import is_view_op

README = Path(__file__).resolve().parent.parent / "README.md"

#: Options whose default deliberately differs from torch's (the README says why).
DIFFERENT_DEFAULTS = {"enable_autograd_cache"}


def torch_config():
    import torch._functorch.config as reference
    return reference


def torch_options() -> list[str]:
    return [k for k in torch_config()._config if k not in ("TYPE_CHECKING", "_save_config_ignore")]


# ---------------------------------------------------------------- names, defaults, helpers


class TestNames(unittest.TestCase):
    def test_every_torch_option_with_torch_default(self):
        ref = torch_config()
        names = torch_options()
        # torch 2.13 has 61 (2.11, on the GPU machine, 58: all of them are among ours)
        self.assertEqual(len(names), 61 if torch.__version__ >= "2.13" else len(names))
        for name in names:
            self.assertTrue(config.is_option(name), name)
            if name not in DIFFERENT_DEFAULTS:
                self.assertEqual(getattr(config, name), getattr(ref, name), name)
            with config.patch(**{name: getattr(config, name)}):   # patchable
                pass

    def test_misspelt_assignment_raises_with_suggestion(self):
        with self.assertRaisesRegex(AttributeError, "did you mean 'debug_assert'"):
            config.debug_asert = True
        with self.assertRaisesRegex(AttributeError, "saved_tensors_hooks_filtering_mode"):
            config.patch(saved_tensors_hook_filtering_mode="all")
        with self.assertRaisesRegex(AttributeError, "no option 'nonsense'"):
            config.nonsense
        self.assertFalse(hasattr(config, "nonsense"))

    @config.patch(saved_tensors_hooks_filtering_mode="no_static")
    def test_torch_style_decorator(self):
        self.assertEqual(config.saved_tensors_hooks_filtering_mode, "no_static")

    def test_mock_patch_and_assignment(self):
        with mock.patch("aotgrad.config.cse", False):
            self.assertFalse(config.cse)
        self.assertTrue(config.cse)
        config.cse = False
        try:
            self.assertFalse(config.cse)
        finally:
            config.cse = True

    def test_snapshot_and_key(self):
        snap = config.snapshot()
        self.assertEqual(set(snap), set(config._OPTIONS))
        self.assertTrue(set(torch_options()) <= set(snap))
        key = config.cache_key_options()
        self.assertNotIn("cache_dir", key)
        self.assertIn("cse", key)
        h = config.get_hash()
        with config.patch(cse=False):
            self.assertNotEqual(config.get_hash(), h)
        with config.patch(cache_size_limit=3):    # Note [Options outside the cache key]
            self.assertEqual(config.get_hash(), h)

    def test_save_load_codegen(self):
        blob = config.save_config()
        self.assertNotIn("joint_custom_pass", pickle.loads(blob))
        with config.patch(cse=False, recompute_views=True):
            changed = config.save_config()
            self.assertIn("aotgrad.config.cse = False", config.codegen_config())
            self.assertEqual(config.save_config_portable(), {"cse": False, "recompute_views": True})
        config.load_config(changed)
        try:
            self.assertEqual((config.cse, config.recompute_views), (False, True))
        finally:
            config.load_config(blob)
        self.assertTrue(config.cse)
        self.assertEqual(config.get_type("activation_memory_budget"), float)
        self.assertEqual(config.get_config_copy(), config.shallow_copy_dict())
        with self.assertRaises(AttributeError):
            config.load_config({"cse_typo": True})

    def test_readme_table_lists_every_option(self):
        text = README.read_text()
        rows = re.findall(r"^\| `([a-z_0-9]+)` \| (yes|no|n\.a\.|not yet) \| (.+) \|$", text, re.M)
        names = [r[0] for r in rows]
        self.assertEqual(sorted(names), sorted(config._OPTIONS))
        self.assertEqual(len(names), len(set(names)))


# ---------------------------------------------------------------- helpers for honoured options


def compile_and_run(lib, f, args, partition=None, **patch):
    """Compile ``f`` with ``lib`` (aotgrad or torch's functorch.compile), run
    forward and backward of sum() under the options ``patch``; returns
    (outputs, grads, fw_gm, bw_gm)."""
    cfg = config if lib is aotgrad else torch_config()
    graphs = []
    comp = lib.make_boxed_compiler(lambda gm, i: (graphs.append(gm), gm)[1])
    partition = partition or lib.min_cut_rematerialization_partition
    g = lib.aot_function(f, comp, comp, partition_fn=partition)
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    with cfg.patch(**patch):
        torch.manual_seed(0)
        out = g(*args)
        out.sum().backward()
    return out.detach(), [a.grad for a in args if a.requires_grad], graphs[0], graphs[1]


def eager(f, args):
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    torch.manual_seed(0)
    out = f(*args)
    out.sum().backward()
    return out.detach(), [a.grad for a in args if a.requires_grad]


def saved(fw: fx.GraphModule) -> list[fx.Node]:
    return list(fw.graph.output_node().args[0][1:])


def saved_kinds(fw: fx.GraphModule) -> list[str]:
    """What the forward saves, by producing op (names differ between the two)."""
    return sorted("placeholder" if n.op == "placeholder" else str(n.target) for n in saved(fw))


def check(testcase, f, args, **patch):
    """Compiled under ``patch`` equals eager; returns the forward graph."""
    out, grads, fw, _ = compile_and_run(aotgrad, f, args, **patch)
    e_out, e_grads = eager(f, args)
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(grads, e_grads)
    return fw


X = torch.randn(8, 16, requires_grad=True)
W = torch.randn(16, 16, requires_grad=True)


def chain(x):
    for _ in range(60):
        x = x.sin().cos()
    return x


def far_apart(x, w):
    u = x.sin()
    m = u.cos() @ w
    return u.exp() * m


def reduction(x):
    return (x * x.sum(1, keepdim=True)).cos()


# ---------------------------------------------------------------- the partitioner's options


class TestPartitionerOptions(unittest.TestCase):
    def test_cse(self):
        def f(x):
            return x.sin() * 2 + x.sin() * 2

        counts = {}
        for flag in (True, False):
            for lib in (aotgrad, __import__("functorch.compile").compile):
                fw = (check(self, f, [X], cse=flag) if lib is aotgrad else
                      compile_and_run(lib, f, [X], cse=flag)[2])
                counts[lib.__name__, flag] = sum(
                    1 for n in fw.graph.nodes if n.target is torch.ops.aten.sin.default)
        self.assertEqual(counts["aotgrad", True], 1)
        self.assertEqual(counts["aotgrad", False], 2)
        self.assertEqual(counts["aotgrad", True], counts["functorch.compile", True])
        self.assertEqual(counts["aotgrad", False], counts["functorch.compile", False])

    def test_cse_keeps_random_ops_apart(self):
        def f(x):
            return x * torch.rand_like(x) + x * torch.rand_like(x)

        fw = check(self, f, [X])
        self.assertEqual(sum(1 for n in fw.graph.nodes
                             if n.target is torch.ops.aten.rand_like.default), 2)

    def test_bans_as_torch(self):
        import functorch.compile as reference

        for f, option in ((reduction, "ban_recompute_reductions"),
                          (chain, "ban_recompute_long_fusible_chains")):
            kinds = {}
            for flag in (True, False):
                fw = check(self, f, [X], **{option: flag})
                kinds[flag] = saved_kinds(fw)
                ref = compile_and_run(reference, f, [X], **{option: flag})[2]
                self.assertEqual(kinds[flag], saved_kinds(ref), (option, flag))
            self.assertNotEqual(kinds[True], kinds[False], option)
            self.assertEqual(kinds[False], ["placeholder"], option)   # everything recomputed

    def test_ban_materialized_backward(self):
        def f(x, w):
            return (x @ w).sin() @ w

        on = saved_kinds(check(self, f, [X, W]))
        off = saved_kinds(check(self, f, [X, W], ban_recompute_materialized_backward=False))
        self.assertIn("aten.sin.default", on)      # the backward's matmul reads it
        self.assertNotIn("aten.sin.default", off)  # recomputed from mm

    def test_ban_used_far_apart(self):
        on = saved_kinds(check(self, far_apart, [X, W]))
        off = saved_kinds(check(self, far_apart, [X, W], ban_recompute_used_far_apart=False))
        self.assertIn("aten.exp.default", on)
        self.assertNotIn("aten.exp.default", off)

    def test_aggressive_recomputation(self):
        on = saved_kinds(check(self, far_apart, [X, W]))
        off = saved_kinds(check(self, far_apart, [X, W], aggressive_recomputation=True))
        self.assertIn("aten.exp.default", on)
        self.assertNotIn("aten.exp.default", off)

    def test_max_dist_from_bw(self):
        def f(x):
            return x.sin().exp().cos()

        self.assertEqual(saved_kinds(check(self, f, [X])), ["placeholder"])
        self.assertEqual(saved_kinds(check(self, f, [X], max_dist_from_bw=1)),
                         ["aten.exp.default", "placeholder"])

    def test_not_in_allowlist(self):
        def f(x):
            return x.cumsum(1).exp().sin()

        self.assertEqual(saved_kinds(check(self, f, [X])), ["aten.exp.default"])
        self.assertEqual(saved_kinds(check(self, f, [X], ban_recompute_not_in_allowlist=False)),
                         ["placeholder"])    # cumsum is recomputed: denylist mode

    def test_is_non_builtin_to_include(self):
        def f(x):
            return torch.ops.aotgrad_test.twice(x).exp().sin()

        off = saved_kinds(check(self, f, [X], ban_recompute_not_in_allowlist=False))
        on = saved_kinds(check(self, f, [X], ban_recompute_not_in_allowlist=False,
                               is_non_builtin_to_include=True))
        self.assertEqual(off, ["aten.exp.default"])
        self.assertEqual(on, ["placeholder"])

    def test_recompute_views(self):
        def f(x, w):
            return (x @ w).t().sin()

        def views(fw):
            return [n for n in saved(fw) if n.op == "call_function" and is_view_op(n.target)]

        self.assertTrue(views(check(self, f, [X, W])))
        self.assertFalse(views(check(self, f, [X, W], recompute_views=True)))

    def test_treat_parameters_as_free_to_save(self):
        import functorch.compile as reference

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(64))

            def forward(self, x):
                return x * (self.w > 0) + self.w * 2

        def dtypes(lib, free):
            cfg = config if lib is aotgrad else torch_config()
            graphs = []
            comp = lib.make_boxed_compiler(lambda gm, i: (graphs.append(gm), gm)[1])
            torch.manual_seed(0)
            m = M()
            compiled = lib.aot_module(m, comp, comp,
                                      partition_fn=lib.min_cut_rematerialization_partition)
            x = torch.randn(64, requires_grad=True)
            with cfg.patch(treat_parameters_as_free_to_save=free):
                out = compiled(x)
            out.sum().backward()
            x2 = x.detach().clone().requires_grad_(True)
            torch.manual_seed(0)
            m2 = M()
            m2(x2).sum().backward()
            torch.testing.assert_close(x.grad, x2.grad)
            torch.testing.assert_close(compiled.w.grad if hasattr(compiled, "w") else
                                       m.w.grad, m2.w.grad)
            return sorted(str(n.meta["val"].dtype) for n in saved(graphs[0]))

        self.assertEqual(dtypes(aotgrad, True), ["torch.float32"])    # w itself, for free
        self.assertEqual(dtypes(aotgrad, False), ["torch.bool"])      # w > 0: 1 byte a value
        self.assertEqual(dtypes(reference, False), ["torch.bool"])

    def test_runtime_estimator(self):
        from aotgrad.partition import configured_cost, recompute_cost

        seen = []

        def estimate(node):
            seen.append(node)
            return 1.0 if node.target is torch.ops.aten.mm.default else 1000.0

        def f(x, w):
            a = (x @ w).cumsum(1)
            return (a.sin() @ w).sum(0)

        self.assertIs(configured_cost(), recompute_cost)
        with config.patch(activation_memory_budget_runtime_estimator="testing"):
            self.assertEqual(configured_cost()(None), 1)
        check(self, f, [X, W], activation_memory_budget=0.3,
              activation_memory_budget_runtime_estimator=estimate)
        self.assertTrue(seen)
        with self.assertRaisesRegex(ValueError, "runtime_estimator"), \
                config.patch(activation_memory_budget_runtime_estimator="nonsense"):
            configured_cost()

    def test_joint_custom_pass(self):
        import functorch.compile as reference

        calls = []

        def double_to_add(gm, joint_inputs):
            calls.append(len(joint_inputs))
            for n in list(gm.graph.nodes):
                if n.target is torch.ops.aten.mul.Tensor and n.args[1] == 2:
                    with gm.graph.inserting_before(n):
                        add = gm.graph.call_function(torch.ops.aten.add.Tensor,
                                                     (n.args[0], n.args[0]))
                    add.meta = dict(n.meta)
                    n.replace_all_uses_with(add)
                    gm.graph.erase_node(n)
            gm.recompile()
            return gm

        def f(x):
            return (x * 2).sin()

        for lib in (aotgrad, reference):
            calls.clear()
            if lib is aotgrad:
                fw = check(self, f, [X], joint_custom_pass=double_to_add)
            else:
                fw = compile_and_run(lib, f, [X], joint_custom_pass=double_to_add)[2]
            self.assertEqual(calls, [2])   # (primals, tangents)
            targets = {n.target for n in fw.graph.nodes}
            self.assertIn(torch.ops.aten.add.Tensor, targets)
            self.assertNotIn(torch.ops.aten.mul.Tensor, targets)

    def test_functionalize_rng_ops(self):
        def f(x):
            return (x * torch.rand_like(x)).sin()

        def rand_saved(fw):
            return [n for n in saved(fw) if n.target is torch.ops.aten.rand_like.default]

        plain = check(self, f, [X])
        self.assertTrue(rand_saved(plain))           # never recomputed by default
        replayed = check(self, f, [X], functionalize_rng_ops=True)
        self.assertFalse(rand_saved(replayed))        # recomputed from the saved RNG state
        self.assertIn("run_and_save_rng_state", replayed.code)
        # the generator after forward and backward is where eager leaves it
        torch.manual_seed(1)
        f(X.detach()).sum()
        after_eager = torch.rand(3)
        g = aotgrad.aot_function(f, aotgrad.nop,
                                 partition_fn=aotgrad.min_cut_rematerialization_partition)
        with config.patch(functionalize_rng_ops=True):
            x = X.detach().clone().requires_grad_(True)
            g(x)
            torch.manual_seed(1)
            g(x).sum().backward()
        torch.testing.assert_close(torch.rand(3), after_eager)

    def test_collectives_recomputed_only_when_allowed(self):
        from aotgrad.partition import is_random_or_mutating

        graph = fx.Graph()
        x = graph.placeholder("x")
        op = torch.ops._c10d_functional.all_reduce.default
        node = graph.call_function(op, (x, "sum", "0"))
        self.assertTrue(is_random_or_mutating(node))
        with config.patch(unsafe_allow_optimization_of_collectives=True):
            self.assertFalse(is_random_or_mutating(node))


# ---------------------------------------------------------------- the cache's options


class Small(torch.nn.Module):
    def forward(self, x):
        return ((x * 2).relu(),)


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def graph_named(name: str) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder(name)
    y = graph.call_function(torch.mul, (x, 2))
    graph.output((graph.call_function(torch.relu, (y,)),))
    return fx.GraphModule(torch.nn.Module(), graph)


class TestCacheOptions(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.patch = config.patch(enable_autograd_cache=True, cache_dir=self.tmp.name)
        self.patch.__enter__()
        aotgrad.AOTAutogradCache.clear()
        counters.clear()

    def tearDown(self):
        aotgrad.AOTAutogradCache.clear()
        self.patch.__exit__(None, None, None)
        self.tmp.cleanup()

    def run_gm(self, gm):
        x = torch.randn(3, requires_grad=True)
        out = aotgrad.aot_module_simplified(gm, [x], aotgrad.nop)(x)[0]
        torch.testing.assert_close(out, torch.relu(x * 2))
        out.sum().backward()
        torch.testing.assert_close(x.grad, (x > 0).float() * 2)

    def test_strict_autograd_cache(self):
        from aotgrad.cache import BypassAOTAutogradCache

        gm = fx.symbolic_trace(Small())
        x = torch.randn(3)
        aotgrad.aot_module_simplified(gm, [x], lambda g, i: g)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 1)
        with config.patch(strict_autograd_cache=True), \
                self.assertRaisesRegex(BypassAOTAutogradCache, "no stable identity"):
            aotgrad.aot_module_simplified(gm, [x], lambda g, i: g)

    def run_custom_function(self):
        torch._dynamo.reset()
        f = torch.compile(lambda x: Twice.apply(x).relu(), fullgraph=True,
                          backend=lambda gm, ex: aotgrad.aot_module_simplified(gm, ex, aotgrad.nop))
        x = torch.randn(3, requires_grad=True)
        out = f(x)
        torch.testing.assert_close(out, torch.relu(x * 2))
        out.sum().backward()
        torch.testing.assert_close(x.grad, (x > 0).float() * 2)

    def test_custom_autograd_functions(self):
        self.run_custom_function()     # dynamo's graph calls autograd_function_apply
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 1)
        with config.patch(autograd_cache_allow_custom_autograd_functions=True):
            self.run_custom_function()
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 1)
        self.assertEqual(counters["aot_autograd"]["autograd_cache_miss"], 1)

    def test_normalize_inputs(self):
        self.run_gm(graph_named("l_x_"))
        self.run_gm(graph_named("l_y_"))              # same program, other input name
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 1)
        counters.clear()
        with config.patch(autograd_cache_normalize_inputs=False):
            self.run_gm(graph_named("l_a_"))
            self.run_gm(graph_named("l_b_"))
        self.assertEqual(counters["aot_autograd"]["autograd_cache_hit"], 0)

    def test_joint_custom_pass_bypasses(self):
        with config.patch(joint_custom_pass=lambda gm, inputs: gm):
            self.run_gm(graph_named("x"))
        self.assertEqual(counters["aot_autograd"]["autograd_cache_bypass"], 1)


@torch.library.custom_op("aotgrad_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


_twice.register_autograd(lambda ctx, g: g * 2)


# ---------------------------------------------------------------- tangent strides


def _torch_aot_function():
    from functorch.compile import aot_function as torch_aot_function
    return torch_aot_function


def run_tangents(lib, fn, args, grads, as_given=False, **kwargs):
    """``fn`` compiled by ``lib`` (aotgrad or torch), run forward and backward
    with ``grads`` (None: that output gets no gradient) on copies of ``args``
    (``as_given``: on ``args``); returns the tangent placeholders' strides of
    the backward graph, the strides of the tangents the compiled backward
    received, and the inputs' gradients.  The backward compiler is not
    ``nop``: no tangent is passed on as it comes."""
    traced, received = [], []

    def bw(gm, example_inputs):
        tangents = [n for n in gm.graph.find_nodes(op="placeholder") if "tangents" in n.name]
        traced.append([tuple(n.meta["val"].stride()) for n in tangents])
        count = len(tangents)

        def run(args):
            received.append([tuple(a.stride()) for a in args[len(args) - count:]])
            return gm(*args)
        run._boxed_call = True
        return run

    aot = aotgrad.aot_function if lib is aotgrad else _torch_aot_function()
    f = aot(fn, aotgrad.nop if lib is aotgrad else _torch_nop(), bw, **kwargs)
    if not as_given:
        args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    outs = f(*args)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return traced[0], received[0], [a.grad for a in args if a.is_leaf and a.requires_grad]


def _torch_nop():
    from functorch.compile import nop
    return nop


def eager_grads(fn, args, grads):
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    outs = fn(*args)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [a.grad for a in args if a.requires_grad]


def gradients_like(shape):
    """A gradient of ``shape`` laid out contiguous, transposed and channels last."""
    g = torch.randn(shape)
    out = {"contiguous": g, "transposed": g.mT.contiguous().mT if g.dim() >= 2 else g}
    if g.dim() == 4:
        out["channels_last"] = g.contiguous(memory_format=torch.channels_last)
    return out


CONV_W = torch.randn(4, 3, 3, 3)
IMG = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
MAT = torch.randn(3, 4, requires_grad=True)

#: name -> (program, its inputs): outputs of other strides than contiguous
TANGENT_PROGRAMS = {
    "t": (lambda x: (x * 2).t(), [MAT]),
    "permute": (lambda x: (x * 2).reshape(3, 2, 2).permute(2, 0, 1), [MAT]),
    "slice_step": (lambda x: (x * 2)[:, ::2], [MAT]),
    "expand": (lambda x: x.sum(0).expand(3, 4), [MAT]),
    "conv_channels_last": (lambda x, w: torch.nn.functional.conv2d(x, w), [IMG, CONV_W]),
}


class TestTangentStrides(unittest.TestCase):
    """config.guess_tangent_strides_as_outputs (Note [Tangent strides])."""

    def test_placeholder_strides_as_torch(self):
        for guess in (True, False):
            for name, (fn, args) in TANGENT_PROGRAMS.items():
                shape = fn(*args).shape
                with self.subTest(guess=guess, program=name), \
                        config.patch(guess_tangent_strides_as_outputs=guess), \
                        torch_config().patch(guess_tangent_strides_as_outputs=guess):
                    mine, _, _ = run_tangents(aotgrad, fn, args, [torch.randn(shape)])
                    ref, _, _ = run_tangents(torch, fn, args, [torch.randn(shape)])
                    self.assertEqual(mine, ref)
        # what the option changes: the transposed output's tangent
        fn, args = TANGENT_PROGRAMS["t"]
        with config.patch(guess_tangent_strides_as_outputs=True):
            self.assertEqual(run_tangents(aotgrad, fn, args, [torch.randn(4, 3)])[0], [(1, 4)])
        with config.patch(guess_tangent_strides_as_outputs=False):
            self.assertEqual(run_tangents(aotgrad, fn, args, [torch.randn(4, 3)])[0], [(3, 1)])

    def test_gradients_given_in_the_traced_layout(self):
        for guess in (True, False):
            for name, (fn, args) in TANGENT_PROGRAMS.items():
                for how, g in gradients_like(fn(*args).shape).items():
                    with self.subTest(guess=guess, program=name, gradient=how), \
                            config.patch(guess_tangent_strides_as_outputs=guess), \
                            torch_config().patch(guess_tangent_strides_as_outputs=guess):
                        traced, received, grads = run_tangents(aotgrad, fn, args, [g])
                        _, ref_received, _ = run_tangents(torch, fn, args, [g])
                        self.assertEqual(received, traced)       # restrided when it must be
                        self.assertEqual(received, ref_received)
                        expected = eager_grads(fn, args, [g])
                        torch.testing.assert_close(grads, expected, rtol=0, atol=0)
                        self.assertEqual([x.stride() for x in grads],
                                         [x.stride() for x in expected])

    def test_mutated_input_and_several_outputs_as_torch(self):
        base = torch.randn(3, 4, requires_grad=True)

        def mutates(a):
            a.mul_(2)
            return a.sum()

        def two(x):
            return (x * 2).t(), x.sin()

        cases = [(mutates, lambda: [base.clone().t()], [torch.tensor(1.0)]),
                 (two, lambda: [MAT.detach().clone().requires_grad_()],
                  [torch.randn(4, 3), torch.randn(3, 4)])]
        for guess in (True, False):
            for fn, make, grads in cases:
                with self.subTest(guess=guess, program=fn.__name__), \
                        config.patch(guess_tangent_strides_as_outputs=guess), \
                        torch_config().patch(guess_tangent_strides_as_outputs=guess):
                    mine, _, _ = run_tangents(aotgrad, fn, make(), grads, as_given=True)
                    ref, _, _ = run_tangents(torch, fn, make(), grads, as_given=True)
                    self.assertEqual(mine, ref)

    def test_missing_gradient_is_zeros_in_the_traced_layout(self):
        def two(x):
            return (x * 2).t(), (x.cos() * 3).t()

        g = torch.randn(4, 3)
        for guess in (True, False):
            with self.subTest(guess=guess), config.patch(guess_tangent_strides_as_outputs=guess):
                traced, received, grads = run_tangents(aotgrad, two, [MAT], [g, None])
                self.assertEqual(received, traced)
                torch.testing.assert_close(grads, eager_grads(two, [MAT], [g, None]))

    def test_dynamic_and_subclass_outputs_as_torch(self):
        from torch.testing._internal.two_tensor import TwoTensor

        fn = TANGENT_PROGRAMS["t"][0]
        sub = TwoTensor(torch.randn(3, 4), torch.randn(3, 4)).requires_grad_()
        sub_grad = TwoTensor(torch.randn(4, 3), torch.randn(4, 3))
        for guess in (True, False):
            with config.patch(guess_tangent_strides_as_outputs=guess), \
                    torch_config().patch(guess_tangent_strides_as_outputs=guess):
                with self.subTest(guess=guess, case="dynamic"):
                    g = torch.randn(4, 3)
                    mine = run_tangents(aotgrad, fn, [MAT], [g], dynamic=True)
                    ref = run_tangents(torch, fn, [MAT], [g], dynamic=True)
                    self.assertEqual([str(s) for s in mine[0]], [str(s) for s in ref[0]])
                    self.assertEqual(mine[1], ref[1])
                    torch.testing.assert_close(mine[2], eager_grads(fn, [MAT], [g]))
                with self.subTest(guess=guess, case="subclass"):
                    mine = run_tangents(aotgrad, fn, [sub], [sub_grad])
                    ref = run_tangents(torch, fn, [sub], [sub_grad])
                    self.assertEqual(mine[:2], ref[:2])
                    expected = eager_grads(fn, [sub], [sub_grad])[0]
                    torch.testing.assert_close(mine[2][0].a, expected.a)
                    torch.testing.assert_close(mine[2][0].b, expected.b)


# ---------------------------------------------------------------- effect tokens


_EFFECT_CALLS: list[str] = []


@torch.library.custom_op("aotgrad_test::effect_two", mutates_args=())
def _effect_two(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _EFFECT_CALLS.append("two")
    return x + 1, x * 2


@_effect_two.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("aotgrad_test::effect_one", mutates_args=())
def _effect_one(x: torch.Tensor) -> torch.Tensor:
    _EFFECT_CALLS.append("one")
    return x - 1


@_effect_one.register_fake
def _(x):
    return torch.empty_like(x)


def _register_effects():
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
    for op in (torch.ops.aotgrad_test.effect_two.default,
               torch.ops.aotgrad_test.effect_one.default):
        _register_effectful_op(op, _EffectType.ORDERED)


_register_effects()


class Prints(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("b", torch.zeros(3))

    def forward(self, x):
        torch.ops.aten._print("hello")
        self.b.add_(1)
        y = (x * self.w).sum()
        torch.ops.aten._print("bye")
        return (y,)


class Inverts(torch.nn.Module):
    def forward(self, x):
        return (torch.linalg.inv(x),)


class CustomEffects(torch.nn.Module):
    def forward(self, x):
        a, b = torch.ops.aotgrad_test.effect_two(x)
        return (a + torch.ops.aotgrad_test.effect_one(b),)


class Linear(torch.nn.Module):
    def forward(self, x):
        torch.ops.aten._print("hello")
        return (torch.nn.functional.linear(x, x),)


def _export_both(mod, args, **kwargs):
    """aot_export_module by aotgrad and by torch: the graphs' code and the
    signatures' token names."""
    from torch._functorch.aot_autograd import aot_export_module as torch_export
    out = []
    for export in (aotgrad.aot_export_module, torch_export):
        gm, sig = export(mod, args, trace_joint=False, **kwargs)
        out.append((gm, gm.code, sig.input_tokens, sig.output_tokens))
    return out


class TestEffectTokens(unittest.TestCase):
    """config.unlift_effect_tokens (Note [Effect tokens in export], tokens.py)."""

    def test_export_module_as_torch(self):
        cases = [("prints", Prints(), [torch.randn(3)], {}),
                 ("linalg_check", Inverts(), [torch.randn(3, 3)], {}),
                 ("custom_op_results", CustomEffects(), [torch.randn(3)], {}),
                 ("pre_dispatch", Linear(), [torch.randn(3, 3)], {"pre_dispatch": True})]
        for unlift in (False, True):
            for name, mod, args, kwargs in cases:
                with self.subTest(unlift=unlift, program=name), \
                        config.patch(unlift_effect_tokens=unlift), \
                        torch_config().patch(unlift_effect_tokens=unlift):
                    (gm, code, ins, outs), (_, ref_code, ref_ins, ref_outs) = \
                        _export_both(mod, args, **kwargs)
                    self.assertEqual(code, ref_code)
                    self.assertEqual((ins, outs), (ref_ins, ref_outs))
                    self.assertEqual(len(ins), 0 if unlift else 1)
                    self.assertEqual(sum(n.target is torch.ops.prims._make_token.default
                                         for n in gm.graph.nodes), 1 if unlift else 0)

    def test_exported_graphs_run_their_effects(self):
        x = torch.randn(3)
        for unlift in (False, True):
            with self.subTest(unlift=unlift), config.patch(unlift_effect_tokens=unlift):
                gm, sig = aotgrad.aot_export_module(CustomEffects(), [x], trace_joint=False)
                tokens = [torch.empty(0)] * len(sig.input_tokens)
                _EFFECT_CALLS.clear()
                out = gm(*tokens, x)
                self.assertEqual(_EFFECT_CALLS, ["two", "one"])
                self.assertEqual(len(out), 1 + len(sig.output_tokens))
                torch.testing.assert_close(out[-1], CustomEffects()(x)[0])
                gm, sig = aotgrad.aot_export_module(Inverts(), [torch.randn(3, 3)],
                                                    trace_joint=False)
                tokens = [torch.empty(0)] * len(sig.input_tokens)
                with self.assertRaisesRegex(RuntimeError, "singular"):
                    gm(*tokens, torch.zeros(3, 3))      # the error check was kept

    def test_joint_exports_keep_tokens_lifted_as_torch(self):
        from torch._functorch.aot_autograd import aot_export_joint_simple as torch_joint

        def f(x):
            torch.ops.aten._print("hi")
            return (x.sin(),)

        for unlift in (False, True):
            for joint in (False, True):
                with self.subTest(unlift=unlift, joint=joint), \
                        config.patch(unlift_effect_tokens=unlift), \
                        torch_config().patch(unlift_effect_tokens=unlift):
                    x = torch.randn(3, requires_grad=joint)
                    mine = aotgrad.aot_export_joint_simple(f, [x], trace_joint=joint)
                    ref = torch_joint(f, [x], trace_joint=joint)
                    self.assertEqual(mine.code, ref.code)
                    lifted = "make_token" not in mine.code
                    self.assertEqual(lifted, joint or not unlift)

    def test_module_joint_signature(self):
        # torch 2.13 fails on this program (IndexError); aotgrad's signature
        # names the token as in the inference graph
        for unlift in (False, True):
            with self.subTest(unlift=unlift), config.patch(unlift_effect_tokens=unlift):
                gm, sig = aotgrad.aot_export_module(Prints(), [torch.randn(3)],
                                                    trace_joint=True, output_loss_index=0)
                placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
                outputs = [n.name for n in gm.graph.output_node().args[0]]
                if unlift:
                    self.assertEqual((sig.input_tokens, sig.output_tokens), ([], []))
                    self.assertEqual(placeholders, ["arg1_1", "arg2_1", "arg3_1"])
                else:
                    self.assertEqual(sig.input_tokens, ["arg0_1"])
                    self.assertEqual(sig.output_tokens, [outputs[0]])
                    self.assertEqual(placeholders[0], "arg0_1")
                self.assertEqual(sig.user_inputs, ["arg3_1"])
                self.assertEqual(sig.inputs_to_parameters, {"arg1_1": "w"})
                self.assertEqual(list(sig.backward_signature.gradients_to_parameters.values()),
                                 ["w"])

    def test_compiled_graphs_chain_effects_through_a_token_of_their_own(self):
        # Note [Effect tokens in compiled graphs] (tokens.py): under either
        # value of the option (export's), the graphs aot_function compiles
        # make their token and sink it: the calling convention is unchanged
        def f(x):
            torch.ops.aten._print("hi")
            return x.sin()

        for unlift in (False, True):
            with self.subTest(unlift=unlift), config.patch(unlift_effect_tokens=unlift):
                graphs = []
                comp = aotgrad.make_boxed_compiler(lambda gm, i: (graphs.append(gm), gm)[1])
                x = torch.randn(3, requires_grad=True)
                aotgrad.aot_function(f, comp, comp)(x).sum().backward()
                fw = graphs[0].graph
                targets = [n.target for n in fw.nodes]
                self.assertNotIn(torch.ops.aten._print.default, targets)
                (effect,) = fw.find_nodes(op="call_function",
                                          target=torch.ops.higher_order.with_effects)
                self.assertIs(effect.args[1], torch.ops.aten._print.default)
                self.assertIs(effect.args[0].target, torch.ops.prims._make_token.default)
                self.assertIn(torch.ops.prims._sink_tokens.default, targets)
                self.assertEqual([n.name for n in fw.find_nodes(op="placeholder")],
                                 ["primals_1"])
                torch.testing.assert_close(x.grad, x.detach().cos())

if __name__ == "__main__":
    unittest.main()
