"""Tensor subclasses: compiled behaves like eager; the graphs see plain tensors."""

import unittest

import torch
import torch.nn as nn
from expecttest import TestCase
from torch.testing._internal.custom_tensor import ConstantExtraMetadataTensor
from torch.testing._internal.two_tensor import TwoTensor, TwoTensorMode

import aotgrad
from aotgrad import aot_function, aot_module, nop
from aotgrad.subclass import flatten_all, layout_of
from helpers import GraphRecorder


def two(*shape, rg=True, seed=0, inner_rg=False):
    """A TwoTensor that requires grad itself (``inner_rg``: built from leaves
    that require grad, as TwoTensor(a, b) of two such leaves is)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    b = torch.randn(*shape, generator=g)
    if inner_rg:
        return TwoTensor(a.requires_grad_(rg), b.requires_grad_(rg))
    return TwoTensor(a, b).requires_grad_(rg)


def nested(*shape, seed=0):
    return TwoTensor(two(*shape, seed=seed), two(*shape, seed=seed + 1))


def custom(t, constant):
    out = ConstantExtraMetadataTensor(t)
    out.constant_attribute = constant
    return out


def copy_input(x):
    """A fresh copy of ``x`` with the same subclass tree and requires_grad."""
    if isinstance(x, ConstantExtraMetadataTensor):
        out = custom(copy_input(x.elem), x.constant_attribute)
    elif isinstance(x, TwoTensor):
        out = TwoTensor(copy_input(x.a), copy_input(x.b))
    else:
        out = x.detach().clone()
    return out.requires_grad_(x.requires_grad)


class SubclassTestCase(TestCase):
    def assert_same_tensor(self, got, want):
        self.assertEqual(type(got), type(want))
        self.assertEqual(layout_of(got) and layout_of(got).structure(),
                         layout_of(want) and layout_of(want).structure())
        for g, w in zip(flatten_all([got]), flatten_all([want])):
            torch.testing.assert_close(g, w)
        self.assertEqual(got.requires_grad, want.requires_grad)

    def check(self, fn, *inputs, compiled=None):
        """Run ``fn`` eagerly and compiled on copies of ``inputs``; compare
        outputs, input values after the call and gradients of the inputs."""
        compiled = compiled or aot_function(fn, nop)
        results = []
        for f in (fn, compiled):
            args = [copy_input(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            out = f(*args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            diff = [o for o in outs if o.requires_grad]
            if diff:  # each output gets a gradient of its own layout
                torch.autograd.backward(diff, [torch.ones_like(o) * (k + 1)
                                               for k, o in enumerate(diff)])
            results.append((outs, args, [x.grad for x in leaves]))
        (e_out, e_args, e_grads), (c_out, c_args, c_grads) = results
        for got, want in zip(c_out, e_out):
            self.assert_same_tensor(got, want)
        for got, want in zip(c_args, e_args):
            if isinstance(want, torch.Tensor):
                self.assert_same_tensor(got, want)
        for got, want in zip(c_grads, e_grads):
            self.assertEqual(got is None, want is None)
            if want is not None:
                self.assert_same_tensor(got, want)
        return compiled, c_out


class TestSubclassInputsAndOutputs(SubclassTestCase):
    def test_graphs_see_plain_tensors(self):
        rec = GraphRecorder()
        f = aot_function(lambda x, y: (x.sin() * y).sum(), rec)
        self.check(lambda x, y: (x.sin() * y).sum(), two(3), torch.randn(3), compiled=f)
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1, primals_2, primals_3):
    sin = torch.ops.aten.sin.default(primals_1)
    sin_1 = torch.ops.aten.sin.default(primals_2)
    mul = torch.ops.aten.mul.Tensor(sin, primals_3);  sin = None
    mul_1 = torch.ops.aten.mul.Tensor(sin_1, primals_3);  sin_1 = None
    sum_1 = torch.ops.aten.sum.default(mul);  mul = None
    sum_2 = torch.ops.aten.sum.default(mul_1);  mul_1 = None
    return (sum_1, sum_2, primals_1, primals_2, primals_3)""")
        for graph in rec.graphs["forward"] + rec.graphs["backward"]:
            for node in graph.graph.find_nodes(op="placeholder"):
                self.assertIs(type(node.meta["val"]), torch._subclasses.FakeTensor)

    def test_multiple_outputs_mixed_plain_and_subclass(self):
        self.check(lambda x, y: (x * y, y.cos(), x.a + x.b), two(2, 3), torch.randn(2, 3,
                                                                              requires_grad=True))

    def test_a_subclass_input_returned_as_it_is(self):
        # the generated forward assigned into a tuple of plain outputs (TypeError)
        _, (out, _) = self.check(lambda x, y: (x, x * y), two(3),
                                 torch.randn(3, requires_grad=True))
        self.assertIsInstance(out, TwoTensor)

    def test_inner_tensors_that_require_grad(self):
        # ops on the subclass are differentiated at the subclass level, as in eager
        self.check(lambda x: (x * 2).sin(), two(3, inner_rg=True))
        # reading an inner tensor that requires grad: eager would send it
        # gradient too, which cannot be compiled: a clear error
        with self.assertRaisesRegex(NotImplementedError, "inner tensor of a subclass input"):
            aot_function(lambda x: x.a + x.b, nop)(two(3, inner_rg=True))

    def test_nested_subclass(self):
        _, (out,) = self.check(lambda x: x.sin().cos(), nested(4))
        self.assertIsInstance(out.a, TwoTensor)

    def test_non_homogeneous_nesting(self):
        def f(x):
            return x.constant_attribute * x.elem * x.sin()

        x = custom(two(4), 6)
        _, (out,) = self.check(f, x)
        self.assertIsInstance(out, TwoTensor)
        self.assertIsInstance(out.a, ConstantExtraMetadataTensor)

    def test_inner_tensor_access_and_metadata(self):
        def f(x, y):
            return x * x.elem * x.elem.elem * x.elem.constant_attribute + y

        x = custom(custom(torch.ones(4), 6), 4).requires_grad_()
        self.check(f, x, nested(4))

    def test_subclass_made_inside_is_returned(self):
        def f(x, y):
            return TwoTensor(x.constant_attribute * x * y.a, x * y.a * y.b)

        self.check(f, custom(torch.ones(4), 5), two(4, rg=False))

    def test_subclass_tangent_reaches_backward(self):
        # the tangent of a subclass output is a subclass; its plain tensors
        # are the backward graph's tangents
        rec = GraphRecorder()
        f = aot_function(lambda x: x.exp(), nop, rec)
        x = two(3)
        out = f(x)
        out.backward(TwoTensor(torch.ones(3), torch.full((3,), 2.0)))
        torch.testing.assert_close(x.grad.a, x.a.exp())
        torch.testing.assert_close(x.grad.b, 2 * x.b.exp())
        tangents = [n for n in rec.last("backward").graph.find_nodes(op="placeholder")
                    if n.name.startswith("tangents")]
        self.assertEqual(len(tangents), 2)

    def test_tangent_with_other_layout_is_an_error(self):
        f = aot_function(lambda x: x.sin(), nop)
        out = f(two(4))
        with self.assertRaisesRegex(RuntimeError, "guessed its\nmetadata incorrectly"):
            (out + nested(4)).sum().backward()

    def test_inputs_made_under_two_tensor_mode(self):
        with TwoTensorMode():
            base = torch.ones(2, 3, requires_grad=True)
        x = base.add(1)[:, 1]
        self.assertIsInstance(x, TwoTensor)
        f = aot_function(lambda a: a * 3, nop)
        out = f(x)
        out.sum().backward()
        self.assertIsInstance(base.grad, TwoTensor)
        torch.testing.assert_close(base.grad.a, torch.tensor([[0., 3., 0.]] * 2))

    def test_no_grad_inference(self):
        with torch.no_grad():
            self.check(lambda x: x.sin() + 1, nested(3))

    def test_parameters_that_are_subclasses(self):
        torch.manual_seed(0)
        eager = nn.Linear(3, 2)
        compiled_mod = nn.Linear(3, 2)
        compiled_mod.load_state_dict(eager.state_dict())
        w = eager.weight.detach()
        for m in (eager, compiled_mod):
            m.weight = nn.Parameter(TwoTensor(w.clone(), w.clone() * 2))
        compiled = aot_module(compiled_mod, nop)
        x = torch.randn(5, 3)
        e = eager(TwoTensor(x, x))
        c = compiled(TwoTensor(x, x))
        self.assert_same_tensor(c, e)
        e.sum().backward()
        c.sum().backward()
        self.assert_same_tensor(compiled_mod.weight.grad, eager.weight.grad)
        self.assert_same_tensor(compiled_mod.bias.grad, eager.bias.grad)


