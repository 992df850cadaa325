"""A program mutates an input and returns a view of it: compiled vs eager
(values, the view's sizes / strides / offset, ``_base``, the shared version
counter, writes through the view, gradients).

Note [Views of an input mutated in the graph] and Note [Sizes in replay
plans] (views.py): with the mutation kept in the graph (torch.compile's
backends) the output is, in the graph, a view of the input's new value;
under dynamic shapes its sizes are computed in the graph.  Both used to
leave the output without a replay plan: dynamic shapes raised "the compiler
broke aliasing", static shapes rebuilt it with the analysis's offset and
strides, those of the functional value (silently wrong for an input with a
storage offset or gaps)."""

import pytest
import torch
from torch.testing import assert_close

import aotgrad
import aotgrad.backends as backends

VIEWS = {
    "slice": lambda x: x[1:],
    "flat": lambda x: x.view(-1),
    "cols": lambda x: x[:, :2],
    "t": lambda x: x.t(),
    "step": lambda x: x[::2],
    "select": lambda x: x[0],
    "diagonal": lambda x: x.diagonal(),
    "half": lambda x: x[: x.shape[0] // 2],           # a size computed in the graph
    "narrow": lambda x: x.narrow(0, 1, x.shape[0] - 1),
    "view_sizes": lambda x: x.view(x.shape[0], -1, 1),
}

# "flat" needs a contiguous input (as in eager)
INPUTS = ["plain", "offset", "gaps", "non_leaf"]


def make_input(kind, n):
    torch.manual_seed(n)
    if kind == "plain":
        return torch.randn(n, 3), None
    if kind == "offset":      # a view of a bigger tensor, at a storage offset
        return torch.randn(n + 1, 3)[1:], None
    if kind == "gaps":        # strides with gaps: the functional value's differ
        return torch.randn(n, 6)[:, ::2], None
    leaf = torch.randn(n, 3, requires_grad=True)
    return leaf * 1, leaf


def check(fn, compiled, kind, sizes=(4, 6)):
    for n in sizes:
        (xe, le), (xc, lc) = make_input(kind, n), make_input(kind, n)
        try:
            oe = fn(xe)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                compiled(xc)
            continue
        oc = compiled(xc)
        assert_close(oc, oe, rtol=0, atol=0)
        assert_close(xc, xe, rtol=0, atol=0)
        assert (oc.shape, oc.stride(), oc.storage_offset()) == \
            (oe.shape, oe.stride(), oe.storage_offset())
        assert oc._is_view() == oe._is_view()
        assert oc.untyped_storage().data_ptr() == xc.untyped_storage().data_ptr()
        assert (oc._base is xc or oc._base is xc._base) == (oe._base is xe or oe._base is xe._base)
        assert oc.requires_grad == oe.requires_grad
        if le is not None:
            w = torch.linspace(0.5, 1.5, oe.numel()).view_as(oe)
            (oe * w).sum().backward()
            (oc * w).sum().backward()
            assert_close(lc.grad, le.grad)
        with torch.no_grad():   # the view shares the input's memory and version counter
            version = xc._version
            oc.mul_(2)
            oe.mul_(2)
        assert xc._version > version
        assert_close(xc, xe, rtol=0, atol=0)


def mutate_then(view):
    def f(x):
        x.add_(1)
        return view(x)
    return f


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("keep", [True, False], ids=["kept_in_graph", "written_back"])
def test_aot_function_dynamic(view, kind, keep):
    f = mutate_then(VIEWS[view])
    compiled = aotgrad.aot_function(f, aotgrad.nop, dynamic=True,
                                    keep_inference_input_mutations=keep)
    check(f, compiled, kind)


@pytest.mark.parametrize("kind", ["offset", "gaps"])
@pytest.mark.parametrize("view", ["slice", "cols", "t", "select"])
def test_aot_function_static_kept_in_graph(view, kind):
    """Static shapes: used to be rebuilt with the functional value's layout."""
    f = mutate_then(VIEWS[view])
    compiled = aotgrad.aot_function(f, aotgrad.nop, keep_inference_input_mutations=True)
    check(f, compiled, kind, sizes=(4,))


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("view", ["slice", "flat", "cols", "half", "view_sizes"])
def test_torch_compile_aot_eager_dynamic(view, kind):
    torch._dynamo.reset()
    f = mutate_then(VIEWS[view])
    check(f, torch.compile(f, backend=backends.aot_eager, dynamic=True), kind)


def test_torch_compile_view_taken_before_two_mutations():
    def f(x):
        v = x[1:]
        x.add_(1)
        x[0].mul_(3)
        return v

    torch._dynamo.reset()
    for kind in INPUTS:
        check(f, torch.compile(f, backend=backends.aot_eager, dynamic=True), kind)
