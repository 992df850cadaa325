"""Higher-order backward through compiled functions (Note [Higher-order backward],
aotgrad/higher_order.py): gradients of gradients, each compared with eager in float64."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import aotgrad
from aotgrad import aot_function, aot_module, aot_module_simplified, nop
from aotgrad.partition import min_cut_rematerialization_partition

D = torch.float64
assert_close = torch.testing.assert_close


def leaf(*shape, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=D, requires_grad=True)


def mlp(x, w1, b1, w2, b2):
    """A 2-layer tanh MLP, energy-like scalar output per row."""
    return torch.tanh(torch.tanh(x @ w1 + b1) @ w2 + b2)


class MLP(nn.Module):
    def __init__(self, d_in=3, d_hidden=5, d_out=2):
        super().__init__()
        self.l1 = nn.Linear(d_in, d_hidden, dtype=D)
        self.l2 = nn.Linear(d_hidden, d_out, dtype=D)

    def forward(self, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(x))))


def mlp_args(n=4, seed=0):
    torch.manual_seed(seed)
    return [leaf(n, 3), leaf(3, 5), leaf(5), leaf(5, 2), leaf(2)]


def three_orders(fn, args):
    """First, second and third derivatives (each a list over ``args``)."""
    y = fn(*args).sum()
    g = torch.autograd.grad(y, args, create_graph=True, allow_unused=True)
    s = sum((gi ** 2).sum() for gi in g if gi is not None)
    h = torch.autograd.grad(s, args, create_graph=True, allow_unused=True)
    k = torch.autograd.grad(sum(hi.sin().sum() for hi in h if hi is not None), args,
                            allow_unused=True)
    return [*g, *h, *k]   # None where eager's is None too (assert_all_close)


def assert_all_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


class Counting:
    """A compiler (nop underneath) that counts the graphs it compiles."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return nop(gm, example_inputs)


# ---------------------------------------------------------------- MLP, orders 2 and 3

@pytest.mark.parametrize("dynamic", [False, True])
def test_mlp_second_and_third_order_aot_function(dynamic):
    fw, bw = Counting(), Counting()
    compiled = aot_function(mlp, fw, bw, dynamic=dynamic)
    for n in (4, 6):
        args = mlp_args(n)
        assert_all_close(three_orders(compiled, args), three_orders(mlp, args))
    # each level is a program compiled by the user's compilers: the function, its
    # differentiable backward, and that one's
    assert fw.graphs >= 3 and bw.graphs >= 3


def _module_orders(call, model, x):
    params = [x, *model.parameters()]
    return three_orders(lambda *_: call(x), params)


