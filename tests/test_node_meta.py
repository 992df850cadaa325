"""Node metadata under torch.compile (issue 17, point 6): the user's line and
module on the forward and backward graph nodes, as PyTorch's backends keep them."""

import functools

import torch
import torch.nn as nn
from torch._dynamo.backends.common import aot_autograd

import aotgrad


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y.relu().sum()


def _graphs(backend_for):
    torch._dynamo.reset()
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm if backend_for is aot_autograd else aotgrad.nop(gm, example_inputs)
        return compiler

    torch.manual_seed(0)
    backend = backend_for(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    net = Net()
    x = torch.randn(2, 4, requires_grad=True)
    out = torch.compile(net, backend=backend)(x)
    out.backward()
    torch.testing.assert_close(out, Net.forward(net, x))
    return graphs


def _by_target(gm):
    """target -> (last line of its stack trace, module path of its module stack, backward?)"""
    found = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is torch.ops.aten.detach.default:
            continue
        stack = n.meta.get("stack_trace")
        modules = n.meta.get("nn_module_stack") or n.meta.get("fwd_nn_module_stack") or {}
        found.setdefault(n.target, (stack.strip().splitlines()[-2].strip() if stack else None,
                                    [path for path, _ in modules.values()],
                                    bool(n.meta.get("autograd_backward")),
                                    str(n.meta.get("original_aten"))))
    return found


def test_forward_and_backward_nodes_keep_the_users_lines():
    ours = _graphs(functools.partial(functools.partial, aotgrad.backends.aot_eager))
    theirs = _graphs(aot_autograd)
    for kind in ("fw", "bw"):
        mine, ref = _by_target(ours[kind]), _by_target(theirs[kind])
        assert mine and set(mine) <= set(ref), (kind, set(mine) - set(ref))
        for target, meta in mine.items():
            if not hasattr(torch.fx.traceback, "_mark_autograd_backward"):
                meta = (*meta[:2], False, *meta[3:])   # torch 2.11 marks no backward node
            assert meta == ref[target], (kind, target, meta, ref[target])
        assert any(meta[3] != "None" for meta in mine.values())  # original_aten is set
    # the lines are the program's: the linear layer's and the relu's
    lines = {line for line, *_ in _by_target(ours["bw"]).values()}
    assert "y = self.lin(x)" in lines and "return y.relu().sum()" in lines
    # each backward node knows the forward op it differentiates
    forward = {n.meta.get("seq_nr") for n in ours["fw"].graph.nodes if n.op == "call_function"}
    backward = [n for n in ours["bw"].graph.nodes if n.meta.get("autograd_backward")]
    assert backward and all(n.meta["seq_nr"] in forward for n in backward)


def test_no_metadata_work_outside_torch_compile():
    graphs = {}

    def keep(gm, example_inputs):
        graphs.setdefault("fw", gm)
        return gm

    aotgrad.aot_function(lambda x: x.sin().sum(), keep)(torch.randn(3, requires_grad=True))
    assert not any("seq_nr" in n.meta for n in graphs["fw"].graph.nodes)
