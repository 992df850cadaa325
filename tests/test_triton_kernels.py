"""User Triton kernels (issue 18, item 1: ``triton_kernel_wrapper_mutation``)
through aot_function and both torch.compile backends, against eager.

Under tracing a kernel launch is the higher-order op
``triton_kernel_wrapper_mutation`` (dynamo makes it of ``kernel[grid](...)``,
``torch.library.wrap_triton`` outside dynamo).  aotgrad traces it as torch's
tracer does (Note [Higher-order operators], hops.py): the light tracer
refuses it, make_fx traces it; torch's rule for FunctionalTensorMode turns
it into ``triton_kernel_wrapper_functional``, which clones the tensors the
kernel writes (found by analysing the kernel's TTIR) and returns them, and
the mutation becomes one of the program's (written back to an input, or
hidden from autograd); torch's fake rule gives the clones' metadata.  A
``torch.library.triton_op`` is decomposed into its kernels under
functionalization (Note [Functional already], trace.py), as torch's
AOTAutograd shows them to inductor.

The kernels need CUDA and triton (the tests skip without them).  The
first tests run everywhere: a Python stand-in for a kernel, registered in
torch's kernel table, exercises the same tracing path (its TTIR cannot be
analysed, so torch takes every tensor argument as written).
"""

import logging
import operator

import pytest
import torch
from torch.testing import assert_close

import aotgrad
from aotgrad import backends

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines
    triton = None

from torch._higher_order_ops.triton_kernel_wrap import (kernel_side_table,
                                                        triton_kernel_wrapper_mutation)

FUNCTIONAL = torch.ops.higher_order.triton_kernel_wrapper_functional


def _not_the_analysis_warning(record: logging.LogRecord) -> bool:
    return "identify_accessed_tensors" not in record.getMessage()


@pytest.fixture(autouse=True)
def _quiet_kernel_analysis():
    """torch warns (with a traceback) when it cannot analyse a kernel's TTIR:
    the stand-in kernels' case."""
    loggers = [logging.getLogger(name) for name in
               ("torch._dynamo", "torch._higher_order_ops.triton_kernel_wrap")]
    for logger in loggers:
        logger.addFilter(_not_the_analysis_warning)
    yield
    for logger in loggers:
        logger.removeFilter(_not_the_analysis_warning)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------- a stand-in kernel (CPU)

class _StandInKernel:
    """What the higher-order op reads of a triton JITFunction to launch it:
    ``arg_names`` and ``kernel[grid](*args)``; it runs ``fn`` on the tensors."""

    def __init__(self, fn, arg_names):
        self.fn, self.arg_names = fn, arg_names

    def __getitem__(self, grid):
        return self.fn


def _add_into(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE):
    with torch.no_grad():  # a kernel writes memory: autograd sees none of it
        out_ptr.copy_(x_ptr + y_ptr)


_ADD = _StandInKernel(_add_into, ["x_ptr", "y_ptr", "out_ptr", "n_elements", "BLOCK_SIZE"])
_CONSTANTS = {"BLOCK_SIZE": 128}
_CONSTANTS_INDEX: list = []


def _indices() -> tuple[int, int]:
    """The stand-in's places in torch's kernel table (``torch._dynamo.reset``
    empties the table: registered again then)."""
    table = kernel_side_table
    if not _CONSTANTS_INDEX or table.constant_args.get(_CONSTANTS_INDEX[0]) is not _CONSTANTS:
        _CONSTANTS_INDEX[:] = [table.add_constant_args(_CONSTANTS)]
    return table.add_kernel(_ADD), _CONSTANTS_INDEX[0]


def _launch(x, y, out):
    kernel_idx, constant_args_idx = _indices()
    triton_kernel_wrapper_mutation(
        kernel_idx=kernel_idx, constant_args_idx=constant_args_idx, grid=[(1, 1, 1)],
        tma_descriptor_metadata={},
        kwargs={"x_ptr": x, "y_ptr": y, "out_ptr": out, "n_elements": x.numel()})


def _into_a_new_buffer(x, y):
    out = torch.empty_like(x)
    _launch(x, y, out)
    return out.sin() + x


def _into_an_input(x, buf):
    h = x * 2
    _launch(h.detach(), buf, buf)         # buf += h, hidden from autograd
    return h.cos() + buf


