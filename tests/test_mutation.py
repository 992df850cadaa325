"""Input mutations, views and aliasing: compiled behaves exactly like eager."""

import pytest
import torch
import torch.nn as nn
from expecttest import TestCase

import aotgrad
from aotgrad import aot_function, aot_module, nop
from helpers import GraphRecorder


def run_both(fn, make_inputs, **aot_kwargs):
    """(eager outputs, eager inputs), (compiled outputs, compiled inputs) and the
    compiled function, on identical fresh inputs; gradients of all leaves too."""
    aot_kwargs.setdefault("fw_compiler", nop)
    compiled = aot_function(fn, **aot_kwargs)
    results = []
    for f in (fn, compiled):
        leaves, args = make_inputs()
        out = f(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if diff:
            sum((o * (k + 1)).sum() for k, o in enumerate(diff)).backward()
        results.append((outs, args, [leaf.grad for leaf in leaves]))
    return results, compiled


class MutationTestCase(TestCase):
    def assert_same(self, results):
        (e_out, e_in, e_grad), (c_out, c_in, c_grad) = results
        for a, b in zip(e_out, c_out):
            torch.testing.assert_close(b, a)
            self.assertEqual(a.requires_grad, b.requires_grad)
            self.assertEqual(a.is_leaf, b.is_leaf)
        for a, b in zip(e_in, c_in):
            torch.testing.assert_close(b, a)
            self.assertEqual((a.shape, a.stride()), (b.shape, b.stride()))
            self.assertEqual(a.requires_grad, b.requires_grad)
        for a, b in zip(e_grad, c_grad):
            self.assertEqual(a is None, b is None)
            if a is not None:
                torch.testing.assert_close(b, a)


def leaf_and_clone(*shape, rg=True):
    def make():
        leaf = torch.arange(float(torch.Size(shape).numel())).reshape(shape).requires_grad_(rg)
        return [leaf], [leaf.clone() if rg else leaf]
    return make


class TestDataMutation(MutationTestCase):
    def test_mutation_with_grad_and_graph(self):
        rec = GraphRecorder()
        results, _ = run_both(lambda a: (a.mul_(2), a * 3)[1], leaf_and_clone(3, 3),
                              fw_compiler=rec)
        self.assert_same(results)
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1):
    clone = torch.ops.aten.clone.default(primals_1);  primals_1 = None
    mul = torch.ops.aten.mul.Tensor(clone, 2);  clone = None
    mul_1 = torch.ops.aten.mul.Tensor(mul, 3)
    return (mul, mul_1)""")

    def test_later_use_backpropagates_through_compiled_op(self):
        def f(a):
            a.mul_(3)
            return a.sin().detach()
        grads = []
        for fn in (f, aot_function(f, nop)):
            leaf = torch.arange(3.0, requires_grad=True)
            a = leaf * 1
            fn(a)
            (a * a).sum().backward()  # a's history continues through the compiled op
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0])

    def test_mutation_under_no_grad_and_hidden_from_autograd(self):
        def f(a):
            with torch.no_grad():
                a.mul_(2)
            a.detach().add_(1)
            return a + 1
        self.assert_same(run_both(f, leaf_and_clone(4))[0])

    def test_input_without_grad_several_inputs_noncontiguous(self):
        def make():
            base = torch.arange(8.0).reshape(2, 4)
            return [], [base[:, ::2], torch.ones(2, 2), torch.ones(2, 2, requires_grad=True)]

        def f(a, b, c):
            a.add_(1)
            b.mul_(c)
            return a + b
        self.assert_same(run_both(f, make)[0])

    def test_mutated_input_returned(self):
        results, compiled = run_both(lambda a: a.mul_(2), leaf_and_clone(3))
        self.assert_same(results)
        _, args = leaf_and_clone(3)()
        self.assertIs(compiled(*args), args[0])

    def test_keep_inference_input_mutations(self):
        rec = GraphRecorder()
        f = aot_function(lambda a: a.mul_(2) + 1, rec, keep_inference_input_mutations=True)
        x = torch.ones(3)
        torch.testing.assert_close(f(x), torch.full((3,), 3.0))
        torch.testing.assert_close(x, torch.full((3,), 2.0))
        self.assertExpectedInline(rec.last("inference").code.strip(), """\
