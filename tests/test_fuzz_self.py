"""Tests of the fuzzer itself (fuzz_programs.py): it passes what is right and
flags what is wrong.

* hand-written functional programs through the comparator must pass;
* deliberately broken "compiled" functions (a clone for a view, a skipped
  mutation, a detached output, a wrong gradient, a swallowed exception ...)
  must be flagged, each with the expected failure kind;
* the generator yields programs that render, load and run; the shrinker
  keeps a failure kind while it cuts a program down.
"""

import unittest
import warnings

import torch
from hypothesis import HealthCheck, given, settings

import fuzz_programs as fp
from fuzz_programs import InputSpec, Program, Step, check_program, compare


def inputs(*specs):
    """make_inputs for (shape, requires_grad, clone) triples: fresh, seeded."""
    def make_inputs():
        g = torch.Generator().manual_seed(0)
        leaves = [torch.randn(shape, generator=g, requires_grad=rg) for shape, rg, _ in specs]
        args = [leaf.clone() if rg and clone else leaf
                for leaf, (_, rg, clone) in zip(leaves, specs)]
        return leaves, args
    return make_inputs


X = ((2, 3), True, True)        # a non-leaf (clone of a leaf) that requires grad
Y = ((2, 3), False, True)       # a plain tensor
LEAF = ((2, 3), True, False)    # a leaf that requires grad, passed itself


class TestPasses(unittest.TestCase):
    """Programs that neither mutate their inputs nor return views of them."""

    def check(self, fn, make_inputs, **kw):
        result = compare(fn, make_inputs, **kw)
        self.assertTrue(result.ok, result.report())
        return result

    def test_pointwise(self):
        self.check(lambda a, b: (a * b + 1, a.sin(), b.relu()), inputs(X, Y))

    def test_output_is_an_input(self):
        self.check(lambda a, b: (a.mul(2), b, a), inputs(X, Y))

    def test_intermediate_mutated(self):
        def f(a):
            v = a.mul(2)
            v.add_(1)
            w = v.sin()
            w.mul_(2)
            return (w, v.cos())
        self.check(f, inputs(X))

    def test_under_no_grad(self):
        self.check(lambda a, b: (a.relu() + b, a.t().sin()), inputs(X, Y), grad_enabled=False)

    def test_no_input_requires_grad(self):
        self.check(lambda a, b: (a + b, (a * b).t().contiguous()), inputs(Y, Y))

    def test_eager_error_is_raised_alike(self):
        # eager raises (shapes do not broadcast): the compiled function must raise the same type
        result = self.check(lambda a, b: (a + b.t(),), inputs(X, Y))
        self.assertTrue(result.eager_raised)

    def test_rendered_program(self):
        program = Program(
            inputs=(InputSpec("a", (2, 3), True, True), InputSpec("b", (3,))),
            steps=(Step("v1 = a.mul(b)"), Step("v2 = v1.mul(3)"), Step("v2.add_(1)", no_grad=True),
                   Step("v3 = v2 + a")),
            outputs=("v3", "b", "v3"))
        result = check_program(program)
        self.assertTrue(result.ok, result.report())
        f, make_inputs = program.load()
        self.assertTrue(compare(f, make_inputs).ok)
        self.assertIn("with torch.no_grad():\n        v2.add_(1)", program.source())
        inference = Program(program.inputs, program.steps, program.outputs, grad_enabled=False)
        self.assertIn("# NOTE: f is called under torch.no_grad()", inference.source())
        self.assertIn("grad_enabled=False", inference.reproducer())
        self.assertTrue(check_program(inference).ok)


