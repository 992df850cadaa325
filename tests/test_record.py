"""The light tracer (Note [A light tracer], aotgrad/record.py).

It must write the graph make_fx writes, and hand every program it does not
handle to make_fx, even when the program swallows the refusal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import aotgrad
from aotgrad import _torch, fakes
from aotgrad.fakes import fakes_from_reals
from aotgrad.record import NeedsMakeFx, record


def _nodes(gm):
    """The graph as comparable rows (output flattened: make_fx's is a pytree)."""
    rows = []
    for n in gm.graph.nodes:
        if n.op == "output":
            rows.append(("output", str(_torch.pytree.tree_leaves(n.args[0]))))
        else:
            rows.append((n.op, n.name, str(n.target), str(n.args), str(n.kwargs)))
    return rows


def _functional(fn):
    def run(*args):
        with _torch.functional_mode():
            outs = fn(*[_torch.to_functional(a) for a in args])
            return [_torch.from_functional(o) for o in outs]
    return run


def _both(fn, shapes, decompositions=None, grad=False):
    mode = FakeTensorMode()
    args = [mode.from_tensor(torch.randn(s)) for s in shapes]
    names = [f"arg{i}_1" for i in range(len(args))]
    with torch.set_grad_enabled(grad):
        mine = record(fn, args, names, decompositions)
        with mode:
            theirs = make_fx(fn, decomposition_table=decompositions)(*args)
    return mine, theirs


PROGRAMS = {
    "pointwise": (lambda a, b: [(a * b).sin() + 1], [(3, 4), (3, 4)]),
    "matmul_views": (lambda a, b: [(a @ b.t()).view(-1)[2:], a.transpose(0, 1)], [(3, 4), (5, 4)]),
    "multi_output": (lambda a, b: [*a.split(2), torch.var_mean(b, 0)[1]], [(5, 4), (3, 4)]),
    "mutation": (lambda a, b: [a.clone().add_(b).mul_(2), b.unsqueeze(0).expand(2, 3, 4) * 1],
                 [(3, 4), (3, 4)]),
    "factories": (lambda a, b: [a + torch.ones(3, 4), torch.zeros_like(b).index_fill(0, torch.arange(2), 1.0)],
                  [(3, 4), (3, 4)]),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_same_graph_as_make_fx(name):
    fn, shapes = PROGRAMS[name]
    mine, theirs = _both(_functional(fn), shapes)
    assert _nodes(mine) == _nodes(theirs)
    for n in mine.graph.nodes:
        if n.op != "output":
            val = n.meta["val"]
            assert all(isinstance(v, torch.Tensor) for v in _torch.pytree.tree_leaves(val))
            assert val is not None


def test_decompositions_apply_as_under_make_fx():
    table = _torch.get_decompositions([torch.ops.aten.addmm.default, torch.ops.aten.gelu.default])
    fn = _functional(lambda a, b, c: [torch.nn.functional.gelu(torch.addmm(c, a, b))])
    mine, theirs = _both(fn, [(3, 4), (4, 5), (5,)], decompositions=table)
    assert _nodes(mine) == _nodes(theirs)
    targets = {str(n.target) for n in mine.graph.nodes}
    assert "aten.addmm.default" not in targets and "aten.gelu.default" not in targets


def test_joint_graph_same_as_make_fx():
    # forward and backward through autograd, above functionalization
    def joint(a, b):
        a = a.detach().requires_grad_()
        out = (a * b).sin().sum()
        return [out, *torch.autograd.grad(out, [a])]

    mine, theirs = _both(_functional(joint), [(3,), (3,)], grad=True)
    assert _nodes(mine) == _nodes(theirs)


def test_symbolic_sizes_are_refused():
    mode = _torch.new_fake_mode(dynamic=True)
    x = mode.from_tensor(torch.randn(3, 4))
    with pytest.raises(NeedsMakeFx, match="symbolic"):
        record(lambda t: [t * 2], [x], ["arg0_1"], None)


def _compiled_matches_eager(fn, *args):
    before = counters["aotgrad"]["traced_by_make_fx"]
    compiled = aotgrad.aot_function(fn, aotgrad.nop)
    a1 = [a.detach().clone().requires_grad_() for a in args]
    a2 = [a.detach().clone().requires_grad_() for a in args]
    out, ref = compiled(*a1), fn(*a2)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for x, y in zip(a1, a2):
        torch.testing.assert_close(x.grad, y.grad)
    return counters["aotgrad"]["traced_by_make_fx"] - before


def test_common_programs_take_the_light_tracer():
    assert _compiled_matches_eager(lambda x, w: (x @ w).relu().sum(1), torch.randn(3, 4),
                                   torch.randn(4, 5)) == 0


def test_constants_go_to_make_fx():
    assert _compiled_matches_eager(lambda x: x * torch.tensor(2.0) + torch.tensor([1.0, 2.0]),
                                   torch.randn(3, 2)) == 1


def test_a_swallowed_refusal_still_goes_to_make_fx():
    # The refusal is raised inside user code; a bare except there must not leave
    # the light tracer's graph with the other branch in it.
    def fn(x):
        try:
            y = x * torch.tensor(2.0)
        except Exception:
            y = x * 3.0
        return y.sin()

    assert _compiled_matches_eager(fn, torch.randn(4)) == 1


def test_selective_checkpoint_goes_to_make_fx():
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default \
            else CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(create_selective_checkpoint_contexts, policy)

    def fn(x, w):
        return checkpoint(lambda a, b: (a @ b).sin().cos(), x, w, use_reentrant=False,
                          context_fn=context)

    assert _compiled_matches_eager(fn, torch.randn(3, 4), torch.randn(4, 4)) == 1


# ---------------------------------------------------------------- Note [One pass] (trace.py)

def _runs_at_compile(fn, *args, grad=True):
    """How many times compiling runs the program; checks the call against eager."""
    runs = []

    def counted(*a):
        runs.append(1)
        return fn(*a)

    compiled = aotgrad.aot_function(counted, aotgrad.nop)
    a1 = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    a2 = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    with torch.set_grad_enabled(grad):
        out = compiled(*a1)
        compiles = len(runs)
        ref = fn(*a2)
    torch.testing.assert_close(out, ref)
    if grad:
        out.sum().backward()
        ref.sum().backward()
        for x, y in zip(a1, a2):
            if x.requires_grad:
                torch.testing.assert_close(x.grad, y.grad)
    return compiles


def test_training_program_runs_once():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    assert _runs_at_compile(lambda x, w: (x @ w).tanh() * 2, x, w) == 1


def test_inference_program_runs_once_mutation_included():
    def fn(x, buf):
        buf.add_(1)
        return x.relu() + buf

    assert _runs_at_compile(fn, torch.randn(4), torch.zeros(4), grad=False) == 1


def test_mutated_input_that_requires_grad_runs_twice():
    # y does not require grad: its mutation needs nothing before the run
    def fn(x, y):
        y.mul_(3)
        return x * y

    x = torch.randn(4, requires_grad=True)
    assert _runs_at_compile(fn, x, torch.randn(4)) == 1

    # y requires grad: Note [Clone before mutation] clones it before the
    # program runs, which only the Signature tells: the joint is traced again
    runs = []

    def fn2(x, y):
        runs.append(1)
        y.mul_(x)
        return y * 2

    compiled = aotgrad.aot_function(fn2, aotgrad.nop)
    y = torch.randn(4, requires_grad=True)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y1, y2 = y.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out = compiled(x1, y1 * 1)
    assert len(runs) == 2
    ref = fn2(x2, y2 * 1)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close((x1.grad, y1.grad), (x2.grad, y2.grad))


def test_grad_mode_without_gradients_is_one_inference_pass():
    # grad mode on, nothing requires grad: the inference graph, in one run
    runs = []

    def fn(x):
        runs.append(1)
        return x.sin() * 2

    out = aotgrad.aot_function(fn, aotgrad.nop)(torch.ones(4))
    assert len(runs) == 1 and not out.requires_grad
    torch.testing.assert_close(out, torch.ones(4).sin() * 2)

    # ... unless the program makes gradients itself: then the joint, traced again
    def makes_grad(x):
        runs.append(1)
        return x * torch.ones(4, requires_grad=True)

    runs.clear()
    x = torch.full((4,), 3.0)
    out = aotgrad.aot_function(makes_grad, aotgrad.nop)(x)
    assert len(runs) == 2  # (out.requires_grad is False, as with torch's AOTAutograd)
    torch.testing.assert_close(out, x)


def test_inference_is_traced_in_the_grad_mode_of_the_call():
    # the program may read the grad mode: a call in grad mode without inputs
    # that require grad must not be traced under no_grad
    def fn(x):
        return x * 2 if torch.is_grad_enabled() else x * 3

    f = aotgrad.aot_function(fn, aotgrad.nop)
    x = torch.ones(2)
    torch.testing.assert_close(f(x), fn(x))
    with torch.no_grad():
        torch.testing.assert_close(f(x), fn(x))


def test_a_refused_one_pass_goes_straight_to_make_fx():
    # the light attempt stops at the constant; analysis, then make_fx: no second
    # light attempt
    assert _runs_at_compile(lambda x: x * torch.tensor(2.0), torch.randn(3, requires_grad=True)) == 3


def test_a_data_dependent_size_gets_a_clear_error():
    # values read are specialised on (tests/test_values.py); sizes made from
    # data are not
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="depends on the values in its tensors"):
        aotgrad.aot_function(lambda x: x[x > 0].sum(), aotgrad.nop)(x)


def test_a_captured_tensor_gets_a_clear_error():
    w = torch.ones(4, requires_grad=True)

    def fn(x):
        return x * w

    with pytest.raises(RuntimeError, match="not one of its inputs"):
        aotgrad.aot_function(fn, aotgrad.nop)(torch.ones(4))


def test_compilers_get_tensor_meta_as_from_make_fx():
    # the light tracer writes meta["val"]; compilers that read make_fx's
    # meta["tensor_meta"] still find it
    seen = []

    def compiler(gm, example_inputs):
        seen.append({n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor)})
        return gm

    a = torch.randn(3, 2, requires_grad=True)
    aotgrad.aot_function(lambda a: (a * 2).t().sin().sum(), compiler)(a).backward()
    assert len(seen) == 2
    for metas in seen:
        assert metas and all(m is not None for m in metas.values())
    fw = seen[0]
    assert any(tuple(m.shape) == (2, 3) and m.stride == (1, 2) for m in fw.values())


