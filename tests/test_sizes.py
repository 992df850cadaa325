"""Sizes as outputs and as saved values (issue 17, point 9), against eager and
PyTorch's partitioners."""

import functools

import pytest
import torch

import aotgrad
from aotgrad import aot_function, default_partition, min_cut_rematerialization_partition, nop

PARTITIONERS = [default_partition, min_cut_rematerialization_partition]


@pytest.mark.parametrize("partition_fn", PARTITIONERS)
@pytest.mark.parametrize("how", ["static", "dynamic", "torch.compile"])
def test_forward_returning_a_size(partition_fn, how):
    def f(x):
        return x.sin() * 2, x.shape[0], x.shape[1] * 2

    if how == "torch.compile":
        torch._dynamo.reset()
        g = torch.compile(f, dynamic=True, fullgraph=True, backend=functools.partial(
            aotgrad.backends.aot_eager, partition_fn=partition_fn))
    else:
        g = aot_function(f, nop, partition_fn=partition_fn, dynamic=how == "dynamic")
    for rows in (4, 6):
        x = torch.randn(rows, 3, requires_grad=True)
        out, n, m = g(x)
        assert (n, m) == (rows, 6) and type(n) is int
        out.sum().backward()
        torch.testing.assert_close(x.grad, 2 * x.detach().cos())


@pytest.mark.parametrize("index", [0, 1])
def test_backward_keeps_sizes_not_the_tensor(index):
    # Note [Saving sizes, not tensors] (partition/plan.py): the backward of sum(dim=1)
    # needs only x's sizes; the forward saves them, as torch's partitioners do
    from functorch.compile import aot_function as torch_aot_function
    from functorch.compile import default_partition as torch_default
    from functorch.compile import min_cut_rematerialization_partition as torch_min_cut

    def saved_of(aot, partition_fn):
        graphs = {}

        def fw(gm, _):
            graphs["fw"] = gm
            return gm

        g = aot(lambda x: x.sum(dim=1), fw, lambda gm, _: gm, partition_fn=partition_fn,
                dynamic=True)
        x = torch.ones(10, 10, requires_grad=True)
        g(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(10, 10))
        return [str(n) for n in graphs["fw"].graph.output_node().args[0]]

    ours = saved_of(aot_function, PARTITIONERS[index])
    theirs = saved_of(torch_aot_function, (torch_default, torch_min_cut)[index])
    assert ours == theirs == ["sum_1", "sym_size_int", "sym_size_int_1"]
