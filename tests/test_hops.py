"""Higher-order operators (issue 18, item 1) through aot_function and both
torch.compile backends, static and dynamic, against eager: values and
gradients."""

import functools

import pytest
import torch
from torch._higher_order_ops import map as hop_map, scan, while_loop
from torch.testing import assert_close

import aotgrad
from aotgrad import backends


def _cond(x):
    return torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos() * 2, (x,))


def _while(x):
    return while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2 + 1),
                      (torch.tensor(0), x))[1]


def _map(x):
    # the extra argument is a fresh tensor: torch's map refuses arguments that
    # alias each other (x[0] and the rows of x), in eager too
    return hop_map(lambda row, w: row.sin() * w, x, x[0].clone())


def _scan(x):
    return scan(lambda c, r: (c + r, (c * r).sin()), x[0].clone(), x)[1]


@torch.compiler.nested_compile_region
def _block(x):
    return x.sin() * 2 + 1


def _invoke_subgraph(x):
    return _block(_block(x)).cos()


@torch.library.custom_op("aotgrad_test::add_into", mutates_args=("acc",))
def _add_into(x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    acc.add_(x)
    return x * 2


@_add_into.register_fake
def _(x, acc):
    return torch.empty_like(x)


def _auto_functionalized(x):
    acc = torch.ones_like(x)
    y = _add_into(x.detach(), acc)
    return y + acc + x


def _associative_scan(x):
    from torch._higher_order_ops.associative_scan import associative_scan

    return associative_scan(lambda a, b: a * b + a, x, dim=0, combine_mode="generic")


def _checkpointed(x):
    return torch.utils.checkpoint.checkpoint(lambda x: x.sin().cos() * x, x,
                                             use_reentrant=False)


PROGRAMS = {
    "cond": (_cond, True),
    "while_loop": (_while, False),     # no derivative rule for while_loop (as in torch);
                                       # static, torch's aot_function fails it (its fake rule
                                       # needs a ShapeEnv): aotgrad traces it again with one
    "map": (_map, True),
    "scan": (_scan, True),
    "invoke_subgraph": (_invoke_subgraph, True),
    "auto_functionalized": (_auto_functionalized, True),
    "checkpoint": (_checkpointed, True),
    "associative_scan": (_associative_scan, True),
}


def _compiled(how, fn, dynamic):
    if how == "aot_function":
        return aotgrad.aot_function(fn, aotgrad.nop, dynamic=dynamic)
    torch._dynamo.reset()
    backend = backends.aot_eager if how == "aot_eager" else backends.inductor
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)