def test_the_report_says_how_the_program_was_traced():
    f = aotgrad.aot_function(lambda x: x.sin(), aotgrad.nop)
    f(torch.randn(3, requires_grad=True))
    assert f.last_report.tracing == \
        "one run of the program, by the light tracer, functionalizing by itself"
    # a mutation through a view: torch's functionalization (Note [Functional already])
    h = aotgrad.aot_function(lambda x: (x * 1).view(-1).add_(1), aotgrad.nop)
    h(torch.randn(3, requires_grad=True))
    assert h.last_report.tracing == \
        "one run of the program, by the light tracer, under functionalization"
    g = aotgrad.aot_function(lambda x: x * torch.tensor(2.0), aotgrad.nop)
    g(torch.randn(3, requires_grad=True))
    assert g.last_report.tracing.startswith("two runs of the program (analysis, then the "
                                            "trace), by make_fx (")


# ---------------------------------------------------------------- Note [Functional already] (trace.py)

def _traced_both_ways(monkeypatch, fn, *args, grad=True):
    """The joint (or inference) graph's code traced with the light tracer's
    own functionalization and with torch's, and the first one's tracing
    line; the compiled call is checked against eager each time."""
    codes, lines = [], []
    for own in (True, False):
        monkeypatch.setattr(aotgrad.trace, "OWN_FUNCTIONALIZATION", own)
        compiled = aotgrad.aot_function(fn, aotgrad.nop)
        a1 = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        a2 = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        with torch.set_grad_enabled(grad):
            out, ref = compiled(*a1), fn(*a2)
        torch.testing.assert_close(out, ref)
        for x, y in zip(a1, a2):  # mutated inputs
            torch.testing.assert_close(x, y)
        if isinstance(out, tuple):
            out, ref = out[0], ref[0]
        if grad and out.requires_grad:
            out.sum().backward()
            ref.sum().backward()
            for x, y, a in zip(a1, a2, args):
                if a.requires_grad:
                    torch.testing.assert_close(x.grad, y.grad)
        codes.append(_ops(compiled.last_report.traced.gm))
        lines.append(compiled.last_report.tracing)
    return codes[0], codes[1], lines[0]