def test_mlp_second_and_third_order_aot_module():
    model = MLP()
    compiled = aot_module(model, nop)
    for n in (4, 6):
        x = leaf(n, 3, seed=n)
        assert_all_close(_module_orders(compiled, model, x), _module_orders(model, model, x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_mlp_second_and_third_order_torch_compile(backend, dynamic):
    torch._dynamo.reset()
    model = MLP()
    compiled = torch.compile(model, backend=getattr(aotgrad.backends, backend), dynamic=dynamic)
    for n in (4, 6):
        x = leaf(n, 3, seed=n)
        assert_all_close(_module_orders(compiled, model, x), _module_orders(model, model, x))


def test_aot_module_simplified_double_backward():
    model = MLP()
    x = leaf(4, 3, seed=1)
    compiled = aot_module_simplified(model, [x], nop)
    assert_all_close(_module_orders(lambda x: compiled(x), model, x),
                     _module_orders(model, model, x))


# ---------------------------------------------------------------- gradcheck

def test_gradcheck_and_gradgradcheck():
    compiled = aot_function(mlp, nop)
    args = mlp_args(3)
    assert torch.autograd.gradcheck(compiled, args)
    assert torch.autograd.gradgradcheck(compiled, args)


def test_gradgradcheck_min_cut_and_module():
    compiled = aot_function(lambda x, w: (x @ w).sin().exp() * x.sum(), nop,
                            partition_fn=min_cut_rematerialization_partition)
    args = [leaf(3, 4, seed=2), leaf(4, 2)]
    assert torch.autograd.gradgradcheck(compiled, args)
    model = MLP()
    mod = aot_module(model, nop)
    assert torch.autograd.gradgradcheck(mod, [leaf(2, 3, seed=3)])


# ---------------------------------------------------------------- models that need it

def _wgan_gp_step(critic, params, real, fake, eps):
    interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(interp)
    (g,) = torch.autograd.grad(out.sum(), interp, create_graph=True)
    penalty = ((g.norm(2, dim=1) - 1) ** 2).mean()
    loss = out.mean() - critic(fake).mean() + 10 * penalty
    loss.backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("how", ["aot_module", "aot_eager"])
def test_wgan_gp_critic_step(how):
    critic = MLP(3, 8, 1)
    eager_critic = copy.deepcopy(critic)
    if how == "aot_module":
        compiled = aot_module(critic, nop)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(critic, backend=aotgrad.backends.aot_eager)
    torch.manual_seed(4)
    real, fake = torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)
    eps = torch.rand(6, 1, dtype=D)
    got = _wgan_gp_step(compiled, list(critic.parameters()), real, fake, eps)
    want = _wgan_gp_step(eager_critic, list(eager_critic.parameters()), real, fake, eps)
    assert_all_close(got, want)


def _functional_mlp(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def _maml_step(model, params, xs, ys, xq, yq, lr=0.1):
    inner = F.mse_loss(model(params, xs), ys)
    grads = torch.autograd.grad(inner, params, create_graph=True)
    fast = [p - lr * g for p, g in zip(params, grads)]
    inner2 = F.mse_loss(model(fast, xs), ys)      # a second inner step
    grads2 = torch.autograd.grad(inner2, fast, create_graph=True)
    fast = [p - lr * g for p, g in zip(fast, grads2)]
    outer = F.mse_loss(model(fast, xq), yq)
    outer.backward()
    return [p.grad.clone() for p in params]


def test_maml_inner_and_outer_step():
    compiled = aot_function(_functional_mlp, nop)
    torch.manual_seed(5)
    xs, ys, xq, yq = (torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D),
                      torch.randn(7, 3, dtype=D), torch.randn(7, 2, dtype=D))
    params = [leaf(3, 5), leaf(5), leaf(5, 2), leaf(2)]
    eager_params = [p.detach().clone().requires_grad_() for p in params]
    got = _maml_step(compiled, params, xs, ys, xq, yq)
    want = _maml_step(_functional_mlp, eager_params, xs, ys, xq, yq)
    assert_all_close(got, want)


def test_hessian_vector_product():
    def f(x, w):
        return ((x @ w).tanh() ** 2).sum() + (x ** 3).sum()

    compiled = aot_function(f, nop)
    x, w = leaf(4, 3, seed=6), leaf(3, 3)
    v = torch.randn(4, 3, dtype=D)

    def hvp(fn):
        (g,) = torch.autograd.grad(fn(x, w), x, create_graph=True)
        return torch.autograd.grad(g, x, v)[0]

    assert_close(hvp(compiled), hvp(f))
    hessian = torch.autograd.functional.hessian(lambda x: f(x, w), x)
    assert_close(hvp(compiled), (hessian.reshape(12, 12) @ v.reshape(12)).reshape(4, 3))


class Energy(nn.Module):
    """A pairwise energy of 3-d positions (a tiny force field)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8, dtype=D), nn.Tanh(), nn.Linear(8, 1, dtype=D))

    def forward(self, pos):
        diff = pos[:, None, :] - pos[None, :, :]
        dist = (diff.pow(2).sum(-1) + 1e-3).sqrt()
        return self.net(dist.unsqueeze(-1)).sum()


def _force_step(model, params, pos, target_e, target_f):
    pos = pos.clone().requires_grad_(True)
    energy = model(pos)
    (g,) = torch.autograd.grad(energy, pos, create_graph=True)
    forces = -g
    loss = (energy - target_e) ** 2 + ((forces - target_f) ** 2).mean()
    loss.backward()
    return [p.grad.clone() for p in params] + [forces.detach()]


@pytest.mark.parametrize("how", ["aot_module", "inductor"])
def test_energy_forces_training_step(how):
    model = Energy()
    eager_model = copy.deepcopy(model)
    if how == "aot_module":
        compiled = aot_module(model, nop)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=aotgrad.backends.inductor)
    torch.manual_seed(7)
    pos, target_f = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D)
    target_e = torch.tensor(0.5, dtype=D)
    got = _force_step(compiled, list(model.parameters()), pos, target_e, target_f)
    want = _force_step(eager_model, list(eager_model.parameters()), pos, target_e, target_f)
    assert_all_close(got, want)


# ---------------------------------------------------------------- what the backward keeps

def test_inputs_not_requiring_grad_and_outputs_aliasing_inputs():
    def f(x, w, c):
        return (x @ w).sin() * c, w.view(-1), x.t()

    compiled = aot_function(f, nop)
    x, w, c = leaf(3, 4, seed=8), leaf(4, 2), torch.randn(3, 2, dtype=D)

    def orders(fn):
        a, wv, xt = fn(x, w, c)
        y = a.sum() + (wv ** 2).sum() + (xt ** 3).sum()
        g = torch.autograd.grad(y, [x, w], create_graph=True)
        return [*g, *torch.autograd.grad(sum((gi ** 2).sum() for gi in g), [x, w])]

    assert_all_close(orders(compiled), orders(f))


def test_retain_graph_then_create_graph_and_freeing():
    compiled = aot_function(lambda x, b: (x * 2 + b).sin().sum(), nop)
    x = leaf(3, seed=9)
    b = leaf(3) * 1.0     # not a leaf: only aotgrad's ctx could keep it alive
    out = compiled(x, b)
    eager = (x * 2 + b).sin().sum()
    torch.autograd.grad(out, [x, b], retain_graph=True)
    g = torch.autograd.grad(out, [x, b], create_graph=True)
    ge = torch.autograd.grad(eager, [x, b], create_graph=True)
    assert_all_close(torch.autograd.grad(sum(gi.sum() for gi in g), [x]),
                     torch.autograd.grad(sum(gi.sum() for gi in ge), [x]))
    # a first-order backward that does not keep the graph lets go of the inputs
    out = compiled(x, b)
    ref = weakref.ref(b)
    out.backward()
    del b
    gc.collect()
    assert ref() is None and out.grad_fn is not None


def test_input_changed_after_the_forward_is_an_error():
    compiled = aot_function(lambda x, b: (x * 2 + b).sin().sum(), nop)
    x, b = leaf(3, seed=10), leaf(3) * 1.0
    out = compiled(x, b)
    with torch.no_grad():
        b.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, [x], create_graph=True)


def test_batch_norm_running_stats_are_updated_once():
    model = nn.Sequential(nn.Linear(3, 4, dtype=D), nn.BatchNorm1d(4, dtype=D), nn.Tanh(),
                          nn.Linear(4, 1, dtype=D))
    eager = copy.deepcopy(model)
    compiled = aot_module(model, nop)
    x = leaf(6, 3, seed=11)
    got = _module_orders(compiled, model, x)
    want = _module_orders(eager, eager, x)
    assert_all_close(got, want)
    assert_close(model[1].running_mean, eager[1].running_mean)
    assert_close(model[1].running_var, eager[1].running_var)
    assert model[1].num_batches_tracked.item() == eager[1].num_batches_tracked.item() == 1


def test_saved_tensor_hooks():
    calls = []

    def pack(t):
        calls.append(1)
        return t * 1

    def unpack(t):
        return t

    compiled = aot_function(mlp, nop)
    args = mlp_args(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        got = three_orders(compiled, args)
        want = three_orders(mlp, args)
    assert_all_close(got, want)
    assert calls


def test_memory_budget_applies_at_each_level():
    partitions = []

    def partition(joint, inputs, **kw):
        partitions.append(joint)
        return min_cut_rematerialization_partition(joint, inputs, **kw)

    compiled = aot_function(mlp, nop, partition_fn=partition)
    args = mlp_args(4)
    with aotgrad.config.patch(activation_memory_budget=0.3):
        assert_all_close(three_orders(compiled, args), three_orders(mlp, args))
    assert len(partitions) >= 3   # the function, its backward, and that one's


# ---------------------------------------------------------------- refused, clearly

def test_random_ops_are_refused_when_differentiated():
    def f(x, w):
        return F.dropout(x @ w, 0.5).tanh().sum()

    compiled = aot_function(f, nop)
    x, w = leaf(4, 3, seed=12), leaf(3, 5)
    torch.manual_seed(0)
    g = torch.autograd.grad(compiled(x, w), [x, w], create_graph=True)
    torch.manual_seed(0)
    ge = torch.autograd.grad(f(x, w), [x, w], create_graph=True)
    assert_all_close(g, ge)           # the gradients themselves are right
    assert g[0].requires_grad
    with pytest.raises(RuntimeError, match="random op.*native_dropout"):
        torch.autograd.grad(g[0].sum(), x)


def test_mutation_whose_old_value_the_gradients_read_is_refused():
    def f(buf, w):
        buf.add_(1)       # a second run would add 1 again: refused
        return (buf * w).sin().sum()

    compiled = aot_function(f, nop)
    buf, w = torch.randn(3, dtype=D), leaf(3, seed=13)
    buf_e = buf.clone()
    (g,) = torch.autograd.grad(compiled(buf, w), w, create_graph=True)
    (ge,) = torch.autograd.grad(f(buf_e, w), w, create_graph=True)
    assert_close(g, ge)
    assert_close(buf, buf_e)
    with pytest.raises(RuntimeError, match="value input 0 had before the program mutated it"):
        g.sum().backward()


def test_program_that_reads_a_value_double_backward():
    # Note [Values read while tracing]: the second program answers the reads as the first
    def f(x, w):
        y = (x @ w).tanh()
        return y * 2 if bool(x.sum() > 0) else y * 3

    compiled = aot_function(f, nop)
    for sign in (1, -1):
        args = [(leaf(3, 4, seed=14).abs() * sign).detach().requires_grad_(), leaf(4, 2)]
        assert_all_close(three_orders(compiled, args), three_orders(f, args))


def test_symbolic_size_inputs_under_torch_compile():
    torch._dynamo.reset()

    def f(x, w):
        return (x.reshape(x.shape[0] * 2, -1) @ w).tanh()

    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager, dynamic=True)
    for n in (2, 3):
        args = [leaf(n, 6, seed=n), leaf(3, 2)]
        assert_all_close(three_orders(compiled, args), three_orders(f, args))


def test_subclass_inputs_are_refused_when_differentiated():
    from torch.testing._internal.two_tensor import TwoTensor

    def f(x):
        return (x.sin() * x).sum()

    compiled = aot_function(f, nop)
    a, b = leaf(3, seed=15), leaf(3)
    x = TwoTensor(a.detach(), b.detach()).requires_grad_(True)
    (g,) = torch.autograd.grad(compiled(x), x, create_graph=True)
    (ge,) = torch.autograd.grad(f(x), x, create_graph=True)
    assert_close(g.a, ge.a)
    assert_close(g.b, ge.b)
    with pytest.raises(RuntimeError, match="tensor subclass inputs or outputs"):
        torch.autograd.grad(g.sum(), x)


def test_backward_writes_are_refused_when_differentiated():
    class WritesSaved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(y)
            return x * y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            y.mul_(2)   # Note [Mutations in the backward]
            return g * y, None

    def f(x, y):
        return WritesSaved.apply(x, y).sin().sum()

    compiled = aot_function(f, nop)
    x, y = leaf(3, seed=16), torch.randn(3, dtype=D)
    y_e = y.clone()
    (g,) = torch.autograd.grad(compiled(x, y), x, create_graph=True)
    (ge,) = torch.autograd.grad(f(x, y_e), x, create_graph=True)
    assert_close(g, ge)
    assert_close(y, y_e)
    with pytest.raises(RuntimeError, match="its backward writes in place"):
        torch.autograd.grad(g.sum(), x)


def test_program_loaded_from_the_disk_cache(tmp_path):
    from torch._dynamo.utils import counters
    from aotgrad import AOTAutogradCache

    counters.clear()
    model = MLP()
    gm = torch.fx.symbolic_trace(model)
    x = leaf(4, 3, seed=17)
    with aotgrad.config.patch(enable_autograd_cache=True, cache_dir=str(tmp_path)):
        AOTAutogradCache.clear()
        aot_module_simplified(gm, [x], nop)
        AOTAutogradCache._memory.clear()   # as in a new process: built from the disk entry
        compiled = aot_module_simplified(gm, [x], nop)
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        got = _module_orders(lambda x: compiled(x), model, x)
        AOTAutogradCache.clear()
    assert_all_close(got, _module_orders(model, model, x))


# ---------------------------------------------------------------- Note [Wanted gradients]

class Recording:
    """A compiler (nop underneath) that keeps the forward graphs it compiles."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return nop(gm, example_inputs)


def test_only_the_wanted_gradients_are_computed():
    """grad(y, x, create_graph=True) computes the gradients of the inputs that
    are not leaves only when they are wanted; each set has
    its own second program, and every value is eager's."""
    def f(a, b):
        return (a * b).sin().sum()

    fw = Recording()
    compiled = aot_function(f, fw, nop)
    a, b = leaf(6, seed=11), leaf(6)

    def second(fn, wrt):
        x, y = a * 1.0, b * 1.5     # not leaves
        out = fn(x, y) if wrt != "leaves" else fn(a, b)
        wrt = {"x": [x], "y": [y], "xy": [x, y], "leaves": [a]}[wrt]
        g = torch.autograd.grad(out, wrt, create_graph=True)
        return [*g, *torch.autograd.grad(sum((gi ** 2).sum() for gi in g), [a, b])]

    def ops(gm):
        return sum(n.op == "call_function" for n in gm.graph.nodes)

    assert_all_close(second(compiled, "x"), second(f, "x"))
    only_x = ops(fw.graphs[-1])   # the second program's forward
    assert_all_close(second(compiled, "y"), second(f, "y"))
    only_y = ops(fw.graphs[-1])
    n = len(fw.graphs)
    assert_all_close(second(compiled, "x"), second(f, "x"))
    assert len(fw.graphs) == n    # the same set again: the same second program
    assert_all_close(second(compiled, "xy"), second(f, "xy"))
    both = ops(fw.graphs[-1])
    assert len(fw.graphs) == n + 1   # one more second program, for (x, y)
    assert only_x < both and only_y < both    # the unwanted gradient's mul is not there
    assert_all_close(second(compiled, "leaves"), second(f, "leaves"))

    # backward(inputs=...), and .backward() (every gradient)
    for fn in (compiled, f):
        a.grad = b.grad = None
        (g,) = torch.autograd.grad(fn(a, b), [b], create_graph=True)
        (g ** 3).sum().backward(inputs=[a])
        want = a.grad.clone() if fn is f else None
        got = a.grad.clone() if fn is compiled else got
    assert_close(got, want)


def test_wanted_gradients_of_leaves_as_the_asked_set_changes():
    """Note [Wanted gradients]: a leaf's gradient is computed only when
    autograd.grad asks for it (a weight's is not, for a gradient penalty);
    a leaf asked for at its last ask is taken as wanted without asking, so a
    changing set must still give eager's values every time: never a
    gradient left out that is asked for (a wrong value), at worst one more."""
    def f(a, b, c):
        return ((a * b).sin() * c).sum()

    fw = Recording()
    compiled = aot_function(f, fw, nop)
    a, b, c = leaf(6, seed=13), leaf(6), leaf(6)
    names = {"a": a, "b": b, "c": c}

    def step(fn, asked, allow_unused=False):
        g = torch.autograd.grad(fn(a, b, c), [names[k] for k in asked], create_graph=True,
                                allow_unused=allow_unused)
        return [*g, *torch.autograd.grad(sum((gi ** 2).sum() for gi in g), [a, b, c],
                                         allow_unused=True)]

    def ops(gm):
        return sum(n.op == "call_function" for n in gm.graph.nodes)

    assert_all_close(step(compiled, "a"), step(f, "a"))
    only_a = ops(fw.graphs[-1])
    assert_all_close(step(compiled, "abc"), step(f, "abc"))
    assert ops(fw.graphs[-1]) > only_a     # b's and c's gradients are computed now
    for asked in ("b", "a", "c", "ab", "bc", "abc", "a", "c"):
        assert_all_close(step(compiled, asked), step(f, asked))
    for asked in ("a", "ca", "b"):
        assert_all_close(step(compiled, asked, True), step(f, asked, True))
    for fn in (compiled, f):                 # .backward(): every leaf accumulates
        a.grad = b.grad = c.grad = None
        (g,) = torch.autograd.grad(fn(a, b, c), [a], create_graph=True)
        (g ** 2).sum().backward()
        got, want = ([a.grad, b.grad, c.grad], None) if fn is compiled else (got, [a.grad, b.grad, c.grad])
    assert_all_close(got, want)


def test_wanted_gradients_with_retain_graph_and_a_non_tensor_input():
    def f(a, k, b):
        return (a.cos() * b * k).sum()

    compiled = aot_function(f, nop)
    a, b = leaf(5, seed=12), leaf(5)
    results = []
    for fn in (compiled, f):
        out = fn(a, 3, b)
        ga = torch.autograd.grad(out, a, create_graph=True, retain_graph=True)
        gb = torch.autograd.grad(out, b, create_graph=True)
        s = (ga[0] * gb[0]).sum()
        results.append([*ga, *gb, *torch.autograd.grad(s, [a, b])])
    assert_all_close(*results)


def test_grad_with_create_graph_inside_a_compiled_function():
    """autograd runs the compiled backward inside the torch.compile'd frame
    (``autograd.grad`` after dynamo's graph break): dynamo must not trace
    aotgrad's backward (it did: InternalTorchDynamoError)."""
    def f(x):
        y = (x.sin() * x).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        return (g * g).sum()

    torch._dynamo.reset()
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    want = f(x)
    (want_grad,) = torch.autograd.grad(want, x)
    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager)
    x2 = x.detach().clone().requires_grad_()
    got = compiled(x2)
    (got_grad,) = torch.autograd.grad(got, x2)
    torch.testing.assert_close((got, got_grad), (want, want_grad))
    torch._dynamo.reset()


