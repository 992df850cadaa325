"""The generated runtime and its fast path (Note [Generated runtime],
Note [Fast path], Note [Graphs as plain functions]).

Every call that changes something the compiled program assumes must leave
the fast path and give eager's answer; every call that changes nothing must
stay on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import aotgrad
from aotgrad.codegen import graph_function


def _counting(fn):
    """``fn`` compiled with nop, and a list that grows by one per compilation."""
    compiles = []

    def compiler(gm, example_inputs):
        compiles.append(gm)
        return aotgrad.nop(gm, example_inputs)

    return aotgrad.aot_function(fn, compiler), compiles


def _grads(fn, *args):
    out = fn(*args)
    out.sum().backward()
    grads = [a.grad.clone() if a.grad is not None else None for a in args]
    for a in args:
        a.grad = None
    return out.detach(), grads


def _same(test_out, ref_out):
    (a_out, a_grads), (e_out, e_grads) = test_out, ref_out
    torch.testing.assert_close(a_out, e_out)
    assert len(a_grads) == len(e_grads)
    for a, e in zip(a_grads, e_grads):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e)


def prog(a, b):
    return (a * b).sin() + a


def test_repeated_calls_use_the_fast_path_and_match_eager():
    f, compiles = _counting(prog)
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    for _ in range(3):
        _same(_grads(f, a, b), _grads(prog, a, b))
    assert f._fast.__name__ == "fast_call"
    assert len(compiles) == 2  # one forward, one backward graph


def test_fast_path_misses_on_every_guarded_change():
    f, compiles = _counting(prog)
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    _grads(f, a, b)
    base = len(compiles)
    variants = {
        "shape": (torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)),
        "dtype": (a.detach().double().requires_grad_(), b.detach().double().requires_grad_()),
        "requires_grad": (a.detach().clone(), b),
        "stride": (torch.randn(4, 3).t().requires_grad_(), b),
    }
    for name, args in variants.items():
        out = f(*args)
        torch.testing.assert_close(out, prog(*args), msg=name)
    assert len(compiles) > base
    # storage offset: a view into a bigger buffer (same shape and strides)
    big = torch.randn(4, 4)
    x = big[1:].detach()
    torch.testing.assert_close(f(x, b.detach()), prog(x, b.detach()))
    # grad mode: an inference graph
    with torch.no_grad():
        torch.testing.assert_close(f(a, b), prog(a, b))
        assert not f(a, b).requires_grad
    # back to the first signature: correct again
    _same(_grads(f, a, b), _grads(prog, a, b))


def test_same_tensor_twice_is_not_the_fast_path_of_two_tensors():
    def g(a, b):
        a.mul_(2)
        return a + b

    f = aotgrad.aot_function(g, aotgrad.nop)
    x, y = torch.ones(3), torch.ones(3)
    f(x, y)
    torch.testing.assert_close(x, torch.full((3,), 2.0))
    z = torch.ones(3)
    out = f(z, z)  # aliased: eager gives 2 + 2
    torch.testing.assert_close(out, torch.full((3,), 4.0))
    torch.testing.assert_close(z, torch.full((3,), 2.0))


def test_autocast_and_saved_tensor_hooks_leave_the_fast_path():
    f = aotgrad.aot_function(prog, aotgrad.nop)
    a = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, 4, requires_grad=True)
    f(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(a, b)
        ref = prog(a, b)
    assert out.dtype == ref.dtype
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(a, b).sum().backward()
    assert packed, "the saved-tensor hooks must see the saved values"


def test_fast_path_of_a_module_follows_parameter_and_mode_changes():
    mod = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    compiled = aotgrad.aot_module(mod, aotgrad.nop)
    x = torch.randn(8, 4)
    mod.eval()
    for _ in range(2):
        torch.testing.assert_close(compiled(x), mod(x))
    assert compiled._fast.__name__ == "fast_call"
    # a parameter replaced by another of the same metadata
    with torch.no_grad():
        mod[0].weight = nn.Parameter(torch.randn(4, 4))
    torch.testing.assert_close(compiled(x), mod(x))
    # a submodule replaced
    mod[2] = nn.Linear(4, 2)
    torch.testing.assert_close(compiled(x), mod(x))
    # train mode: dropout is on (compare the mask-free property: zeros appear)
    mod.train()
    torch.manual_seed(0)
    out = compiled(torch.ones(64, 4))
    torch.manual_seed(0)
    ref = mod(torch.ones(64, 4))
    torch.testing.assert_close(out, ref)
    mod.eval()
    # a parameter that stops requiring grad
    mod[0].bias.requires_grad_(False)
    out = compiled(x)
    out.sum().backward()
    assert mod[0].bias.grad is None and mod[0].weight.grad is not None


def test_module_with_tied_weights_on_the_fast_path():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    mod = Tied()
    compiled = aotgrad.aot_module(mod, aotgrad.nop)
    x = torch.randn(2, 4)
    for _ in range(3):
        compiled(x).sum().backward()
    got = mod.a.weight.grad.clone()
    mod.zero_grad()
    for _ in range(3):
        mod(x).sum().backward()
    torch.testing.assert_close(got, mod.a.weight.grad)
    # untie: the fast path must not reuse the tied program
    mod.b.weight = nn.Parameter(torch.randn(4, 4))
    torch.testing.assert_close(compiled(x), mod(x))


def test_graph_function_matches_graph_module():
    def g(x, y):
        z = torch.cat([x, y.expand(2, 3)], dim=0)
        return z.float().pow(2).sum(dim=(0,), keepdim=True), torch.where(z > 0, z, float("-inf"))

    recorded = []

    def compiler(gm, example_inputs):
        recorded.append(gm)
        return aotgrad.nop(gm, example_inputs)

    f = aotgrad.aot_function(g, compiler)
    x, y = torch.randn(2, 3), torch.randn(1, 3)
    for a, b in zip(f(x, y), g(x, y)):
        torch.testing.assert_close(a, b)
    gm = recorded[0]
    fn = graph_function(gm)
    args = [x, y]
    for a, b in zip(fn(list(args)), gm(*args)):
        torch.testing.assert_close(a, b)
    source = fn.__aotgrad_source__
    assert "torch.ops" not in source and "args.clear()" in source
    assert "inf" not in source.split("\n", 2)[-1] or "__op" in source


def test_bindings_are_used_only_where_they_dispatch_the_same_overload():
    from torch.fx.experimental.proxy_tensor import make_fx

    from aotgrad import codegen

    aten = torch.ops.aten

    def g(x):
        # mul.Scalar: torch.mul(x, 2.0) would dispatch mul.Tensor instead
        return aten.mul.Scalar(aten.sin.default(x), 2.0)

    x = torch.randn(5)
    gm = make_fx(g, tracing_mode="fake")(x)
    fn = graph_function(gm)
    torch.testing.assert_close(fn([x]), g(x))
    assert codegen._verdicts[(aten.mul.Scalar, ("tensor", float))] is None
    assert codegen._verdicts[(aten.sin.default, ("tensor",))].fn is torch.sin

    class Record(torch.overrides.TorchFunctionMode):
        seen: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Record.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():  # a torch function mode sees the ATen overloads, as with gm.forward
        torch.testing.assert_close(fn([x]), g(x))
    assert torch.sin not in Record.seen and aten.sin.default in Record.seen


def test_binding_verdicts_same_with_the_result_standing_in():
    # Note [Verified bindings]: the node's result stands in for running its
    # overload; the verdicts must be those of running it
    from aotgrad import codegen

    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    def g(x, w, b, rm, rv):
        h = torch.nn.functional.linear(x, w, b).view(4, 2, 3)
        h = torch.nn.functional.batch_norm(h, rm, rv, training=True)
        a, c = h.split([1, 1], dim=1)
        y = (a * 2.0 + c.expand(4, 1, 3)).sum(dim=[1]).t().contiguous()
        return y.max(dim=0)[0].sum() + torch.where(y > 0, y, 0.5).mean()

    args = [torch.randn(4, 5), torch.randn(6, 5, requires_grad=True),
            torch.randn(6, requires_grad=True), torch.zeros(2), torch.ones(2)]
    aotgrad.aot_function(g, grab)(*args).backward()
    checked = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                    and not node.kwargs and \
                    node.target.namespace == "aten":
                standing_in = codegen._check_binding(node.target, node.args, node.meta["val"])
                run = codegen._check_binding(node.target, node.args, None)
                assert standing_in == run, node.format_node()
                checked += standing_in is not None
    assert checked > 10


def test_mutation_written_in_the_forward_matches_eager():
    # Note [Writes in the forward]: buf does not require grad, its new value
    # is not differentiable: the autograd.Function writes it itself
    def g(buf, w):
        buf.mul_(2).add_(1)
        return (buf * w).sum(), buf.sum()

    f = aotgrad.aot_function(g, aotgrad.nop)
    w = torch.randn(4, requires_grad=True)
    buf_a, buf_e = torch.ones(4), torch.ones(4)
    for _ in range(3):
        out_a, s_a = f(buf_a, w)
        out_a.backward()
        grad_a = w.grad.clone()
        w.grad = None
        out_e, s_e = g(buf_e, w)
        out_e.backward()
        torch.testing.assert_close(buf_a, buf_e)
        torch.testing.assert_close(s_a, s_e)
        torch.testing.assert_close(grad_a, w.grad)
        w.grad = None
    run = f._compiled[next(iter(f._compiled))]
    function = next(v for k, v in run.program.namespace.items() if "apply" in k).__self__
    assert "i0.copy_(o0)" in function.__aotgrad_source__
    assert "copy_" not in "".join(run.program.body)


def test_mutation_of_an_input_returned_as_a_view_is_written_after():
    def g(buf, w):
        buf.add_(1)
        return buf.view(2, 2), (buf * w).sum()

    f = aotgrad.aot_function(g, aotgrad.nop)
    w = torch.randn(4, requires_grad=True)
    buf_a, buf_e = torch.zeros(4), torch.zeros(4)
    v_a, s_a = f(buf_a, w)
    v_e, s_e = g(buf_e, w)
    torch.testing.assert_close(v_a, v_e)
    assert v_a._base is buf_a
    s_a.backward()
    torch.testing.assert_close(w.grad, buf_e)


def test_module_hooks_still_run_on_the_fast_path():
    mod = nn.Linear(4, 4)
    compiled = aotgrad.aot_module(mod, aotgrad.nop)
    x = torch.randn(2, 4)
    compiled(x)
    compiled(x)  # fast path from here
    seen = []
    handle = compiled.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(compiled(x), mod(x))
    assert seen == [torch.Size([2, 4])]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(type(m).__name__))
    try:
        compiled(x)
    finally:
        handle.remove()
    assert "AOTModule" in seen


def test_broadcast_expands_are_skipped_only_where_exact():
    from torch.fx.experimental.proxy_tensor import make_fx

    aten = torch.ops.aten

    def g(s, x, y, h):
        e = aten.expand.default(s, [4, 3])
        return (aten.mul.Tensor(e, x),                    # skipped: x contiguous, same dtype
                aten.mul.Tensor(aten.expand.default(s, [4, 3]), y),  # kept: y not contiguous
                aten.add.Tensor(aten.expand.default(s, [4, 3]), h))  # kept: h is float64

    s = torch.randn(())
    x = torch.randn(4, 3)
    y = torch.randn(3, 4).t()
    h = torch.randn(4, 3, dtype=torch.float64)
    gm = make_fx(g, tracing_mode="fake")(s, x, y, h)
    fn = graph_function(gm)
    for got, want in zip(fn([s, x, y, h]), g(s, x, y, h)):
        torch.testing.assert_close(got, want)
        assert got.dtype == want.dtype and got.stride() == want.stride()
    assert fn.__aotgrad_source__.count("_expand(") == 2  # two of the three expands run


def test_peepholes_are_exact_and_keep_outputs_distinct():
    # Note [Peepholes] (codegen.py): t(t(x)) -> x and view(sum(g, dims, True))
    # -> sum(g, dims), only where nothing observable changes
    from torch.fx.experimental.proxy_tensor import make_fx

    aten = torch.ops.aten

    def g(x, m, g2):
        mm = aten.mm.default(x, m)
        s1 = aten.sum.dim_IntList(g2, [0], True)
        s2 = aten.sum.dim_IntList(g2, [-1, 0], True, dtype=torch.float64)
        s3 = aten.sum.dim_IntList(g2, [1], True)
        return (aten.t.default(aten.t.default(mm)),            # -> mm itself
                aten.t.default(aten.t.default(x)),             # x is an input: kept
                aten.mul.Tensor(aten.t.default(aten.t.default(m)), 2),  # inside: -> m
                aten.view.default(s1, [3]),                    # -> sum(g2, [0])
                aten.view.default(s2, []),                     # -> sum(g2, [-1, 0], dtype)
                aten.view.default(s3, [1, 2]),                 # a real reshape: kept
                s3)

    x, m, g2 = torch.randn(2, 2), torch.randn(2, 2), torch.randn(2, 3)
    gm = make_fx(g, tracing_mode="fake")(x, m, g2)
    fn = graph_function(gm)
    got, want = fn([x, m, g2]), g(x, m, g2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert got[1] is not x  # never an input as an output
    source = fn.__aotgrad_source__
    assert source.count("_t(") == 2  # the kept t(t(x)) of the input
    assert source.count("_view(") == 1 and source.count("_sum(") == 3


def test_offsets_nobody_reads_stay_on_the_fast_path():
    # Note [Offsets nobody reads] (runtime.py): a view at another storage offset
    # runs the same program, unless the program reads offsets
    big = torch.randn(5, 4)
    programs = {"plain": lambda x: (x * 2).sin(), "viewed": lambda x: x.view(-1),
                "strided": lambda x: x.as_strided((2, 2), (1, 2)) * 1}
    compiles = {}
    for name, eager in programs.items():
        f, graphs = _counting(eager)
        for start in (0, 1, 0, 1):
            x = big[start:start + 4]
            out = f(x)
            torch.testing.assert_close(out, eager(x))
            if name == "viewed":  # the output is a view of x, at x's offset
                assert out.storage_offset() == x.storage_offset()
        compiles[name] = len(graphs)
    # one inference graph for plain; the view output and as_strided read the
    # offset: one per offset
    assert compiles == {"plain": 1, "viewed": 2, "strided": 2}


def test_tangents_as_they_come():
    # Note [Tangents as they come] (runtime.py): nop's backward takes a
    # non-contiguous gradient as is unless something computed from it is viewed
    def pointwise(x):
        return x * 2

    def viewed(x):
        return (x.reshape(-1) * 2).reshape(3, 4)

    for fn, takes_as_is in [(pointwise, True), (viewed, False)]:
        f = aotgrad.aot_function(fn, aotgrad.nop)
        x = torch.randn(3, 4, requires_grad=True)
        g = torch.randn(4, 3).t()  # non-contiguous gradient of the output
        got = torch.autograd.grad(f(x), x, g)[0]
        want = torch.autograd.grad(fn(x), x, g)[0]
        torch.testing.assert_close(got, want)
        # taken as is: eager's strides; made contiguous first: a contiguous result
        assert (got.stride() == want.stride() == (1, 3)) == takes_as_is


def test_tangents_of_kernels_that_need_contiguous_gradients():
    # Note [Ops that take any strides] (codegen.py): native_group_norm_backward
    # reads its gradient as if contiguous; given the expanded gradient of a
    # sum() as it comes, it returned garbage (module_db's GroupNorm)
    torch.manual_seed(0)
    m = torch.nn.GroupNorm(2, 4)
    f = aotgrad.aot_module(m, aotgrad.nop)
    x = torch.randn(3, 4, 5, requires_grad=True)
    for weight in (None, torch.randn(5, 4, 3).permute(2, 1, 0)):
        got = torch.autograd.grad(f(x).sum() if weight is None else (f(x) * weight).sum(),
                                  (x, m.weight, m.bias))
        want = torch.autograd.grad(m(x).sum() if weight is None else (m(x) * weight).sum(),
                                   (x, m.weight, m.bias))
        torch.testing.assert_close(got, want)


def _recording_nop():
    sources = []

    def compiler(gm, example_inputs):
        fn = aotgrad.nop(gm, example_inputs)
        sources.append(fn.__aotgrad_source__)
        return fn

    return compiler, sources


def test_input_updates_in_place_match_eager():
    # Note [Updates in place] (runtime.py): buf.add_(1) runs as add_ on the
    # input, not add + copy_; values, gradients and version counters as eager
    def mutate(buf, w):
        buf.add_(1)
        return (buf * w).sum()

    compiler, sources = _recording_nop()
    f = aotgrad.aot_function(mutate, compiler)
    buf, ref_buf = torch.zeros(8), torch.zeros(8)
    w = torch.randn(8, requires_grad=True)
    w2 = w.detach().clone().requires_grad_()
    for _ in range(3):
        f(buf, w).backward()
        mutate(ref_buf, w2).backward()
        torch.testing.assert_close(buf, ref_buf)
        torch.testing.assert_close(w.grad, w2.grad)
        assert buf._version == ref_buf._version
    assert "add_(primals_1, 1)" in sources[0]

    def infer(buf, x):  # inference: the runtime's write-back is left out too
        buf.mul_(2)
        return buf + x

    compiler, sources = _recording_nop()
    g = aotgrad.aot_function(infer, compiler)
    buf, ref_buf, x = torch.ones(4), torch.ones(4), torch.randn(4)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(g(buf, x), infer(ref_buf, x))
            torch.testing.assert_close(buf, ref_buf)
            assert buf._version == ref_buf._version
    assert "mul_(arg0_1, 2)" in sources[0]


def test_input_updates_stay_functional_where_in_place_is_not_exact():
    from torch.fx.experimental.proxy_tensor import make_fx

    from aotgrad.codegen import INPUT_UPDATES_META

    aten = torch.ops.aten
    cases = {
        # the input is read after the op
        "read_after": (lambda x: (aten.add.Tensor(x, 1), aten.mul.Tensor(x, 2)),
                       torch.randn(4)),
        # another argument shares the input's memory
        "overlap": (lambda x: (aten.add.Tensor(x, aten.select.int(x, 0, 0)),),
                    torch.randn(4)),
        # the new value has another dtype (type promotion)
        "dtype": (lambda x: (aten.add.Tensor(x, 1.5),), torch.arange(4)),
    }
    for name, (g, x) in cases.items():
        gm = make_fx(g, tracing_mode="fake")(x)
        gm.meta[INPUT_UPDATES_META] = {0: 0}
        fn = graph_function(gm)
        before = x.clone()
        got = fn([x])
        torch.testing.assert_close(x, before, msg=name)  # the input is left alone
        for a, b in zip(got, g(before)):
            torch.testing.assert_close(a, b, msg=name)
        assert fn.__aotgrad_updated__ == frozenset(), name


def test_default_dtype_is_part_of_the_guard():
    # factories and promotion with Python floats follow the default dtype; a
    # compiler may bake the dtypes it saw into its code, so a new default
    # dtype compiles again (nop's graphs would follow it by themselves)
    def fn(x):
        return x * 2.5 + torch.ones(3)

    f, graphs = _counting(fn)
    x = torch.arange(3)
    assert f(x).dtype == fn(x).dtype == torch.float32
    assert f(x).dtype == torch.float32 and len(graphs) == 1  # the fast path
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert f(x).dtype == fn(x).dtype == torch.float64
        torch.testing.assert_close(f(x), fn(x))
        assert len(graphs) == 2
    finally:
        torch.set_default_dtype(old)
    assert f(x).dtype == torch.float32 and len(graphs) == 2


def _graph(fn, *args):
    """``fn``'s inference graph (a GraphModule), as aotgrad hands it to a compiler."""
    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return aotgrad.nop(gm, example_inputs)

    with torch.no_grad():
        aotgrad.aot_function(fn, compiler)(*args)
    return graphs[0]