def _ops(gm):
    """The graph's ops in order, detaches aside (autograd makes them at other
    points of the run when functionalization is not there to absorb them)."""
    def source(a):
        while isinstance(a, torch.fx.Node) and a.target is torch.ops.aten.detach.default:
            a = a.args[0]
        return str(a)

    return [(n.name, str(n.target), [source(a) for a in n.args])
            for n in gm.graph.nodes if n.op == "call_function" and
            n.target is not torch.ops.aten.detach.default]


OWN = "one run of the program, by the light tracer, functionalizing by itself"


def test_in_place_ops_on_intermediates_functionalized_by_the_tracer(monkeypatch):
    def fn(x, w):
        h = x @ w
        h.mul_(2).add_(w.sum())
        h.relu_()
        return h.tanh()

    own, torchs, line = _traced_both_ways(monkeypatch, fn, torch.randn(3, 4, requires_grad=True),
                                          torch.randn(4, 4, requires_grad=True))
    assert line == OWN and own == torchs
    assert [t for _, t, _ in own][:5] == ["aten.mm.default", "aten.mul.Tensor",
                                          "aten.sum.default", "aten.add.Tensor",
                                          "aten.relu.default"]


def test_batch_norm_buffers_functionalized_by_the_tracer(monkeypatch):
    def fn(x, w, rm, rv, n):
        n.add_(1)
        return torch.nn.functional.batch_norm(x, rm, rv, w, None, training=True).relu()

    args = (torch.randn(8, 3), torch.randn(3, requires_grad=True), torch.zeros(3), torch.ones(3),
            torch.zeros((), dtype=torch.long))
    own, torchs, line = _traced_both_ways(monkeypatch, fn, *args)
    assert line == OWN and own == torchs
    assert "aten._native_batch_norm_legit_functional.default" in [t for _, t, _ in own]
    own, torchs, line = _traced_both_ways(monkeypatch, fn, *args, grad=False)  # inference
    assert line == OWN and own == torchs