def forward(self, arg0_1):
    mul = torch.ops.aten.mul.Tensor(arg0_1, 2)
    add = torch.ops.aten.add.Tensor(mul, 1)
    copy_ = torch.ops.aten.copy_.default(arg0_1, mul);  arg0_1 = mul = copy_ = None
    return (add,)""")

    def test_leaf_requiring_grad_raises_like_eager(self):
        x = torch.ones(3, requires_grad=True)
        with self.assertRaisesRegex(RuntimeError, "leaf Variable that requires grad"):
            aot_function(lambda a: a.mul_(2), nop)(x)

    def test_detached_alias_of_a_leaf_may_be_written(self):
        # a.detach() shares a's storage but is no view of it: eager allows
        # writing it, also once it requires grad (fuzzer seed 15)
        def f(a):
            d = a.detach()
            d.add_(d * a)
            d.sin_()
            return a * 2

        def make():
            leaf = torch.arange(1.0, 7.0).reshape(3, 2).requires_grad_()
            return [leaf], [leaf]

        self.assert_same(run_both(f, make)[0])

    def test_forward_saves_a_copy_of_a_mutated_input(self):
        # Note [Saving mutated inputs]: the backward must see the value before
        # the write-back, so the forward saves a clone, never the input itself
        rec = GraphRecorder()
        def f(a, b):
            out = a.sin() * b   # min-cut recomputes sin(a) in the backward
            a.mul_(2)
            return out
        b = torch.full((3,), 2.0, requires_grad=True)
        a = torch.arange(3.0)
        compiled = aot_function(f, rec, partition_fn=aotgrad.min_cut_rematerialization_partition)
        compiled(a, b).sum().backward()
        torch.testing.assert_close(b.grad, torch.arange(3.0).sin())
        fw = rec.last("forward")
        saved = fw.graph.output_node().args[0][2:]
        self.assertFalse(any(n.op == "placeholder" for n in saved))


    def test_saved_item_of_a_split_of_a_mutated_input(self):
        # Note [Saving mutated inputs]: an item of a multi-output view
        # (split(a)[-1]) of an input is a view of it too, saved as a copy: the
        # runtime's write-back of a.squeeze_ (as_strided_) would modify it
        def f(a, w):
            a.squeeze_(0)
            return a.clone() * a.split(1)[-1] * w

        def make():
            leaf = torch.arange(1.0, 4.0).reshape(1, 3).requires_grad_()
            w = torch.full((3,), 0.5, requires_grad=True)
            return [leaf, w], [leaf.clone(), w]

        self.assert_same(run_both(f, make)[0])
        self.assert_same(run_both(f, make,
                                  partition_fn=aotgrad.min_cut_rematerialization_partition)[0])


    def test_mutated_input_with_gaps_keeps_its_layout(self):
        # the trace clones a mutated input that requires grad (Note [Clone
        # before mutation]); clone() would make a view with gaps contiguous,
        # and c.reshape(4) -- a copy in eager -- a view that sees the mul_:
        # wrong values and gradients, silently (fuzzer seed 14 hit it as a
        # no_grad-view error)
        def f(c):
            v = c.reshape(4)
            c.mul_(2)
            return v * 1, c + 1

        def make():
            leaf = torch.arange(6.0).reshape(2, 3).requires_grad_()
            return [leaf], [leaf.clone()[:, 1:]]

        self.assert_same(run_both(f, make)[0])
        self.assert_same(run_both(f, make,
                                  partition_fn=aotgrad.min_cut_rematerialization_partition)[0])


class TestMetadataMutation(MutationTestCase):
    def test_transpose_and_data(self):
        def f(a):
            a.t_()
            a[0].mul_(2)
            return a.view(a.shape)
        self.assert_same(run_both(f, leaf_and_clone(3, 3))[0])
        self.assert_same(run_both(f, leaf_and_clone(3, 3, rg=False))[0])

    def test_unsqueeze_squeeze(self):
        def f(a, b):
            a.unsqueeze_(0)
            b.squeeze_()
            return a + 1, b * 2
        def make():
            return [], [torch.ones(2, 3), torch.ones(1, 3)]
        self.assert_same(run_both(f, make)[0])


class TestSetAndResize(MutationTestCase):
    def test_set_under_no_grad(self):
        def f(a, b):
            with torch.no_grad():
                a.set_(b)
                b.mul_(2)
            return a + b
        def make():
            return [], [torch.ones(3, 3), torch.zeros(3, 3)]
        self.assert_same(run_both(f, make, keep_inference_input_mutations=True)[0])

    def test_set_with_visible_mutation_is_refused(self):
        def f(a, b):
            with torch.no_grad():
                a.set_(b)
            a.mul_(2)
            return a + b
        a, b = torch.ones(3, requires_grad=True) * 1, torch.ones(3, requires_grad=True) * 1
        with self.assertRaisesRegex(AssertionError, "other mutations that we cannot"):
            aot_function(f, nop)(a, b)


class TestOutputAliases(MutationTestCase):
    def test_view_of_input_is_a_view(self):
        rec = GraphRecorder()
        results, compiled = run_both(lambda a: a.view(-1), leaf_and_clone(2, 2), fw_compiler=rec)
        self.assert_same(results)
        _, args = leaf_and_clone(2, 2)()
        out = compiled(*args)
        self.assertIs(out._base, args[0])
        self.assertIn("ViewBackward", type(out.grad_fn).__name__)
        out.mul_(2)  # in place on the output changes the input, as in eager
        torch.testing.assert_close(args[0], torch.arange(4.0).reshape(2, 2) * 2)

    def test_views_of_intermediate_and_base(self):
        rec = GraphRecorder()
        def f(a):
            out = a * 3
            return out.view(-1), out, out.t()
        results, compiled = run_both(f, leaf_and_clone(2, 2), fw_compiler=rec)
        self.assert_same(results)
        _, args = leaf_and_clone(2, 2)()
        v, base, t = compiled(*args)
        self.assertIs(v._base, base)
        self.assertIs(t._base, base)
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1):
    mul = torch.ops.aten.mul.Tensor(primals_1, 3);  primals_1 = None
    view = torch.ops.aten.view.default(mul, [-1])
    t = torch.ops.aten.t.default(mul)
    return (view, mul, t)""")

    def test_views_of_unreturned_intermediate(self):
        rec = GraphRecorder()
        results, compiled = run_both(lambda a: ((a * 3).view(-1), (a * 3).view(-1)),
                                     leaf_and_clone(2, 2), fw_compiler=rec)
        self.assert_same(results)
        def g(a):
            out = a * 3
            return out.view(-1), out.t()
        results, compiled = run_both(g, leaf_and_clone(2, 2), fw_compiler=rec)
        self.assert_same(results)
        _, args = leaf_and_clone(2, 2)()
        v, t = compiled(*args)
        self.assertIs(v._base, t._base)   # both rebuilt from the intermediate base
        v.mul_(2)
        torch.testing.assert_close(t, (args[0] * 6).t())

    def test_detached_alias_written_with_grad_keeps_its_history(self):
        # d = t.detach(); d.mul_(c): d shares t's storage but its history is
        # its own (through c); rebuilt as an alias of the output t, it lost
        # requires_grad and so c's gradient through it (fuzzer seed 16)
        def f(b, c):
            t = b * 2
            d = t.detach()
            d.mul_(c)
            return t, d

        def make():
            g = torch.Generator().manual_seed(0)
            leaves = [torch.randn(2, 3, generator=g, requires_grad=True),
                      torch.randn(2, 3, generator=g, requires_grad=True)]
            return leaves, [leaves[0].clone(), leaves[1].clone()]

        self.assert_same(run_both(f, make)[0])

    def test_detached_alias_of_an_input_written_with_grad(self):
        # v = a.detach(); v.add_(b): v's history is its own (through b); as an
        # alias of the input it lost requires_grad and b's gradient.  It now
        # goes through the compiled Function (its storage is its own: writing
        # to it afterwards does not change a, a documented difference)
        def f(a, b):
            v = a.detach()
            v.add_(b)
            return v * 1, v

        def make():
            g = torch.Generator().manual_seed(0)
            leaves = [torch.randn(3, 2, generator=g, requires_grad=True),
                      torch.randn(3, 2, generator=g, requires_grad=True)]
            return leaves, [leaves[0], leaves[1].clone()]

        self.assert_same(run_both(f, make)[0])

    def test_lone_view_allows_in_place(self):
        x = torch.ones(3, 3, requires_grad=True)
        out = aot_function(lambda a: (a + 1).view(-1), nop)(x)
        out.mul_(2)
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3, 3), 2.0))

    def test_multi_output_view_of_input_forbids_in_place(self):
        f = aot_function(lambda a: list(a.unbind(0)), nop)
        out = f(torch.ones(3, 3, requires_grad=True).clone())
        self.assertTrue(all("CompiledFunctionBackward" in str(o.grad_fn) for o in out))
        with self.assertRaisesRegex(RuntimeError, "do not allow the output views"):
            out[0].mul_(2)

    def test_multi_output_view_of_an_input_detached_in_place(self):
        # a.detach_() makes the trace clone a first (trace.py _preparation):
        # the graph's unbind is of the clone, so the item is rebuilt from the
        # input itself -- it must alias it, as in eager
        def f(a, b):
            a.detach_()
            b.zero_()
            return a.unbind(0)[0]

        def make():
            leaves = [torch.arange(3.0).requires_grad_(), torch.ones(1, 3).requires_grad_()]
            return leaves, [leaves[0].clone(), leaves[1].clone()]

        (e_out, e_in, _), (c_out, c_in, _) = run_both(f, make)[0]
        self.assert_same(((e_out, e_in, []), (c_out, c_in, [])))
        self.assertIs(c_out[0]._base, c_in[0])
        c_out[0].add_(1)
        e_out[0].add_(1)
        torch.testing.assert_close(c_in[0], e_in[0])

    def test_detached_and_no_grad_outputs(self):
        def f(a):
            x = a + 1
            t = x.transpose(0, 1)
            with torch.no_grad():
                n = x.view(-1)
            return t.detach(), t, n
        self.assert_same(run_both(f, leaf_and_clone(2, 2))[0])