def test_results_unpacked_compute_what_the_graph_computes():
    # Note [Results unpacked]: several results in one statement; an index
    # nothing reads is dropped at once; getitem of a list result by subscript
    def g(x, w, b):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, [4], w, b, 1e-5)
        first, *_ = x.split(1)
        var_only = torch.var_mean(x, 1)[0]
        return out * 2, rstd + 1, first, var_only

    args = (torch.randn(3, 4), torch.randn(4), torch.randn(4))
    gm = _graph(g, *args)
    fn = graph_function(gm)
    source = fn.__aotgrad_source__
    unpack = [line for line in source.splitlines() if "native_layer_norm" in line]
    assert len(unpack) == 1 and unpack[0].strip().startswith("getitem")
    assert ", __unread," in unpack[0]
    assert "__unread = None" in source
    assert any(line.strip().endswith("[0]") for line in source.splitlines())  # split's item
    for a, b in zip(fn(list(args)), gm(*args)):
        torch.testing.assert_close(a, b)
    for a, b in zip(aotgrad.aot_function(g, aotgrad.nop)(*args), g(*args)):
        torch.testing.assert_close(a, b)


def test_inputs_read_in_runs():
    from aotgrad.codegen import read_inputs
    assert read_inputs(["leaves[0]", "leaves[1]", "leaves[2]", "leaves[7]", "m.get('w')",
                         "args[0]", "args[1]"]) == [
        "    i0, i1, i2, = leaves[0:3]", "    i3 = leaves[7]", "    i4 = m.get('w')",
        "    i5, i6, = args[0:2]"]