def test_input_mutations_functionalized_by_the_tracer(monkeypatch):
    def under_no_grad(x, buf):
        with torch.no_grad():
            buf.mul_(0.5)
        return x * buf

    def seen_by_autograd(x, buf):  # buf gets a history: its new value needs a gradient
        buf.add_(x)
        return buf * 2

    for fn in (under_no_grad, seen_by_autograd):
        own, torchs, line = _traced_both_ways(monkeypatch, fn, torch.randn(4, requires_grad=True),
                                              torch.randn(4))
        assert line == OWN and own == torchs, fn.__name__


@pytest.mark.parametrize("name", ["view_mutated", "base_of_view_mutated", "metadata", "out"])
def test_what_the_tracer_leaves_to_functionalization(monkeypatch, name):
    def view_mutated(x):
        h = x * 2
        h[0].add_(1)
        return h

    def base_of_view_mutated(x):
        h = x * 2
        v = h.view(-1)
        h.add_(1)
        return v * 3

    def metadata(x):
        h = x * 2
        h.t_()
        return h

    def out(x):
        h = x.detach() * 2
        torch.mul(x.detach(), 3, out=h)
        return x * h

    fn = locals()[name]
    own, torchs, line = _traced_both_ways(monkeypatch, fn, torch.randn(3, 3, requires_grad=True))
    assert line != OWN and own == torchs


@pytest.mark.parametrize("of", ["input", "intermediate"])
def test_data_assignment_gets_a_clear_error(of):
    # functionalization would go on reading the old values: a silently wrong
    # result (torch's AOTAutograd gives one), so aotgrad refuses it
    def on_input(x, y):
        with torch.no_grad():
            y.data = x.detach() * 2
        return x * y

    def on_intermediate(x, y):
        h = x * 2
        h.data = y
        return h * 3

    fn = on_input if of == "input" else on_intermediate
    compiled = aotgrad.aot_function(fn, aotgrad.nop)
    with pytest.raises(RuntimeError, match=r"assigns a tensor's \.data"):
        compiled(torch.randn(3, requires_grad=True), torch.randn(3))


def _write_to_view_of_leaf(x):
    x[0].mul_(2)
    return x * 2


def _write_to_overlapping_memory(x):
    return (x * 2)[:1].expand(3, 3).add_(1)


def _fill_of_overlapping_memory(x):  # eager allows it; functionalization cannot write it back
    return (x * 2)[:1].expand(3, 3).fill_(1)


@pytest.mark.parametrize("own", [True, False], ids=["functionalizing_itself", "functionalized"])
@pytest.mark.parametrize("fn, error", [
    (_write_to_view_of_leaf, "a view of a leaf Variable that requires grad"),
    (_write_to_overlapping_memory, "more than one element of the written-to tensor"),
    (_fill_of_overlapping_memory, "aotgrad: in-place writes, fills included")])