class TestSubclassGuards(SubclassTestCase):
    def test_new_metadata_recompiles(self):
        rec = GraphRecorder()
        f = aot_function(lambda x: x * x.constant_attribute, rec)
        x3 = custom(torch.ones(2, requires_grad=True), 3)
        x5 = custom(torch.ones(2, requires_grad=True), 5)
        torch.testing.assert_close(f(x3).elem, torch.full((2,), 3.0))
        torch.testing.assert_close(f(x5).elem, torch.full((2,), 5.0))
        self.assertEqual(len(rec.graphs["forward"]), 2)

    def test_plain_and_subclass_calls_compile_separately(self):
        f = aot_function(lambda x: x.cos(), nop)
        self.assertIs(type(f(torch.ones(2))), torch.Tensor)
        self.assertIsInstance(f(two(2)), TwoTensor)


class TestSubclassMutation(SubclassTestCase):
    def test_data_mutation_of_subclass_input(self):
        def f(a):
            a.mul_(2)
            return a + 1

        with TwoTensorMode():
            base = torch.ones(2, 2, requires_grad=True)

        def run(fn):
            b = base.detach().clone().requires_grad_()
            inp = b.add(1)[:, 0]
            out = fn(inp)
            out.sum().backward()
            return out, inp, b.grad

        e_out, e_inp, e_grad = run(f)
        c_out, c_inp, c_grad = run(aot_function(f, nop))
        for got, want in ((c_out, e_out), (c_inp, e_inp), (c_grad, e_grad)):
            self.assert_same_tensor(got, want)

    def test_mutated_subclass_input_used_after_the_call(self):
        """README, ``disable_guess_zero_tangent_for_mutated_input_subclass``:
        the mutated input's tangent is traced as its output's subclass (no
        guess that it comes as plain zeros): a gradient reaching the mutated
        input after the call is eager's (torch's guess raises here)."""
        def f(x):
            x.mul_(2)
            return x + 1

        def run(fn):
            leaf = TwoTensor(torch.tensor([1., 2.]), torch.tensor([3., 4.])).requires_grad_()
            x = leaf * 1
            out = fn(x)
            (out.sum() + (x * x).sum()).backward()
            return leaf.grad

        self.assert_same_tensor(run(aot_function(f, nop)), run(f))

    def test_mutation_under_no_grad(self):
        def f(a, b):
            with torch.no_grad():
                a.add_(b)
            return a * b

        self.check(f, two(3, rg=False), two(3))

    def test_metadata_mutation_is_refused(self):
        def f(a):
            a.t_()
            return a * 2

        with self.assertRaisesRegex(RuntimeError, "Metadata mutations are currently not allowed "
                                                  "on tensor subclasses"):
            aot_function(f, nop)(two(2, 3, rg=False))

    def test_aliased_mutated_subclass_inputs_are_refused(self):
        def f(a, b):
            a.mul_(2)
            return a * b

        x = two(2, 2, rg=False)
        with self.assertRaisesRegex(RuntimeError, "Encountered aliased inputs that are mutated"):
            aot_function(f, nop)(x[0], x[0])