class TestAliasedInputs(MutationTestCase):
    def test_same_tensor_twice(self):
        def make():
            x = torch.ones(3, requires_grad=True)
            y = x * 1
            return [x], [y, y]
        self.assert_same(run_both(lambda a, b: a * b, make)[0])
        self.assert_same(run_both(lambda a, b: (a.mul_(2), a + b)[1], make)[0])

    def test_synthetic_base(self):
        def f(a, b):
            a.mul_(2)
            b.t_()
            return a.mul(b)
        for rg in (False, True):
            def make():
                base = torch.ones(2, 2, requires_grad=rg)
                x = base.add(1)
                return [base], [x[0], x[0]]
            self.assert_same(run_both(f, make)[0])

    def test_view_and_its_base(self):
        def f(a, b):
            b.add_(1)
            return a * 2
        def make():
            base = torch.arange(4.0).reshape(2, 2)
            return [], [base, base.t()]
        self.assert_same(run_both(f, make)[0])
        # a mutation kept in the graph must see the aliasing too
        self.assert_same(run_both(f, make, keep_inference_input_mutations=True)[0])

    def test_unmutated_inputs_may_share_storage(self):
        # the runtime's alias check: a clash among unmutated inputs keeps the
        # compiled program; only a mutated input's clash recompiles (rebased)
        def f(a, b, c):
            c.mul_(2)
            return a * b + c

        compiles = []

        def counting(gm, _):
            compiles.append(gm)
            return gm

        compiled = aot_function(f, counting)
        # storage offsets stay 0, 2, 0 (they are part of the guard)
        cases = [(lambda base, other: (base[:2], other[2:], torch.ones(2)), 1),  # distinct
                 (lambda base, other: (base[:2], base[2:], torch.ones(2)), 1),   # a, b share
                 (lambda base, other: (base[:2], other[2:], base[:2]), 2)]      # c is a
        for make, n in cases:
            e_bases, c_bases = [[torch.arange(4.0), torch.arange(4.0, 8.0)] for _ in range(2)]
            e_args, c_args = make(*e_bases), make(*c_bases)
            torch.testing.assert_close(compiled(*c_args), f(*e_args))
            torch.testing.assert_close((*c_bases, c_args[2]), (*e_bases, e_args[2]))
            self.assertEqual(len(compiles), n)

    def test_unrelated_aliases_are_refused_clearly(self):
        base = torch.arange(4.0)
        a, b = base[:3], base.detach()[1:]
        with self.assertRaisesRegex(RuntimeError, "not views of one common tensor"):
            aot_function(lambda a, b: a.add_(1) + b, nop)(a, b)

    def test_disjoint_aliases_need_no_synthetic_base(self):
        # Note [Only overlapping inputs are merged] (rebase.py): same storage,
        # no shared byte: one program, as for unaliased inputs, and torch's graph
        from functorch.compile import aot_function as torch_aot_function

        def f(a, b):
            a.add_(1)
            return a + b

        graphs = {"ours": [], "torch": []}
        for name, aot in (("ours", aot_function), ("torch", torch_aot_function)):
            g = aot(f, lambda gm, _, name=name: (graphs[name].append(gm.code), gm)[1],
                    lambda gm, _: gm)
            for make in (lambda x: (x[:2], x.detach()[2:]), lambda x: (x[:2], x[2:]),
                         lambda x: (torch.ones(2), torch.ones(2))):
                got_base, want_base = torch.arange(4.0), torch.arange(4.0)
                torch.testing.assert_close(g(*make(got_base)), f(*make(want_base)))
                torch.testing.assert_close(got_base, want_base)
        self.assertEqual(graphs["ours"][0], graphs["torch"][0])
        # no program of a synthetic base (its graph would take one input)
        self.assertTrue(all("arg1_1" in code for code in graphs["ours"]))

    def test_synthetic_base_graphs_read_as_torchs(self):
        from functorch.compile import aot_function as torch_aot_function

        def base(rg=True):
            return torch.ones(4, requires_grad=rg).add(1)

        cases = [
            (lambda a, b: (a.add_(1), a + b)[1], lambda x: [x[:2], x[1:3]]),
            (lambda a, b: (a.mul_(2), b.t_(), a.mul(b))[2],
             lambda x: [x.view(2, 2)[0], x.view(2, 2)[0]]),
            (lambda a, b, c, d: (b.add_(1), d.unsqueeze_(0), a + c + d)[2],
             lambda x: [x[:2], x[1:], x[1:3].detach().clone(), x[:2]]),
            (lambda u, a, b: (a.add_(1), u * 2 + a.sum() + b.sum())[1],
             lambda x: [torch.ones(2, requires_grad=True), x[:3], x[1:]]),
        ]
        for f, make in cases:
            texts, results = [], []
            for aot in (aot_function, torch_aot_function):
                graphs = []
                g = aot(f, lambda gm, _: (graphs.append(gm.code), gm)[1], lambda gm, _: gm)
                x = base()
                out = g(*make(x))
                results.append((out.detach(), x.detach().clone()))
                texts.append(graphs[-1])
            self.assertEqual(texts[0], texts[1])
            x = base()
            want = f(*make(x))
            torch.testing.assert_close(results[0][0], want.detach())
            torch.testing.assert_close(results[0][1], x.detach())