class _StandInAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        out = torch.empty_like(x)
        _launch(x, y, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = torch.empty_like(grad)
        _launch(grad, torch.zeros_like(grad), gx)
        return gx, grad


def _stand_in_add(x, y):
    return _StandInAdd.apply(x, y)


def _differentiated(x, y):
    return _stand_in_add(x.sin(), y).cos()


STAND_IN_PROGRAMS = {"new_buffer": _into_a_new_buffer, "into_an_input": _into_an_input,
                     "autograd_function": _differentiated}


def _stand_in_inputs(name, n=8):
    torch.manual_seed(0)
    x = torch.randn(n, requires_grad=True)
    y = torch.randn(n, requires_grad=name == "autograd_function")
    return x, y


def _eager_and_compiled(fn, compiled, name, n=8):
    results = []
    for f in (fn, compiled):
        x, y = _stand_in_inputs(name, n)
        y_in = y.detach().clone().requires_grad_(y.requires_grad)
        out = f(x, y_in)
        out.sum().backward()
        results.append((out.detach(), x.grad, y_in.grad, y_in.detach()))
    for a, b in zip(*results):
        if b is None:
            assert a is None
        else:
            assert_close(a, b)


def _dynamo_like_graph(fn, *example):
    """The torch-level graph dynamo would hand a backend for ``fn``, the op of
    the launch in it (dynamo itself makes the op only of a real triton
    kernel); the autograd.Function called as it is."""
    if fn is _differentiated:
        graph = torch.fx.Graph()
        x, y = graph.placeholder("x"), graph.placeholder("y")
        out = graph.call_function(_stand_in_add, (graph.call_function(torch.sin, (x,)), y))
        graph.output((graph.call_function(torch.cos, (out,)),))
        return torch.fx.GraphModule(torch.nn.Module(), graph)
    return torch.fx.experimental.proxy_tensor.make_fx(lambda *a: (fn(*a),),
                                                      pre_dispatch=True)(*example)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(STAND_IN_PROGRAMS))
def test_a_kernel_launch_through_aot_function(name, dynamic):
    fn = STAND_IN_PROGRAMS[name]
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.make_boxed_func(gm)

    compiled = aotgrad.aot_function(fn, keep, keep, dynamic=dynamic)
    _eager_and_compiled(fn, compiled, name)
    if dynamic:
        _eager_and_compiled(fn, compiled, name, n=11)
    forward = _targets(graphs[0])
    assert FUNCTIONAL in forward and triton_kernel_wrapper_mutation not in forward
    if name == "autograd_function":
        assert FUNCTIONAL in _targets(graphs[1])


def test_the_functional_kernel_clones_what_it_writes():
    """The graph is torch's: the same functional op, the same clones (here
    all tensor arguments: a stand-in kernel cannot be analysed)."""
    from functorch.compile import aot_function as torch_aot_function

    seen = {}

    def keep(key):
        def compiler(gm, example_inputs):
            seen.setdefault(key, []).append(
                [dict(n.kwargs) for n in gm.graph.nodes if n.target is FUNCTIONAL])
            return aotgrad.make_boxed_func(gm)
        return compiler

    x, y = _stand_in_inputs("into_an_input")
    aotgrad.aot_function(_into_an_input, keep("aotgrad"))(x, y.clone())
    torch_aot_function(_into_an_input, keep("torch"))(x, y.clone())
    (ours,), (theirs,) = seen["aotgrad"][0], seen["torch"][0]   # the forwards
    assert ours["tensors_to_clone"] == theirs["tensors_to_clone"] == \
        ["x_ptr", "y_ptr", "out_ptr"]
    assert ours["grid"] == theirs["grid"] and ours["kernel_idx"] == theirs["kernel_idx"]


@pytest.mark.parametrize("name", sorted(STAND_IN_PROGRAMS))
def test_a_kernel_launch_through_the_aot_eager_backend(name):
    """The backend gets dynamo's kind of graph, the op of the launch in it."""
    fn = STAND_IN_PROGRAMS[name]
    x, y = _stand_in_inputs(name)
    gm = _dynamo_like_graph(fn, x, y.clone())
    if fn is not _differentiated:
        assert triton_kernel_wrapper_mutation in _targets(gm)
    compiled = backends.aot_eager(gm, [x, y.clone()])

    results = []
    for f in (fn, lambda a, b: _first(compiled(a, b))):
        x, y = _stand_in_inputs(name)
        y_in = y.detach().clone().requires_grad_(y.requires_grad)
        out = f(x, y_in)
        out.sum().backward()
        results.append((out.detach(), x.grad, y_in.grad, y_in.detach()))
    for a, b in zip(*results):
        if b is None:
            assert a is None
        else:
            assert_close(a, b)


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


