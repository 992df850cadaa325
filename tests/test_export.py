"""Export: the graphs and signatures users get from the aot_export_* helpers."""

import unittest

import torch
import torch.nn as nn
from expecttest import TestCase

from aotgrad import aot_export_function, aot_export_joint_simple, aot_export_module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x):
        y = self.lin(x) + self.offset
        return y.square().sum(), y


class TestExportModule(TestCase):
    def test_inference_graph_and_signature(self):
        m = Net()
        x = torch.randn(4, 3)
        gm, sig = aot_export_module(m, [x], trace_joint=False)
        self.assertEqual(sig.parameters, ["lin.weight", "lin.bias"])
        self.assertEqual(sig.buffers, ["offset"])
        self.assertEqual(sig.inputs_to_parameters, {"arg0_1": "lin.weight", "arg1_1": "lin.bias"})
        self.assertEqual(sig.inputs_to_buffers, {"arg2_1": "offset"})
        self.assertEqual(sig.user_inputs, ["arg3_1"])
        self.assertIsNone(sig.backward_signature)
        outs = gm(*m.parameters(), *m.buffers(), x)
        for a, b in zip(outs, m(x)):
            torch.testing.assert_close(a, b)

    def test_joint_graph_returns_loss_grads(self):
        m = Net()
        x = torch.randn(4, 3)
        gm, sig = aot_export_module(m, [x], trace_joint=True, output_loss_index=0)
        bs = sig.backward_signature
        self.assertEqual(sorted(bs.gradients_to_parameters.values()), ["lin.bias", "lin.weight"])
        self.assertEqual(bs.loss_output, sig.user_outputs[0])
        params = [p.detach() for p in m.parameters()]
        outs = gm(*params, *m.buffers(), x)
        names = [n.name for n in gm.graph.output_node().args[0]]
        loss, _ = m(x)
        loss.backward()
        torch.testing.assert_close(outs[0], loss)
        for name, fqn in bs.gradients_to_parameters.items():
            torch.testing.assert_close(outs[names.index(name)], m.get_parameter(fqn).grad)
        self.assertFalse(any(n.name.startswith("tangents") for n in gm.graph.nodes))

    def test_joint_needs_a_scalar_loss_index(self):
        with self.assertRaisesRegex(ValueError, "output_loss_index"):
            aot_export_module(Net(), [torch.randn(4, 3)], trace_joint=True)
        with self.assertRaisesRegex(ValueError, "not a scalar"):
            aot_export_module(Net(), [torch.randn(4, 3)], trace_joint=True, output_loss_index=1)


class TestExportJointSimple(TestCase):
    def test_joint(self):
        gm = aot_export_joint_simple(lambda a, b: (a * b,),
                                     [torch.randn(3, requires_grad=True), torch.randn(3)],
                                     trace_joint=True)
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, primals_1, primals_2, tangents_1):
    mul = torch.ops.aten.mul.Tensor(primals_1, primals_2);  primals_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(tangents_1, primals_2);  tangents_1 = primals_2 = None
    return (mul, mul_1, None)""")

    def test_inference(self):
        gm = aot_export_joint_simple(lambda a: (a.relu(),), [torch.randn(3)], trace_joint=False)
        x = torch.randn(3)
        torch.testing.assert_close(gm(x)[0], x.relu())

    def test_rejects_nested_outputs(self):
        with self.assertRaisesRegex(ValueError, "flat"):
            aot_export_joint_simple(lambda a: ((a.sin(), a * 2),), [torch.randn(3)], trace_joint=False)


class TestExportFunction(TestCase):
    def test_pytree_function(self):
        def f(d):
            return {"y": d["x"].exp() + d["z"]}
        args = ({"x": torch.randn(3), "z": torch.randn(3)},)
        gm, sig, in_spec, out_spec = aot_export_function(f, args)
        out = gm(args[0]["x"], args[0]["z"])
        from torch.utils._pytree import tree_unflatten
        torch.testing.assert_close(tree_unflatten(list(out), out_spec)["y"], f(*args)["y"])
        self.assertEqual(len(sig.inputs), 2)


if __name__ == "__main__":
    unittest.main()
