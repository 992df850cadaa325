"""Dynamic shapes under torch.compile (issue 17, point 8): recompiles and
guards as with PyTorch's own aot_eager backend, values as eager's."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._guards import TracingContext

import aotgrad


def _frames(backend, marks: bool) -> int:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)

    @torch.compile(backend=counter)
    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    for n in (4, 5, 6, 7):
        x = torch.randn(n, 3, requires_grad=True)
        if marks:
            torch._dynamo.mark_dynamic(x, 0)
        out = f(x)
        out.sum().backward()
        torch.testing.assert_close(out, x.sin().cos())
        torch.testing.assert_close(x.grad, (-x.sin().sin() * x.cos()).detach())
    return counter.frame_count


@pytest.mark.parametrize("marks", [True, False])
def test_outputs_keep_their_dynamic_dims_across_a_graph_break(marks):
    # Note [Dynamic dims of outputs] (outputs.py): the first graph's output is
    # dynamic in dim 0; the graph after the break sees it so at once
    assert _frames(aotgrad.backends.aot_eager, marks) == _frames("aot_eager", marks)


def _guards(backend, model, make):
    torch._dynamo.reset()
    seen = {}

    def recording(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        seen["guards"] = sorted(str(g.expr) for g in TracingContext.get().fake_mode.shape_env.guards)
        return compiled

    f = torch.compile(model, backend=recording, dynamic=True)
    x = make()
    out = f(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))
    return seen["guards"]


CASES = {
    "layer_norm_gelu": (lambda: nn.Sequential(nn.LayerNorm(8), nn.GELU()),
                        lambda: torch.randn(3, 5, 8, requires_grad=True)),
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU()),
                lambda: torch.randn(2, 3, 9, 9, requires_grad=True)),
    "views": (lambda: (lambda x: torch.cat([x[:, :2], x[:, 2:] * 2], 1).view(-1, 2).sum(1)),
              lambda: torch.randn(6, 4, requires_grad=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_guards_beyond_torchs(name):
    # a float module attribute (LayerNorm's eps) is a 0-dim tensor input under
    # dynamic=True, read with .item(): its symbol must survive the primals' detach
    make_model, make_input = CASES[name]
    torch.manual_seed(0)
    model = make_model()
    ours = _guards(aotgrad.backends.aot_eager, model, make_input)
    theirs = _guards(torch._dynamo.backends.debugging.aot_eager, model, make_input)
    assert ours == theirs