# ---------------------------------------------------------------- real kernels (CUDA)

requires_cuda = pytest.mark.skipif(triton is None or not torch.cuda.is_available(),
                                   reason="user Triton kernels need CUDA and triton")

if triton is not None:
    @triton.jit
    def _add_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask)
        y = tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, x + y, mask=mask)

    @triton.jit
    def _mul_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask)
        y = tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, x * y, mask=mask)

    @triton.jit
    def _scale_in_place_kernel(x_ptr, n_elements, scale, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(x_ptr + offsets, x * scale, mask=mask)

    def _add(x, y, *, wrapped=True):
        out = torch.empty_like(x)
        n = x.numel()
        kernel = torch.library.wrap_triton(_add_kernel) if wrapped else _add_kernel
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)](x, y, out, n, BLOCK_SIZE=128)
        return out

    def _mul(x, y):
        # the kernel reads dense memory: a gradient may come expanded (stride 0)
        x, y = x.contiguous(), y.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        torch.library.wrap_triton(_mul_kernel)[(triton.cdiv(n, 128),)](x, y, out, n,
                                                                       BLOCK_SIZE=128)
        return out

    def _scale_(t, scale):
        n = t.numel()
        torch.library.wrap_triton(_scale_in_place_kernel)[(triton.cdiv(n, 128),)](
            t, n, scale, BLOCK_SIZE=128)

    class _TritonMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(x, y)
            return _mul(x, y)

        @staticmethod
        def backward(ctx, grad):
            x, y = ctx.saved_tensors
            return _mul(grad, y), _mul(grad, x)

    @torch.library.triton_op("aotgrad_test_triton::mul", mutates_args={})
    def triton_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mul(x, y)

    def _triton_mul_backward(ctx, grad):
        x, y = ctx.saved_tensors
        return triton_mul(grad, y), triton_mul(grad, x)

    def _triton_mul_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    triton_mul.register_autograd(_triton_mul_backward, setup_context=_triton_mul_setup)

    def _new_buffer(x, y):
        return _add(x, y).sin() + x

    def _raw_kernel(x, y):   # kernel[grid](...) itself: dynamo makes the op of it
        return _add(x, y, wrapped=False).sin() + x

    def _mutates_an_input(x, buf):
        h = x * 2
        _scale_(buf, 3.0)                 # buf *= 3, in place
        return h.cos() * buf

    def _mutates_an_intermediate(x, y):
        t = y + 1                          # no grad: the kernel's write is no autograd's
        _scale_(t, 0.5)
        return x.sin() * t

    def _autograd_function(x, y):
        return _TritonMul.apply(x.sin(), y).cos()

    def _triton_op(x, y):
        return triton_mul(x.sin(), y).cos() + triton_mul(x, x)

    CUDA_PROGRAMS = {
        "new_buffer": (_new_buffer, False),        # (fn, y requires grad)
        "raw_kernel": (_raw_kernel, False),
        "mutates_an_input": (_mutates_an_input, False),
        "mutates_an_intermediate": (_mutates_an_intermediate, False),
        "autograd_function": (_autograd_function, True),
        "triton_op": (_triton_op, True),
    }
else:
    CUDA_PROGRAMS = {name: (None, False) for name in (
        "new_buffer", "raw_kernel", "mutates_an_input", "mutates_an_intermediate",
        "autograd_function", "triton_op")}


def _compiled(how, fn, dynamic, graphs=None):
    torch._dynamo.reset()
    if how == "aot_function":
        return aotgrad.aot_function(fn, aotgrad.nop, dynamic=dynamic)
    if how == "aot_eager" and graphs is not None:
        def keep(key):
            def compiler(gm, example_inputs):
                graphs.setdefault(key, []).append(gm)
                return aotgrad.make_boxed_func(gm)
            return compiler

        def backend(gm, example_inputs):
            return backends.aot_eager(gm, example_inputs, fw_compiler=keep("fw"),
                                      bw_compiler=keep("bw"), inference_compiler=keep("fw"))
        return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)
    backend = {"aot_eager": backends.aot_eager, "inductor": backends.inductor}[how]
    return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)