class Broken:
    """A hand-made 'compiled' function: right or wrong as the test says."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(self.calls, *args)


class TestFlags(unittest.TestCase):
    """Broken compiled functions: the comparator must say what is wrong."""

    def flagged(self, fn, broken, make_inputs, kind, **kw):
        result = compare(fn, make_inputs, compiled=broken, **kw)
        self.assertFalse(result.ok, "the comparator missed a broken compiled function")
        self.assertTrue(any(m.kind.startswith(kind) for m in result.mismatches), result.report())
        return result

    def test_clone_instead_of_view(self):
        self.flagged(lambda a: (a.view(6),), lambda a: (a.view(6).clone(),), inputs(Y),
                     "output N._is_view() differs")

    def test_clone_instead_of_view_of_intermediate(self):
        def f(a):
            v = a.mul(2)
            return (v, v.t())
        self.flagged(f, lambda a: (a.mul(2), a.mul(2).t()), inputs(X), "output N._base differs")

    def test_skipped_mutation(self):
        def f(a):
            a.mul_(2)
            return (a.sin(),)
        self.flagged(f, lambda a: ((a * 2).sin(),), inputs(X),
                     "input N after the call.value differs")

    def test_skipped_metadata_mutation(self):
        def f(a):
            a.t_()
            return (a.sin(),)
        self.flagged(f, lambda a: (a.t().sin(),), inputs(Y), "input N after the call.shape differs")

    def test_mutation_not_seen_by_autograd(self):
        # eager: the input's graph goes through mul_; broken: the copy hides it
        def f(a):
            a.mul_(3)
            return (a.sin(),)

        def broken(a):
            with torch.no_grad():
                a.mul_(3)
            return (a.sin(),)
        self.flagged(f, broken, inputs(X), "grad of leaf N differs")

    def test_detached_output(self):
        self.flagged(lambda a: (a.sin(),), lambda a: (a.sin().detach(),), inputs(X),
                     "output N.requires_grad differs")

    def test_wrong_gradient(self):
        class WrongSin(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.sin()

            @staticmethod
            def backward(ctx, g):
                return g  # should be g * cos(x)
        self.flagged(lambda a: (a.sin(),), lambda a: (WrongSin.apply(a),), inputs(X),
                     "grad of leaf N differs")

    def test_new_tensor_instead_of_the_input(self):
        self.flagged(lambda a: (a,), lambda a: (a.view_as(a),), inputs(Y), "output N identity differs")

    def test_distinct_outputs_instead_of_one(self):
        def f(a):
            v = a.mul(2)
            return (v, v)
        self.flagged(f, lambda a: (a.mul(2), a.mul(2)), inputs(X), "output N identity differs")

    def test_view_relationship_lost_after_output_mutation(self):
        # the values match at first; only mutating the output reveals the lost view
        self.flagged(lambda a: (a.unsqueeze(0),), lambda a: (a.clone().unsqueeze(0),), inputs(Y),
                     "input N after mutating the outputs.value differs")

    def test_swallowed_exception(self):
        def f(a):
            a.add_(1)  # a leaf that requires grad: eager raises
            return (a,)
        self.flagged(f, lambda a: (a + 1,), inputs(LEAF),
                     "forward: eager raises RuntimeError, compiled ok")

    def test_different_exception_type(self):
        def broken(a):
            raise NotImplementedError("not supported yet")
        result = self.flagged(lambda a: (a.sin(),), broken, inputs(X),
                              "forward: eager ok, compiled raises NotImplementedError: "
                              "not supported yet")
        self.assertIsNone(result.unsupported)
        allowed = compare(lambda a: (a.sin(),), inputs(X), compiled=broken, allow_unsupported=True)
        self.assertTrue(allowed.ok)
        self.assertEqual(allowed.unsupported, "not supported yet")

    def test_exception_type_must_match_exactly(self):
        def f(a, b):
            return (a + b.t(),)     # eager: RuntimeError

        def broken(a, b):
            raise NotImplementedError("a RuntimeError subclass is not the same type")
        self.flagged(f, broken, inputs(X, Y), "forward: eager raises RuntimeError, compiled raises "
                     "NotImplementedError: a RuntimeError subclass is not the same type")

    def test_in_place_on_output_forbidden(self):
        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g
        self.flagged(lambda a: (a.mul(2).view(6),), lambda a: (Identity.apply(a.mul(2)).view(6),),
                     inputs(X), "output N.add_(N): eager ok, compiled raises RuntimeError: "
                     "Output N of ")

    def test_only_the_cached_call_is_wrong(self):
        def f(a):
            return (a.sin(),)
        broken = Broken(lambda call, a: (a.sin() if call == 1 else a.cos(),))
        self.flagged(f, broken, inputs(X), "cached call: output N.value differs")
        self.assertEqual(broken.calls, 2)

    def test_tolerated_version_counter_error(self):
        # eager's backward raises (sin saved a, then a changed); a compiled function that
        # computes the gradient anyway is tolerated: noted, not flagged
        def f(a):
            v = a.sin()
            a.mul_(2)
            return (v,)

        result = compare(f, inputs(X), compiled=_version_free)
        self.assertTrue(result.ok, result.report())
        self.assertTrue(any("tolerated" in n for n in result.notes), result.report())


def _version_free(a):
    """f of test_tolerated_version_counter_error, with sin's input saved before the mutation."""
    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x.detach().clone())
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()
    v = Sin.apply(a)
    a.mul_(2)
    return (v,)


class TestGenerator(unittest.TestCase):
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fp.programs())
    def test_programs_render_load_and_run(self, program):
        self.assertGreaterEqual(len(program.inputs), 1)
        self.assertLessEqual(len(program.inputs), 3)
        self.assertTrue(1 <= len(program.outputs) <= 3)
        self.assertLessEqual(len(program.steps), 8)
        f, make_inputs = program.load()
        leaves, args = make_inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.set_grad_enabled(program.grad_enabled):
                try:
                    out = f(*args)
                except Exception:
                    return  # only the last step may raise (kept on purpose)
        self.assertIsInstance(out, tuple)
        self.assertTrue(all(isinstance(o, torch.Tensor) and o.numel() > 0 for o in out))
        compile(program.reproducer("a comment\nover two lines"), "<reproducer>", "exec")

    def test_shrink_keeps_the_kind(self):
        program = Program(
            inputs=(InputSpec("a", (2, 3), True, True), InputSpec("b", (3,)),
                    InputSpec("c", (3,), alias_of=0, view="[0]")),
            steps=(Step("v1 = a.mul(2)"), Step("a.t_()"), Step("v2 = b.sin()", no_grad=True),
                   Step("v3 = v1 + b")),
            outputs=("v3", "v2", "a"), grad_enabled=False)

        def check(p):
            kind = "t_" if any("t_()" in s.code for s in p.steps) and "a" in p.outputs else None
            return fp.Result([fp.Mismatch(kind, "")] if kind else [])
        small = fp.shrink(program, "t_", check)
        self.assertEqual(small.steps, (Step("a.t_()"),))
        self.assertEqual(small.outputs, ("a",))
        self.assertEqual([i.name for i in small.inputs], ["a"])
        self.assertTrue(small.grad_enabled)
        self.assertFalse(small.inputs[0].requires_grad)


if __name__ == "__main__":
    unittest.main()