def test_eager_errors_raised_by_either_trace(monkeypatch, fn, error, own):
    # Note [Eager's errors] (analyze.py): a functionalized trace runs a
    # checking mode; a trace without it leaves what could fail a check to one
    used = []

    class Checks(aotgrad.analyze.EagerChecks):
        def __init__(self, *args):
            used.append(1)
            super().__init__(*args)

    monkeypatch.setattr(aotgrad.analyze, "EagerChecks", Checks)
    monkeypatch.setattr(aotgrad.trace, "OWN_FUNCTIONALIZATION", own)
    x = torch.randn(3, 3, requires_grad=True)
    if fn is not _fill_of_overlapping_memory:
        with pytest.raises(RuntimeError, match=error):
            fn(x)
    with pytest.raises(RuntimeError, match=error):
        aotgrad.aot_function(fn, aotgrad.nop)(x)
    assert used or own


def test_no_checking_mode_when_the_tracer_functionalizes(monkeypatch):
    # Note [Eager's errors]: a mutation the tracer records itself needs no check
    monkeypatch.setattr(aotgrad.analyze, "EagerChecks", None)  # fails if used

    def fn(x, w):
        h = x @ w
        h.mul_(2)
        return h.relu_()

    assert _compiled_matches_eager(fn, torch.randn(3, 4), torch.randn(4, 4)) == 0


def _leaf_update_under_no_grad(x, w):
    with torch.no_grad():
        w.mul_(0.5)           # an input that requires grad, updated under no_grad
    return x @ w


def _index_ops(x, i):
    h = x * 2
    h.index_put_((i,), torch.ones(3))
    h.masked_fill_(h > 3, 0.0)
    h.scatter_(1, torch.zeros(4, 1, dtype=torch.long), 5.0)
    return h.sum(1)


def _fill_and_copy(x, b):
    h = x + 1
    h.zero_()
    h.copy_(b)                # broadcast from (3,)
    h.fill_(2).add_(x)
    return h


def _input_updated_then_viewed(x, buf):
    buf.add_(x.detach())
    return x * 2, buf.view(-1)


@pytest.mark.parametrize("fn, make", [
    (_leaf_update_under_no_grad, lambda: (torch.randn(2, 3, requires_grad=True),
                                          torch.randn(3, 3, requires_grad=True))),
    (_index_ops, lambda: (torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2]))),
    (_fill_and_copy, lambda: (torch.randn(4, 3, requires_grad=True), torch.randn(3))),
    (_input_updated_then_viewed, lambda: (torch.randn(2, 3, requires_grad=True),
                                          torch.zeros(2, 3))),
], ids=["leaf_update_under_no_grad", "index_ops", "fill_and_copy", "input_updated_then_viewed"])
def test_more_mutations_both_ways(monkeypatch, fn, make):
    """Compiled with the tracer's own functionalization and with torch's: the
    same as eager (outputs, inputs after the call, gradients) either way."""
    _traced_both_ways(monkeypatch, fn, *make())


def test_a_swallowed_not_functional_still_goes_to_functionalization():
    # the tracer's refusal raised inside the program is caught by the program;
    # remembered, it still sends the program to torch's functionalization
    def fn(x):
        h = x * 2
        v = h.view(-1)
        try:
            h.add_(1)         # h has a view: the tracer cannot functionalize it
        except Exception:     # noqa: BLE001 - what a careless program does
            pass
        return v * 3

    compiled = aotgrad.aot_function(fn, aotgrad.nop)
    x = torch.randn(2, 3, requires_grad=True)
    torch.testing.assert_close(compiled(x), fn(x))
    assert compiled.last_report.tracing == \
        "one run of the program, by the light tracer, under functionalization"


# Note [Straight to the fake mode]

def _fake_results(func, *args):
    """``func(*args)`` under a fake mode and the Python dispatcher (as the
    tracer runs), through the dispatcher and straight to the mode:
    (dispatcher's result, direct result)."""
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    run = _torch.fake_dispatcher(mode)
    with mode, _torch.enable_python_dispatcher():
        theirs = func(*fakes)
        mine = run(func, (type(fakes[0]),), tuple(fakes), {})
    return theirs, mine