def _check(compiled, fn, x, grad, **tolerance):
    for sign in (1, -1):   # both branches of cond
        inp = (sign * x).detach().requires_grad_(grad)
        out, ref = compiled(inp), fn(inp)
        assert_close(out, ref, **tolerance)
        if grad:
            g, = torch.autograd.grad(out.square().sum(), inp)
            r, = torch.autograd.grad(ref.square().sum(), inp)
            assert_close(g, r, **tolerance)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("how", ["aot_function", "aot_eager"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_higher_order_op(name, how, dynamic):
    fn, grad = PROGRAMS[name]
    torch.manual_seed(0)
    _check(_compiled(how, fn, dynamic), fn, torch.randn(4, 3), grad)


@pytest.mark.parametrize("name", ["cond", "scan", "invoke_subgraph", "auto_functionalized"])
def test_higher_order_op_inductor(name):
    fn, grad = PROGRAMS[name]
    torch.manual_seed(0)
    _check(_compiled("inductor", fn, False), fn, torch.randn(4, 3), grad)


def test_inference_of_higher_order_ops():
    for fn, _ in PROGRAMS.values():
        x = torch.randn(4, 3)
        with torch.no_grad():
            assert_close(_compiled("aot_eager", fn, False)(x), fn(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA")
@pytest.mark.parametrize("how", ["aot_eager", "inductor"])
def test_flex_attention(how):
    from torch.nn.attention.flex_attention import flex_attention

    def fn(q):
        return flex_attention(q, q, q, score_mod=lambda s, b, h, i, j: s + (i - j))

    q = torch.randn(1, 2, 128, 16, device="cuda")
    # inductor's fused kernel sums in another order than eager's unfused one
    tolerance = {"atol": 1e-3, "rtol": 1e-3} if how == "inductor" else {}
    _check(_compiled(how, fn, False), fn, q, True, **tolerance)


def test_flex_attention_inference_on_cpu():
    from torch.nn.attention.flex_attention import flex_attention

    def fn(q, k, v):   # three tensors: torch 2.11's inductor refuses one buffer for all
        return flex_attention(q, k, v)

    q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)
    q, k, v = q.clone(), k.clone(), v.clone()
    for how in ("aot_eager", "inductor"):
        assert_close(_compiled(how, fn, False)(q, k, v), fn(q, k, v))


def test_torch_compile_inside_the_program():
    """Note [Dynamo under aotgrad's modes] (hops.py): a function the program
    compiles itself is traced through, by the light tracer alone and under
    functionalization (torch's aot_function fails both: an inductor kernel
    run on fake tensors; make_fx, which a program with a higher-order op
    needs, refuses dynamo's functions for torch and aotgrad alike)."""
    torch._dynamo.reset()
    # two functions: dynamo marks the code it skips (one code object, one test)
    inner = torch.compile(lambda x: x.sin() * 2, backend="inductor")
    other = torch.compile(lambda x: x.sin() * 3, backend="inductor")

    def light(x):
        return inner(x).cos()

    def functionalized(x):
        y = x * 1
        y[0].add_(1)   # a mutation of a view: traced under functionalization
        return other(y).cos()

    for fn in (light, functionalized):
        _check(aotgrad.aot_function(fn, aotgrad.nop), fn, torch.randn(4, 3), True)


def test_invoke_subgraph_is_one_graph_for_every_call_site():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    torch._dynamo.reset()
    backend = functools.partial(backends.aot_eager, fw_compiler=keep, bw_compiler=keep)
    x = torch.randn(4, requires_grad=True)
    out = torch.compile(_invoke_subgraph, backend=backend, fullgraph=True)(x)
    assert_close(out, _invoke_subgraph(x))
    g, = torch.autograd.grad(out.sum(), x)
    assert_close(g, torch.autograd.grad(_invoke_subgraph(x).sum(), x)[0])
    for gm in graphs:   # forward, then backward: two calls of one subgraph each
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and
                 n.target is torch.ops.higher_order.invoke_subgraph]
        assert len(calls) == 2 and len({n.args[0].target for n in calls}) == 1


@pytest.mark.parametrize("how", ["aot_function", "aot_eager"])
def test_out_dtype(how):
    from torch._higher_order_ops.out_dtype import out_dtype

    def fn(x):
        return out_dtype(torch.ops.aten.mm.default, torch.int32, x, x.t())

    x = torch.randint(-3, 3, (4, 3), dtype=torch.int8)
    assert_close(_compiled(how, fn, False)(x), fn(x))


def test_invoke_quant_under_compile():
    """hop_db's invoke_quant: the graph makes the HOP's options object from
    constants and both halves read it; the backward makes it again (the
    partition asserted it was saved and not a tensor)."""
    from torch.testing._internal.hop_db import hop_db

    op = next(o for o in hop_db if o.name == "invoke_quant")
    for sample in op.sample_inputs(None, torch.float32, requires_grad=True):
        def f(*args, sample=sample):
            return op.op(*args, **sample.kwargs)

        def run(fn, sample=sample):
            xs = [t.detach().clone().requires_grad_(t.requires_grad)
                  if isinstance(t, torch.Tensor) else t for t in (sample.input, *sample.args)]
            out = fn(*xs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            sum(o.sum() for o in outs).backward()
            return [o.detach() for o in outs], [x.grad for x in xs if isinstance(x, torch.Tensor)]

        torch._dynamo.reset()
        torch.testing.assert_close(
            run(torch.compile(f, backend=aotgrad.backends.aot_eager, fullgraph=True)), run(f))


def test_a_region_that_draws_random_numbers_in_its_backward_is_refused():
    """Note [Random numbers in a region's backward]: a nested_compile_region
    with dropout, called twice, had a backward subgraph that drew its mask
    again (a gradient matching no forward mask); now a clear error.  One call
    keeps the mask and matches eager's."""
    @torch.compiler.nested_compile_region
    def block(x):
        return torch.nn.functional.dropout(x, 0.5, True)

    torch._dynamo.reset()
    x = torch.ones(12, requires_grad=True)
    with pytest.raises(Exception, match="draws random numbers again"):
        torch.compile(lambda x: block(block(x)), backend=backends.aot_eager)(x).sum().backward()
    torch._dynamo.reset()
    y = torch.compile(lambda x: block(x.sin()), backend=backends.aot_eager)(x)
    y.sum().backward()
    assert torch.equal(y != 0, x.grad != 0)
