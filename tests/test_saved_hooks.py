"""Saved-tensor hooks: GraphModule hooks active at compile time are inlined
into the graphs; Python functions run at run time, as in eager (Note [Which
hooks are inlined], saved_hooks.py)."""

import unittest

import torch

import aotgrad
from helpers import GraphRecorder

calls = {"pack": 0, "unpack": 0}
contexts = []


@torch.fx.wrap
def _seen_by_pack(x):
    calls["pack"] += 1
    contexts.append(aotgrad.saved_tensor_hook_context())
    return x


@torch.fx.wrap
def _seen_by_unpack(x):
    calls["unpack"] += 1
    return x


class _Pack(torch.nn.Module):
    def forward(self, x):
        return _seen_by_pack(x).to(torch.float16)


class _Unpack(torch.nn.Module):
    def forward(self, x):
        return _seen_by_unpack(x).to(torch.float32)


# GraphModules, as torch.compile makes of hooks it traces: inlined
pack_fp16, unpack_fp16 = torch.fx.symbolic_trace(_Pack()), torch.fx.symbolic_trace(_Unpack())


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
        def floats_only(x, w):  # eager's fp16 cast of a saved index would break it
            return ((x @ w).relu() * x.sum()).sum()

        rec = GraphRecorder()
        f = aotgrad.aot_function(floats_only, rec)
        x, w, _ = inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            out = f(x, w)
        traced_calls = dict(calls)
        self.assertGreater(traced_calls["pack"], 0)
        out.backward()
        # at run time the hooks do not run again: they live in the graphs now
        self.assertEqual(calls, traced_calls)
        fw = rec.last("forward")
        saved = fw.graph.output_node().args[0][1:]
        self.assertTrue(saved)
        self.assertTrue(all(n.meta["val"].dtype == torch.float16 for n in saved))
        self.assertIn("torch.float32", rec.last("backward").code)

        x2, w2, _ = inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack_fp16, unpack_fp16):
            ref = floats_only(x2, w2)
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


class TestPythonHooksRunAtRunTime(unittest.TestCase):
    """Note [Which hooks are inlined]: Python functions as hooks run at every
    call on the tensors the compiled Function saves, as in eager (and in
    PyTorch's AOTAutograd).  They were traced into the graphs once: a hook
    keeping tensors aside (a handle returned, the tensor in a dict) then gave
    values of the trace, and saved inputs were skipped (x * x with an unpack
    that doubles: 2x where eager gives 4x)."""

    def run_with(self, make, f, hooks, x_values):
        grads, outs = [], []
        g = make(f)
        for v in x_values:
            x = torch.tensor(v, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                out = g(x)
            out.sum().backward()
            outs.append(out.detach())
            grads.append(x.grad)
        return outs, grads

    def test_values_and_calls_as_in_eager(self):
        store, counts = {}, {"pack": 0, "unpack": 0}

        def pack(t):                       # keeps the tensor aside, saves a handle
            counts["pack"] += 1
            store[len(store)] = t.clone()
            return len(store) - 1

        def unpack(k):
            counts["unpack"] += 1
            return store[k]

        def doubling_unpack(t):
            counts["unpack"] += 1
            return t * 2

        makers = {"eager": lambda f: f,
                  "aot_function": lambda f: aotgrad.aot_function(f, aotgrad.nop),
                  "torch.compile": lambda f: torch.compile(
                      f, backend=aotgrad.backends.aot_eager, fullgraph=True)}
        values = ([1.0, 2.0], [0.5, -1.0], [3.0, 0.25])
        def square(x):
            return x * x

        for f in (square, lambda x: x.exp().sin() * x):
            for hooks in ((pack, unpack), (lambda t: t, doubling_unpack)):
                want = self.run_with(makers["eager"], f, hooks, values)
                for name in ("aot_function", "torch.compile"):
                    torch._dynamo.reset()
                    counts.update(pack=0, unpack=0)
                    got = self.run_with(makers[name], f, hooks, values[:1])
                    first = dict(counts)
                    self.assertGreater(first["unpack"], 0, name)
                    got = self.run_with(makers[name], f, hooks, values)
                    self.assertEqual(counts["unpack"], 4 * first["unpack"], name)  # per call
                    # an unpack that is no inverse of the pack gives values that
                    # depend on what is saved; for x * x that is x, everywhere
                    if hooks[1] is unpack or f is square:
                        torch.testing.assert_close(got, want)

    def test_save_on_cpu_and_checkpoint_around_the_call(self):
        f = aotgrad.aot_function(lambda x, w: (x @ w).tanh().sum(), aotgrad.nop)
        x, w, _ = inputs()
        with torch.autograd.graph.save_on_cpu():
            f(x, w).backward()
        x2, w2, _ = inputs()
        torch.utils.checkpoint.checkpoint(f, x2, w2, use_reentrant=False).backward()
        x3, w3, _ = inputs()
        ((x3 @ w3).tanh().sum()).backward()
        for a in (x, x2):
            torch.testing.assert_close(a.grad, x3.grad)
        for a in (w, w2):
            torch.testing.assert_close(a.grad, w3.grad)