@pytest.mark.parametrize("func, args", [
    (torch.ops.aten.native_layer_norm.default, (torch.randn(2, 4), [4], None, None, 1e-5)),
    (torch.ops.aten.split.Tensor, (torch.randn(5, 2), 2)),
    (torch.ops.aten.var_mean.correction, (torch.randn(3, 4), [0])),
    (torch.ops.aten.add_.Tensor, (torch.randn(3), torch.randn(3))),
    (torch.ops.aten.t.default, (torch.randn(3, 4),)),
], ids=["layer_norm", "split", "var_mean", "add_", "t"])
def test_straight_to_the_fake_mode_returns_what_the_dispatcher_returns(func, args):
    theirs, mine = _fake_results(func, *args)
    assert type(mine) is type(theirs)  # a Python meta's named tuple becomes a tuple
    flat_theirs, flat_mine = _torch.pytree.tree_leaves(theirs), _torch.pytree.tree_leaves(mine)
    assert [(t.shape, t.stride(), t.dtype, type(t)) for t in flat_mine] == \
        [(t.shape, t.stride(), t.dtype, type(t)) for t in flat_theirs]


def test_the_tracer_goes_straight_to_the_fake_mode(monkeypatch):
    calls = []
    make = _torch.fake_dispatcher

    def counting(mode):
        run = make(mode)

        def counted(func, *rest, **how):
            calls.append(func)
            return run(func, *rest, **how)
        return counted

    monkeypatch.setattr(_torch, "fake_dispatcher", counting)
    monkeypatch.setattr(fakes, "_MEMO", {})  # Note [A memo of fake results]: a fresh one
    fn, shapes = PROGRAMS["multi_output"]
    mine, theirs = _both(_functional(fn), shapes)
    assert _nodes(mine) == _nodes(theirs)
    assert torch.ops.aten.split.Tensor in calls
    assert [type(n.meta.get("val")) for n in mine.graph.nodes] == \
        [type(n.meta.get("val")) for n in theirs.graph.nodes]


def _recorded_twice(monkeypatch, programs):
    """Record each program twice with a fresh memo of fake results, under
    debug_assert (every hit checked against the fake mode); the memo's hits."""
    monkeypatch.setattr(fakes, "_MEMO", {})
    hits = []
    rebuild = fakes._rebuild

    def counted(entry, tensors, mode):
        hits.append(entry)
        return rebuild(entry, tensors, mode)

    monkeypatch.setattr(fakes, "_rebuild", counted)
    with aotgrad.config.patch(debug_assert=True):
        for fn, shapes in programs:
            for _ in range(2):
                mine, theirs = _both(_functional(fn), shapes)
                assert _nodes(mine) == _nodes(theirs)
    return hits


def test_the_memo_of_fake_results_rebuilds_what_the_fake_mode_makes(monkeypatch):
    # Note [A memo of fake results]: views, fresh results, several results
    hits = _recorded_twice(monkeypatch, PROGRAMS.values())
    kinds = {d[0] for _, described in hits for d in described if d is not None}
    assert kinds == {fakes._VIEW, fakes._FRESH}
    assert {kind for kind, _ in hits} >= {None, tuple, list}  # split, var_mean


def test_the_memo_check_catches_a_wrong_entry(monkeypatch):
    fn, shapes = PROGRAMS["pointwise"]
    _recorded_twice(monkeypatch, [(fn, shapes)])
    for key, (kind, described) in list(fakes._MEMO.items()):  # every stride reversed
        fakes._MEMO[key] = (kind, tuple((d[0], d[1], d[2][::-1], *d[3:]) for d in described))
    with aotgrad.config.patch(debug_assert=True), \
            pytest.raises(AssertionError, match="memo of fake results rebuilt"):
        _both(_functional(fn), shapes)


def test_the_memo_keeps_no_result_whose_input_is_ambiguous():
    # a result sharing the storage of two inputs: which one it views is unknown
    mode = FakeTensorMode()
    a, other = mode.from_tensor(torch.randn(4, 4)), mode.from_tensor(torch.randn(4, 4))
    with mode:
        a_t, row = a.t(), a[1]
    assert fakes._entry(row, [a, other], mode)[1][0][:2] == (fakes._VIEW, 0)
    assert fakes._entry(row, [other, a], mode)[1][0][:2] == (fakes._VIEW, 1)
    assert fakes._entry(a, [other, a], mode)[1][0] == (fakes._SAME, 1)
    assert fakes._entry(row, [a, a_t], mode) is fakes._NOT_KEPT
    assert fakes._entry(a, [a, a], mode) is fakes._NOT_KEPT