class TestModulesAndFunctions(MutationTestCase):
    def test_batchnorm_training_and_eval(self):
        torch.manual_seed(0)
        bn_ref = nn.BatchNorm1d(3)
        bn = nn.BatchNorm1d(3)
        compiled = aot_module(bn, nop)
        x = torch.randn(4, 3, requires_grad=True)
        for train in (True, False):
            bn.train(train)
            bn_ref.train(train)
            out, ref = compiled(x), bn_ref(x)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
            torch.testing.assert_close(bn.running_var, bn_ref.running_var)
            self.assertEqual(int(bn.num_batches_tracked), int(bn_ref.num_batches_tracked))

    def test_custom_function_returning_its_input(self):
        class Half(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x

            @staticmethod
            def backward(ctx, g):
                return g * 0.5

        results, _ = run_both(lambda a: Half.apply(a), leaf_and_clone(2, 2))
        self.assert_same(results)

    def test_custom_function_mutating_in_backward(self):
        class BwMutation(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                x.mul_(2)
                return grad.clone()

        def make():
            a = torch.ones(3, requires_grad=True)
            return [a], [a, torch.ones(3)]
        self.assert_same(run_both(lambda a, b: a * BwMutation.apply(b), make)[0])


class TestDebugAssert(TestCase):
    def test_checks_hold_on_mutating_programs(self):
        with aotgrad.config.patch(debug_assert=True):
            x = torch.ones(3)
            aot_function(lambda a: (a.mul_(2), a.view(-1))[1], nop)(x)
            torch.testing.assert_close(x, torch.full((3,), 2.0))


def test_overlapping_inputs_after_distinct_ones_with_dynamic_shapes():
    """Note [Aliased mutated inputs] under dynamic=True: a call whose mutated
    inputs overlap, after calls whose inputs did not, compiles its own program
    (the exception saying so escaped to the user from the shape-variant path)."""
    def f(x, y):
        x.add_(1)
        return x * y

    compiled = aot_function(f, nop, dynamic=True)
    compiled(torch.arange(4.0), torch.arange(4.0) + 10)
    for make in (lambda: (lambda t: (t, t))(torch.arange(4.0)),
                 lambda: (lambda b: (b[0:4], b[1:5]))(torch.arange(5.0)),
                 lambda: (lambda b: (b[0:3], b[2:5]))(torch.arange(5.0))):
        x, y = make()
        ex, ey = make()
        torch.testing.assert_close(compiled(x, y), f(ex, ey))
        torch.testing.assert_close((x, y), (ex, ey))


def test_an_in_place_op_whose_result_type_cannot_be_cast_raises_as_eager():
    """Eager refuses ``int_tensor.mul_(2.7)`` (the result is Float); torch's
    fake kernel of ``mul_`` does not, and the compiled call wrote the
    truncated product into the input (torch's AOTAutograd does too).  Both
    traces check: the light one (record.py) and under functionalization
    (``EagerChecks``, analyze.py)."""
    cases = [(lambda x: x.mul_(2.7), lambda: torch.arange(4)),
             (lambda x: x.__imul__(2.5), lambda: torch.arange(4)),
             (lambda x: x.mul_(1j), lambda: torch.arange(4.0)),
             (lambda x: x.mul_(2), lambda: torch.tensor([True, False])),
             (lambda x: x.mul_(torch.tensor(2.7)), lambda: torch.arange(4)),
             (lambda x: x[1:].mul_(2.7), lambda: torch.arange(4))]   # a view: functionalized
    for f, make in cases:
        with pytest.raises(RuntimeError, match="can't be cast to the desired output type"):
            f(make())
        x = make()
        with pytest.raises(RuntimeError, match="can't be cast to the desired output type"):
            aot_function(f, nop)(x)
        assert torch.equal(x, make())