def _cuda_run(fn, n, y_grad, grad):
    torch.manual_seed(0)
    x = torch.randn(n, device="cuda", requires_grad=grad)
    y = torch.randn(n, device="cuda", requires_grad=grad and y_grad)
    out = fn(x, y)
    if grad:
        out.sum().backward()
    return out.detach(), x.grad, y.grad, y.detach()


def _same(got, expected):
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            assert_close(a, b)


def _check_cuda(fn, compiled, y_grad, grad, sizes, reference=None):
    """``compiled`` against eager.  ``reference``: torch's own compilation of
    ``fn`` (a callable making it), consulted only when ``compiled`` differs
    from eager: where torch's differs the same way, the test xfails (a bug
    of the backend, not of aotgrad); otherwise it fails."""
    for n in sizes:
        expected = _cuda_run(fn, n, y_grad, grad)
        got = _cuda_run(compiled, n, y_grad, grad)
        try:
            _same(got, expected)
        except AssertionError:
            if reference is None:
                raise
            theirs = _cuda_run(reference(), n, y_grad, grad)
            try:
                _same(theirs, expected)
            except AssertionError:
                _same(got, theirs)
                pytest.xfail("torch's own torch.compile differs from eager the same way")
            raise


@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("how", ["aot_function", "aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(CUDA_PROGRAMS))
def test_triton_kernel(name, how, grad, dynamic):
    fn, y_grad = CUDA_PROGRAMS[name]
    if how == "aot_function" and name == "raw_kernel":
        pytest.skip("a raw kernel[grid](...) launch is only traceable by dynamo "
                    "(outside it, torch.library.wrap_triton makes the op)")
    sizes = (1000, 1500) if dynamic else (1000,)
    # mutates_an_input, inductor, grad: torch 2.11's inductor (its AOTAutograd
    # too) leaves the input with other values than eager's
    reference = None if how != "inductor" else \
        lambda: (torch._dynamo.reset(), torch.compile(fn, dynamic=dynamic, fullgraph=True))[1]
    _check_cuda(fn, _compiled(how, fn, dynamic), y_grad, grad, sizes, reference)


@requires_cuda
@pytest.mark.parametrize("name", sorted(CUDA_PROGRAMS))
def test_the_graphs_launch_the_functional_kernel(name):
    """The ATen graphs hold ``triton_kernel_wrapper_functional`` (the mutation
    op functionalized), as many as torch's AOTAutograd's, the triton_op
    decomposed into its kernels."""
    from torch._dynamo.backends.common import aot_autograd

    fn, y_grad = CUDA_PROGRAMS[name]
    ours, theirs = {}, {}
    compiled = _compiled("aot_eager", fn, False, graphs=ours)
    _check_cuda(fn, compiled, y_grad, True, (1000,))

    def keep(key):
        def compiler(gm, example_inputs):
            theirs.setdefault(key, []).append(gm)
            return aotgrad.make_boxed_func(gm)
        return compiler

    torch._dynamo.reset()
    reference = torch.compile(fn, backend=aot_autograd(fw_compiler=keep("fw"),
                                                       bw_compiler=keep("bw")),
                              fullgraph=True)
    _cuda_run(reference, 1000, y_grad, True)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        for gm, ref in zip(ours[key], theirs[key], strict=True):
            count = _targets(gm).count(FUNCTIONAL)
            assert count == _targets(ref).count(FUNCTIONAL)
            assert triton_kernel_wrapper_mutation not in _targets(gm)
            if key == "fw":
                assert count > 0
            if name == "triton_op":
                assert torch.ops.aotgrad_test_triton.mul.default not in _targets(gm)
            clones = [sorted(n.kwargs["tensors_to_clone"]) for n in gm.graph.nodes
                      if n.target is FUNCTIONAL]
            assert clones == [sorted(n.kwargs["tensors_to_clone"]) for n in ref.graph.nodes
                              if n.target is FUNCTIONAL]
            for n in gm.graph.nodes:  # the kernel's written tensors only, by analysis
                if n.target is FUNCTIONAL:
                    assert len(n.kwargs["tensors_to_clone"]) == 1
                    assert {u.args[1] for u in n.users if u.target is operator.getitem} <= \
                        set(n.kwargs["tensors_to_clone"])