@pytest.mark.parametrize("scalars", [(2, 2.0), (2.0, 2)])
def test_the_memo_tells_scalar_types_and_the_default_dtype_apart(monkeypatch, scalars):
    monkeypatch.setattr(fakes, "_MEMO", {})
    mode = FakeTensorMode()
    x = mode.from_tensor(torch.arange(4))

    def dtypes():
        gm = record(lambda t: [t * s for s in scalars], [x], ["arg0_1"], None)
        return [n.meta["val"].dtype for n in gm.graph.nodes if n.op == "call_function"]

    eager = [(torch.arange(4) * s).dtype for s in scalars]
    assert dtypes() == dtypes() == eager  # the second run from the memo
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert dtypes() == [(torch.arange(4) * s).dtype for s in scalars] != eager
    finally:
        torch.set_default_dtype(before)


def test_an_op_with_a_dispatch_rule_for_the_fake_mode_keeps_it():
    lib = torch.library.Library("aotgrad_test_rule", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    ruled = []

    def rule(mode, func, types, args, kwargs):
        ruled.append(func)
        with mode:
            return torch.empty_like(args[0])

    torch.library.register_torch_dispatch("aotgrad_test_rule::twice", FakeTensorMode, rule, lib=lib)
    try:
        mode = FakeTensorMode()
        gm = record(lambda x: [torch.ops.aotgrad_test_rule.twice(x) + 1],
                    [mode.from_tensor(torch.randn(3))], ["x"], None)
        assert ruled == [torch.ops.aotgrad_test_rule.twice.default]
        assert "twice" in str(list(gm.graph.nodes))
    finally:
        lib._destroy()


@pytest.mark.parametrize("before", [None, 7])
def test_making_a_fake_mode_leaves_the_traceback_limit_alone(before):
    import sys
    if before is not None:
        sys.tracebacklimit = before
    try:
        mode = _torch.new_fake_mode(False)
        assert getattr(sys, "tracebacklimit", None) == before
        assert isinstance(mode, FakeTensorMode)
    finally:
        if hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit


# Note [Plain fakes]

def _described(f):
    if not isinstance(f, torch.Tensor):
        return f
    return (type(f), f.shape, f.stride(), f.dtype, f.device, f.requires_grad, f.is_leaf,
            f.storage_offset(), f.untyped_storage().nbytes(), f._is_view(),
            getattr(f, "_is_param", False))


def test_plain_fakes_are_what_from_tensor_makes():
    base = torch.randn(4, 4)
    values = [torch.nn.Parameter(torch.randn(3, 4)), torch.randn(3, requires_grad=True),
              torch.randn(2, 3, 4).permute(2, 0, 1).contiguous(), torch.randn(2, 3).t(),
              base, base[1:], torch.empty(0), torch.ones(2, dtype=torch.int64), 3, None]
    mode = _torch.new_fake_mode(False)
    mine = fakes_from_reals(mode, values, static=True)
    theirs_mode = FakeTensorMode()
    theirs = [theirs_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
    assert [_described(f) for f in mine] == [_described(f) for f in theirs]
    assert all(f.fake_mode is mode for f in mine if isinstance(f, torch.Tensor))
    # storage shared between inputs is kept (those two went through from_tensor)
    assert _torch.storage_of(mine[4]) == _torch.storage_of(mine[5])


def test_tensors_that_are_not_plain_go_through_from_tensor(monkeypatch):
    made = []
    real_fake_tensor = _torch.FakeTensor
    monkeypatch.setattr(_torch, "FakeTensor", lambda *a: made.append(a) or real_fake_tensor(*a))
    leaf = torch.randn(3, requires_grad=True)
    leaf.grad = torch.ones(3)
    shifted = torch.empty(0).set_(torch.randn(8).untyped_storage(), 2, (3,), (1,))
    mode = _torch.new_fake_mode(False)
    fakes = fakes_from_reals(mode, [leaf, shifted, torch.randn(2, 3)[0]], static=True)
    assert made == []  # none plain: all from from_tensor, which fakes .grad too
    assert fakes[0].grad is not None and fakes[1].storage_offset() == 2
    # a subclass among the inputs: all go through from_tensor
    from torch.testing._internal.two_tensor import TwoTensor
    fakes_from_reals(mode, [torch.randn(2), TwoTensor(torch.randn(2), torch.randn(2))],
                            static=True)
    assert made == []
    fakes_from_reals(mode, [torch.randn(2)], static=True)
    assert len(made) == 1


# ---------------------------------------------------------------- Note [Effect tokens]

EFFECTFUL = {
    "inv": lambda x: torch.linalg.inv(x),
    "cholesky": lambda x: torch.linalg.cholesky(x @ x.mT + torch.eye(3)),
    "solve": lambda x: torch.linalg.solve(x, x.sum(1, keepdim=True)),
    "tensorinv": lambda x: torch.linalg.tensorinv(x.reshape(3, 3), ind=1),
}


@pytest.mark.parametrize("name", sorted(EFFECTFUL))
def test_ops_with_an_effect_take_the_light_tracer(name):
    x = torch.randn(3, 3) + 3 * torch.eye(3)
    assert _compiled_matches_eager(EFFECTFUL[name], x) == 0


@pytest.mark.parametrize("grad", [True, False])
def test_the_effect_stays_in_the_graph(grad):
    """The error check of linalg.inv runs in the compiled forward, training
    or not (aotgrad's own graphs keep the op itself: a with_effects node
    whose token nobody reads would be dropped by dead-code elimination)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = aotgrad.aot_function(lambda x: torch.linalg.inv(x), keep, aotgrad.nop)
    compiled(torch.randn(3, 3, requires_grad=grad))
    targets = [n.target for n in graphs[0].graph.nodes]
    # Note [Effect tokens in compiled graphs] (tokens.py): chained through a token
    assert [n.args[1] for n in graphs[0].graph.find_nodes(
        op="call_function", target=torch.ops.higher_order.with_effects)] == \
        [torch.ops.aten._linalg_check_errors.default]
    assert torch.ops.prims._sink_tokens.default in targets
    assert torch.ops.aten._make_dep_token.default not in targets
    with pytest.raises(torch.linalg.LinAlgError, match="linalg.inv"):
        compiled(torch.zeros(3, 3, requires_grad=grad))


def test_effects_traced_by_make_fx_lose_their_tokens():
    """dynamic=True: make_fx traces, with a token input of its own; the
    graph is rewritten as the light tracer records it (Note [Effect tokens])."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    before = counters["aotgrad"]["traced_by_make_fx"]
    fn = EFFECTFUL["solve"]
    compiled = aotgrad.aot_function(fn, keep, aotgrad.nop, dynamic=True)
    for n in (3, 5):
        x = (torch.randn(n, n) + 3 * torch.eye(n)).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, ref = compiled(x), fn(x2)
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
    assert counters["aotgrad"]["traced_by_make_fx"] > before
    # make_fx's token input is gone; the compiled graph makes its own (Note
    # [Effect tokens in compiled graphs], tokens.py)
    graph = graphs[0].graph
    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    assert not [x for x in placeholders if "token" in x], placeholders
    (effect,) = graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    assert effect.args[1] is torch.ops.aten._linalg_check_errors.default
    assert effect.args[0].target is torch.ops.prims._make_token.default
    with pytest.raises(torch.linalg.LinAlgError):
        compiled(torch.zeros(4, 4, requires_grad=True))


def test_a_print_runs_at_every_call(capfd):
    def fn(x):
        torch.ops.aten._print("effect")
        return x.sin()
    compiled = aotgrad.aot_function(fn, aotgrad.nop)
    capfd.readouterr()
    for _ in range(2):
        compiled(torch.randn(3, requires_grad=True)).sum().backward()
    assert capfd.readouterr().out.count("effect") == 2


def test_other_higher_order_ops_go_to_make_fx():
    mode = FakeTensorMode()
    x = mode.from_tensor(torch.randn(3))
    cond = torch.ops.higher_order.cond
    with pytest.raises(NeedsMakeFx, match="higher-order op cond"):
        record(lambda t: [cond(t.sum() > 0, lambda u: u.sin(), lambda u: u.cos(), (t,))],
               [x], ["arg0_1"], None)


def test_a_view_before_a_metadata_change_gets_a_clear_error():
    # found by the fuzzer: the backward replays v1's view after a's transpose_
    # (PyTorch's AOTAutograd fails it with the same ValueError underneath)
    def f(a):
        v1 = a.view(1, 4, 1)
        v1.add_(1)
        v2 = v1.sin()
        a.transpose_(0, 1)
        return (v2,)

    x = torch.randn(2, 2, requires_grad=True)
    f(x.clone())  # fine in eager
    with pytest.raises(RuntimeError, match="in-place metadata change of its base"):
        aotgrad.aot_function(f, aotgrad.nop)(x.clone())