@pytest.mark.parametrize("partition", ["default", "min_cut"])
def test_the_second_program_reads_the_first_programs_saved_values(partition):
    """Note [Saved values in the second program] (reuse.py): the saved values
    of the first forward are inputs of the second program, not recomputed
    (the tanh of each layer here); second and third order as eager's, and a
    gradient penalty w.r.t. the input too."""
    fw = Recording()
    kwargs = {} if partition == "default" else {
        "partition_fn": min_cut_rematerialization_partition}
    compiled = aot_function(mlp, fw, nop, **kwargs)
    args = mlp_args(seed=21)
    assert_all_close(three_orders(compiled, args), three_orders(mlp, args))
    # graphs: first forward, then the second program's forward (recompiled for
    # the third order's program afterwards)
    second = fw.graphs[1]
    tanh = [n for n in second.graph.nodes if n.target is torch.ops.aten.tanh.default]
    assert not tanh, second.code
    x = args[0]
    for fn in (compiled, mlp):
        x.grad = None
        (g,) = torch.autograd.grad(fn(*args).sum(), x, create_graph=True)
        ((g.norm(dim=1) - 1) ** 2).sum().backward()
        got, want = (x.grad, None) if fn is compiled else (got, x.grad)
    assert_close(got, want)


def test_create_graph_under_torch_compile_with_a_size_input():
    """Note [Saved values in the second program]: dynamo passes a symbolic
    size as a graph input; the second program gets it as a plain int (not an
    input of its own), so its inputs' indices were off by one and a zero
    gradient stood in for a saved value (a wrong first-order gradient under
    create_graph=True; found by a fuzzer).  Such programs recompute."""
    def f(x0, x1):
        t0 = torch.exp(x1)
        x0.transpose(0, 1)
        t3 = t0.unbind(0)[-1]
        return t3.unsqueeze(0).expand(2, 4), torch.exp(t0[::2])

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager, dynamic=True)
    results = []
    for fn in (f, compiled):
        leaf = torch.linspace(-1, 1, 16, dtype=D).reshape(4, 4).requires_grad_()
        out = fn(torch.zeros(3, 4, dtype=D), leaf * 1.0)[1]
        (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
        results.append([g, *torch.autograd.grad((g ** 2).sum(), leaf)])
    assert_all_close(*results)


class _ProductAndSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b, a + b

    @staticmethod
    def backward(ctx, g0, g1):
        a, b = ctx.saved_tensors
        return g0 * b * a + g1, g0 * a


def test_a_custom_function_dynamo_traced_is_refused_not_detached():
    """Note [Higher-order backward]: under torch.compile dynamo traces a
    custom Function into ``autograd_function_apply``, whose backward graph
    runs with grad mode off.  Its create_graph gradients came back detached
    (the second-order terms silently dropped); now they are exact and
    differentiating them raises, naming the reason.  aot_function, which
    runs the Function itself, differentiates it twice as eager does."""
    torch._dynamo.reset()

    def f(x, y):
        return _ProductAndSum.apply(x, y)

    def grads(fn):
        x = torch.ones(4, requires_grad=True)
        y = torch.full((4,), 2.0, requires_grad=True)
        gx, gy = torch.autograd.grad(fn(x, y)[0].sum(), (x, y), create_graph=True)
        return x, y, gx, gy

    x, y, gx, gy = grads(f)
    (gx.pow(2).sum() + gy.pow(2).sum()).backward()
    want = (gx.detach(), gy.detach(), x.grad, y.grad)
    cx, cy, cgx, cgy = grads(torch.compile(f, backend=aotgrad.backends.aot_eager))
    torch.testing.assert_close((cgx.detach(), cgy.detach()), want[:2])
    assert cgx.requires_grad and cgy.requires_grad
    with pytest.raises(RuntimeError, match="dynamo traced"):
        (cgx.pow(2).sum() + cgy.pow(2).sum()).backward()
    ax, ay, agx, agy = grads(aotgrad.aot_function(f, aotgrad.nop))
    (agx.pow(2).sum() + agy.pow(2).sum()).backward()
    torch.testing.assert_close((ax.grad, ay.grad), want[2:])


def test_double_backward_reading_a_python_float_under_dynamic_compile():
    """torch.compile(dynamic=True) passes a Python float as a 0-d tensor the
    graph reads with ``.item()``; the second program is specialised on the
    value it reads (Note [Values read while tracing]) -- its recording runs
    the program under autograd, which functionalize's tensors do not carry."""
    torch._dynamo.reset()

    def f(x, a):
        return (x.sin() * a).pow(2).sum()

    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager, dynamic=True)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def second(fn, a):
        (g,) = torch.autograd.grad(fn(x, a), x, create_graph=True)
        return g, torch.autograd.grad(g.square().sum(), x)[0]

    for a in (0.3, 0.7, 0.3, -1.5):
        torch.testing.assert_close(second(compiled, a), second(f, a))


def test_a_nested_compile_region_is_refused_for_double_backward_under_compile():
    """Under torch.compile a nested_compile_region is an invoke_subgraph node,
    whose backward torch cannot differentiate again: the first-order gradient
    is exact and differentiating it raises, naming the reason (it crashed in
    torch's invoke_subgraph backward); aot_function differentiates it twice."""
    @torch.compiler.nested_compile_region
    def block(x, w):
        return (x @ w).sin() * x

    def f(x, w):
        return block(block(x, w), w)

    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aotgrad.backends.aot_eager, fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x, w).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(f(x, w).sum(), x, create_graph=True)
    torch.testing.assert_close(g, want)
    with pytest.raises(RuntimeError, match="nested_compile_region"):
        torch.autograd.grad(g.square().sum(), x)
    (g,) = torch.autograd.grad(aot_function(f, nop)(x, w).sum(), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g.square().sum(), x),
                               torch.autograd.grad(want.square().sum(), x))