class TestTangentCoercion(SubclassTestCase):
    def test_a_gradient_that_coerces_itself_to_the_outputs_layout(self):
        # Note [Subclasses at the boundary]: a wrapper gradient at a TwoTensor
        # output becomes one by __coerce_same_metadata_as_tangent__, as torch's
        from functorch.compile import aot_function as torch_aot_function
        from functorch.compile import nop as torch_nop
        from torch.testing._internal.subclasses import WrapperSubclass

        def f(x):
            return (x * 2).sin()

        a = torch.randn(3, 4)
        grads = []
        for compiled in (aot_function(f, nop), torch_aot_function(f, torch_nop)):
            x = TwoTensor(a, a.clone()).requires_grad_()
            compiled(x).backward(WrapperSubclass(torch.full((3, 4), 0.5)))
            grads.append(x.grad)
        for g in grads:
            self.assertIs(type(g), TwoTensor)
            torch.testing.assert_close(g.a, (a * 2).cos())
            torch.testing.assert_close(g.b, (a * 2).cos())

    def test_a_gradient_that_cannot_be_coerced_is_refused_clearly(self):
        x = two(3, 4)
        out = aot_function(lambda x: (x * 2).sin(), nop)(x)
        with self.assertRaisesRegex(RuntimeError, "the gradient of output 0 is a plain tensor"):
            out.backward(torch.randn(3, 4))


class TestSubclassBackend(SubclassTestCase):
    def test_torch_compile_backend_with_subclass_inputs(self):
        torch._dynamo.reset()

        def f(x, y):
            return (x.sin() * y).cos()

        compiled = torch.compile(f, backend=aotgrad.backends.aot_eager, fullgraph=True)
        self.check(f, nested(4), torch.randn(4, requires_grad=True), compiled=compiled)


if __name__ == "__main__":
    unittest.main()
