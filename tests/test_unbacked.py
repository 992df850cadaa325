"""Unbacked sizes under torch.compile (issue 18, item 2): .item() under
capture_scalar_outputs, nonzero / masked_select / unique under
capture_dynamic_output_shape_ops, torch._check hints; forward and backward
through aotgrad's backends against eager."""

import pytest
import torch
import torch._dynamo.config as dynamo_config
from torch.testing import assert_close

from aotgrad import backends


def _checked(x):
    n = x.sum().int().item()
    torch._check(n >= 0)
    torch._check(n < 1000)
    return x * 2 + torch.ones(n).sum()


PROGRAMS = {
    "item": (lambda x: x * x.sum().item(), "capture_scalar_outputs"),
    "item_as_size": (lambda x: torch.zeros(int((x > 0).sum().item())).sum() + x.sum() * x,
                     "capture_scalar_outputs"),
    "check_hints": (lambda x: _checked(x.abs() * 3), "capture_scalar_outputs"),
    "nonzero": (lambda x: x[x.nonzero()[:, 0]] * 2, "capture_dynamic_output_shape_ops"),
    "masked_select": (lambda x: torch.masked_select(x, x > 0).sum() * x,
                      "capture_dynamic_output_shape_ops"),
    "unique": (lambda x: torch.unique(x.detach()).sum() + x, "capture_dynamic_output_shape_ops"),
}


@pytest.mark.parametrize("name,backend", [(n, "aot_eager") for n in sorted(PROGRAMS)] +
                         [("item", "inductor"), ("nonzero", "inductor")])  # compile time
def test_unbacked(name, backend):
    fn, flag = PROGRAMS[name]
    torch._dynamo.reset()
    with dynamo_config.patch(**{flag: True}):
        compiled = torch.compile(fn, backend=getattr(backends, backend), fullgraph=True)
        for seed in range(3):   # other values: other sizes, no recompilation needed
            torch.manual_seed(seed)
            x = torch.randn(6, requires_grad=True)
            out, ref = compiled(x), fn(x)
            assert_close(out, ref)
            g, = torch.autograd.grad(out.sum(), x)
            r, = torch.autograd.grad(ref.sum(), x)
            assert_close(g, r)
