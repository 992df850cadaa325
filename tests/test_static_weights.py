"""Note [Static weight shapes] (pipeline.py): ``config.static_weight_shapes``
with ``dynamic=True`` -- the parameters and buffers keep static sizes, the
other inputs get symbolic ones, as in torch's AOTAutograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import aotgrad
from aotgrad import config
from helpers import GraphRecorder


def placeholder_sizes(gm):
    return [tuple(p.meta["val"].shape) for p in gm.graph.find_nodes(op="placeholder")
            if isinstance(p.meta.get("val"), torch.Tensor)]


def is_static(shape) -> bool:
    return all(type(d) is int for d in shape)


@pytest.mark.parametrize("static", [True, False])
def test_weights_keep_static_sizes_under_dynamic(static):
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    rec = GraphRecorder()
    with config.patch(static_weight_shapes=static):
        compiled = aotgrad.aot_module(mod, rec, rec, dynamic=True)
        for batch in (3, 6, 2):
            x = torch.randn(batch, 4, requires_grad=True)
            got = compiled(x)
            want = mod(x)
            torch.testing.assert_close(got, want)
            g_got = torch.autograd.grad(got.sum(), [x, *mod.parameters()])
            g_want = torch.autograd.grad(want.sum(), [x, *mod.parameters()])
            torch.testing.assert_close(g_got, g_want)
    assert len(rec.graphs["forward"]) == 1          # one graph for every batch size
    sizes = placeholder_sizes(rec.graphs["forward"][0])
    weights, inputs = sizes[:4], sizes[4:]
    assert all(is_static(s) for s in weights) == static
    assert not is_static(inputs[0])


def test_other_weight_shapes_compile_again():
    """With static weight sizes the guard holds them: a weight of another
    shape (the same program, num_params_buffers=1) gets its own graph."""
    def f(w, x):
        return (x @ w).sin()

    rec = GraphRecorder()
    compiled = aotgrad.aot_function(f, rec, rec, dynamic=True, num_params_buffers=1)
    for rows, cols, batch in ((4, 3, 2), (4, 3, 5), (4, 6, 2), (5, 3, 2)):
        w = torch.randn(rows, cols, requires_grad=True)
        x = torch.randn(batch, rows)
        torch.testing.assert_close(compiled(w, x), f(w, x))
    assert len(rec.graphs["forward"]) == 3          # per weight shape, not per batch
