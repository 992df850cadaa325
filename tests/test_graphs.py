"""The forward and backward graphs read as expected (exact text)."""

import torch
import torch.nn as nn
from expecttest import TestCase

from aotgrad import aot_function, aot_module
from aotgrad.descriptors import DESC, Primal, Saved, Tangent, UserOutput
from helpers import GraphRecorder


def compile_and_run(fn, *args):
    rec = GraphRecorder()
    out = aot_function(fn, rec)(*args)
    return rec, out


class TestGraphText(TestCase):
    def test_sin_cos(self):
        rec, out = compile_and_run(lambda x: x.sin().cos(), torch.randn(3, requires_grad=True))
        out.sum().backward()
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1):
    sin = torch.ops.aten.sin.default(primals_1)
    cos = torch.ops.aten.cos.default(sin)
    return (cos, primals_1, sin)""")
        self.assertExpectedInline(rec.last("backward").code.strip(), """\
def forward(self, primals_1, sin, tangents_1):
    sin_1 = torch.ops.aten.sin.default(sin);  sin = None
    neg = torch.ops.aten.neg.default(sin_1);  sin_1 = None
    mul = torch.ops.aten.mul.Tensor(tangents_1, neg);  tangents_1 = neg = None
    cos_1 = torch.ops.aten.cos.default(primals_1);  primals_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(mul, cos_1);  mul = cos_1 = None
    return (mul_1,)""")

    def test_mul_with_input_not_requiring_grad(self):
        rec, out = compile_and_run(lambda a, b: a * b,
                                   torch.randn(3, requires_grad=True), torch.randn(3))
        out.sum().backward()
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1, primals_2):
    mul = torch.ops.aten.mul.Tensor(primals_1, primals_2);  primals_1 = None
    return (mul, primals_2)""")
        self.assertExpectedInline(rec.last("backward").code.strip(), """\
def forward(self, primals_2, tangents_1):
    mul_1 = torch.ops.aten.mul.Tensor(tangents_1, primals_2);  tangents_1 = primals_2 = None
    return (mul_1, None)""")

    def test_linear_module(self):
        rec = GraphRecorder()
        torch.manual_seed(0)
        out = aot_module(nn.Linear(3, 3), rec)(torch.ones(3, 3, requires_grad=True))
        out.sum().backward()
        self.assertExpectedInline(rec.last("forward").code.strip(), """\
def forward(self, primals_1, primals_2, primals_3):
    t = torch.ops.aten.t.default(primals_1);  primals_1 = None
    addmm = torch.ops.aten.addmm.default(primals_2, primals_3, t);  primals_2 = None
    return (addmm, primals_3, t)""")

    def test_inference_graph(self):
        rec, _ = compile_and_run(lambda a, b: (a @ b).relu(), torch.randn(2, 3), torch.randn(3, 2))
        self.assertExpectedInline(rec.last("inference").code.strip(), """\
def forward(self, arg0_1, arg1_1):
    mm = torch.ops.aten.mm.default(arg0_1, arg1_1);  arg0_1 = arg1_1 = None
    relu = torch.ops.aten.relu.default(mm);  mm = None
    return (relu,)""")


class TestDescriptors(TestCase):
    def test_roles_on_placeholders_and_outputs(self):
        rec, out = compile_and_run(lambda a, b: (a * b).exp(), torch.randn(3, requires_grad=True),
                                   torch.randn(3, requires_grad=True))
        fw, bw = rec.last("forward"), rec.last("backward")
        self.assertEqual([n.meta[DESC] for n in fw.graph.find_nodes(op="placeholder")],
                         [Primal(0), Primal(1)])
        fw_out = fw.graph.output_node().meta[DESC]
        self.assertEqual(fw_out[0], UserOutput(0))
        self.assertTrue(all(isinstance(d, Saved) for d in fw_out[1:]))
        bw_descs = [n.meta[DESC] for n in bw.graph.find_nodes(op="placeholder")]
        self.assertEqual(bw_descs[-1], Tangent(0))
        self.assertEqual([d.name for d in bw_descs[:-1]], [d.name for d in fw_out[1:]])

    def test_saved_symints_come_last_in_forward_first_in_backward(self):
        rec = GraphRecorder()
        f = aot_function(lambda x: x.view(-1).sin() * x.shape[0], rec, dynamic=True)
        x = torch.randn(4, 3, requires_grad=True)
        f(x).sum().backward()
        torch.testing.assert_close(x.grad, x.detach().view(-1).cos().view(4, 3) * 4)
        fw, bw = rec.last("forward"), rec.last("backward")
        from aotgrad._torch import is_sym_node
        fw_outs = fw.graph.output_node().args[0]
        kinds = [is_sym_node(n) for n in fw_outs[1:]]
        self.assertIn(True, kinds)
        self.assertEqual(kinds, sorted(kinds))  # tensors, then symints
        bw_in = [is_sym_node(n) for n in bw.graph.find_nodes(op="placeholder")]
        self.assertEqual(bw_in, sorted(bw_in, reverse=True))  # symints first


class TestNodes(TestCase):
    def test_add_node_makes_the_node_create_node_makes(self):
        # _torch.add_node sets the arguments after creating the node (torch
        # 2.13's create_node walks them first): same graph, same uses
        from aotgrad import _torch

        def build(make):
            g = torch.fx.Graph()
            x, y = g.placeholder("x"), g.placeholder("y")
            a = make(g, torch.ops.aten.mul.Tensor, (x, y), {}, "mul")
            b = make(g, torch.ops.aten.sum.dim_IntList, (a, [0]), {"keepdim": True}, "sum")
            c = make(g, torch.ops.aten.add.Tensor, (b, a), {"alpha": 2}, "add")
            g.output((c, a))
            return g

        made = build(lambda g, t, args, kwargs, name:
                     _torch.add_node(g, "call_function", t, args, kwargs, name))
        created = build(lambda g, t, args, kwargs, name:
                        g.create_node("call_function", t, args, kwargs, name))
        made.lint()
        self.assertEqual(str(made), str(created))
        self.assertEqual([sorted(u.name for u in n.users) for n in made.nodes],
                         [sorted(u.name for u in n.users) for n in created.nodes])
        self.assertEqual([[a.name for a in n.all_input_nodes] for n in made.nodes],
                         [[a.name for a in n.all_input_nodes] for n in created.nodes])


class TestChecker(TestCase):
    def test_lint_runs_under_debug_assert(self):
        # Note [Graph invariants]: FX's lint only under debug_assert; the rest always
        import aotgrad
        from aotgrad.check import check_graph

        g = torch.fx.Graph()
        x = g.placeholder("x")
        x.meta[DESC] = Primal(0)
        y = g.call_function(torch.ops.aten.neg.default, (x,))
        z = g.call_function(torch.ops.aten.neg.default, (y,))
        g.output((z,))
        y.prepend(z)  # z now reads y before y is computed
        gm = torch.fx.GraphModule(torch.nn.Module(), g)
        check_graph(gm)  # not linted
        with aotgrad.config.patch(debug_assert=True):
            with self.assertRaisesRegex(RuntimeError, "used before|topolog"):
                check_graph(gm)
        x.meta.pop(DESC)
        with self.assertRaisesRegex(AssertionError, "role descriptor"):
            check_graph(gm)