def test_fast_function_is_made_when_it_first_runs(monkeypatch):
    # Note [Fast path]: the first call writes the guard; the source is made
    # and compiled at the next call, which then runs it
    import aotgrad.codegen as codegen
    made = []
    make = codegen.make_function
    monkeypatch.setattr(aotgrad.runtime, "make_function",
                        lambda source, name, ns: made.append(name) or make(source, name, ns))
    linear = nn.Linear(4, 3)
    cases = [(aotgrad.aot_function(prog, aotgrad.nop), prog,
              (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))),
             (aotgrad.aot_module(linear, aotgrad.nop), linear, (torch.randn(2, 4),))]
    for compiled, eager, args in cases:
        made.clear()
        torch.testing.assert_close(compiled(*args), eager(*args))
        assert "fast_call" not in made and compiled._fast.__name__ == "first_use"
        torch.testing.assert_close(compiled(*args), eager(*args))
        assert made.count("fast_call") == 1 and compiled._fast.__name__ == "fast_call"
        torch.testing.assert_close(compiled(*args), eager(*args))
        assert made.count("fast_call") == 1


def test_a_storage_offset_read_in_python_is_guarded():
    """Note [Offsets read in Python]: the traced offset is baked into the
    graph, so the fast path must not leave the offset out of its guard."""
    def f(x):
        return x * 2 + x.storage_offset()

    for requires_grad in (False, True):
        compiled = aotgrad.aot_function(f, aotgrad.nop)
        base = torch.zeros(10, requires_grad=requires_grad)
        for k in (0, 1, 2, 1):
            x, ex = base[k:k + 4], base[k:k + 4]
            out, want = compiled(x), f(ex)
            torch.testing.assert_close(out, want)
            if requires_grad:
                torch.testing.assert_close(torch.autograd.grad(out.sum(), base),
                                           torch.autograd.grad(want.sum(), base))
