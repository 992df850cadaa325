"""Tests for aotgrad.partition.mincut (Note [Min-cut rematerialization]).

Each model runs three ways: eager, compiled with ``default_partition`` and
compiled with ``min_cut_rematerialization_partition``; outputs and gradients
must agree, min-cut must save no more bytes than default, and it must never
recompute a matmul or a random op in the backward.
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import aotgrad
from aotgrad.descriptors import Saved
from aotgrad import min_cut_rematerialization_partition
from aotgrad.partition import FlowNetwork, is_cheap_to_recompute, saved_tensor_bytes
from aotgrad import default_partition

aten = torch.ops.aten
RANDOM_OPS = {aten.native_dropout, aten.bernoulli, aten.rand_like, aten.rand, aten.randn,
              aten.randn_like, aten.uniform, aten.normal}
MATMUL_OPS = {aten.mm, aten.bmm, aten.addmm, aten.matmul, aten.baddbmm}


class Compiled:
    """One compiled run: outputs, gradients, and the forward/backward graphs."""

    def __init__(self, out, grads, fw_gm: fx.GraphModule, bw_gm: fx.GraphModule):
        self.out, self.grads, self.fw_gm, self.bw_gm = out, grads, fw_gm, bw_gm

    @property
    def saved(self) -> list[fx.Node]:
        out = self.fw_gm.graph.output_node()
        return [v for v, d in zip(out.args[0], out.meta["desc"]) if isinstance(d, Saved)]

    @property
    def saved_bytes(self) -> int:
        return saved_tensor_bytes(self.saved)

    def count(self, packets) -> int:
        return sum(1 for n in self.bw_gm.graph.nodes
                   if getattr(n.target, "overloadpacket", None) in packets)


def _recording_compiler(graphs: list):
    return aotgrad.make_boxed_compiler(lambda gm, inps: (graphs.append(gm), gm)[1])


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def run_fn(fn, args, partition_fn=None, seed=0):
    """Call ``fn`` eagerly (partition_fn None) or compiled; backward of sum()."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    graphs: list = []
    if partition_fn is not None:
        rec = _recording_compiler(graphs)
        fn = aotgrad.aot_function(fn, rec, rec, partition_fn=partition_fn)
    torch.manual_seed(seed)
    out = fn(*args)
    out.sum().backward()
    grads = [a.grad for a in _leaves(args)]
    if partition_fn is None:
        return out.detach(), grads
    return Compiled(out.detach(), grads, *graphs)


def run_module(mod, x, partition_fn=None, seed=0):
    mod = copy.deepcopy(mod)
    x = x.detach().clone().requires_grad_(True)
    graphs: list = []
    call = mod
    if partition_fn is not None:
        rec = _recording_compiler(graphs)
        call = aotgrad.aot_module(mod, rec, rec, partition_fn=partition_fn)
    torch.manual_seed(seed)
    out = call(x)
    out.sum().backward()
    grads = [x.grad] + [p.grad for p in mod.parameters()]
    if partition_fn is None:
        return out.detach(), grads
    return Compiled(out.detach(), grads, *graphs)


def check_against_eager(eager, default: Compiled, mincut: Compiled, atol=1e-5):
    """Same outputs and gradients; min-cut saves no more bytes and recomputes
    no matmul or random op."""
    e_out, e_grads = eager
    for got in (default, mincut):
        torch.testing.assert_close(got.out, e_out, atol=atol, rtol=1e-4)
        assert len(got.grads) == len(e_grads)
        for g, e in zip(got.grads, e_grads):
            torch.testing.assert_close(g, e, atol=atol, rtol=1e-4)
    assert mincut.saved_bytes <= default.saved_bytes
    assert mincut.count(MATMUL_OPS) == default.count(MATMUL_OPS)
    assert mincut.count(RANDOM_OPS) == 0
    return mincut


def compare_fn(fn, *args, seed=0):
    eager = run_fn(fn, args, None, seed)
    default = run_fn(fn, args, default_partition, seed)
    mincut = run_fn(fn, args, min_cut_rematerialization_partition, seed)
    check_against_eager(eager, default, mincut)
    return default, mincut


def compare_module(mod, x, seed=0, atol=1e-5):
    eager = run_module(mod, x, None, seed)
    default = run_module(mod, x, default_partition, seed)
    mincut = run_module(mod, x, min_cut_rematerialization_partition, seed)
    check_against_eager(eager, default, mincut, atol)
    return default, mincut


def _names(nodes):
    return [n.name for n in nodes]

# ---------------------------------------------------------------- models


def test_note_example():
    # Note [Min-cut rematerialization]: default saves (primals_1, mul); min-cut
    # saves primals_1 and recomputes sin and mul.
    default, mincut = compare_fn(lambda x: (x.sin() * 2).cos().sum(),
                                 torch.randn(3, requires_grad=True))
    assert _names(default.saved) == ["primals_1", "mul"]
    assert _names(mincut.saved) == ["primals_1"]
    assert mincut.saved_bytes < default.saved_bytes


def test_pointwise_chain():
    def f(x, y):
        for _ in range(6):
            x = (x.sin() * y).tanh() + x.exp().sigmoid()
        return x

    default, mincut = compare_fn(f, torch.randn(4, 8, requires_grad=True),
                                 torch.randn(8, requires_grad=True))
    assert _names(mincut.saved) == ["primals_1", "primals_2"]
    assert mincut.saved_bytes < default.saved_bytes


def test_mlp_relu_gelu():
    # The activations feed the backward's matmuls, which cannot fuse them:
    # Note [Recompute bans] saves them (as torch's min-cut does); without
    # the bans the min-cut recomputes them from the layers' inputs.
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                        nn.Linear(32, 4))
    default, mincut = compare_module(mlp, torch.randn(8, 16))
    assert mincut.saved_bytes <= default.saved_bytes
    with aotgrad.config.patch(aggressive_recomputation=True):
        _, aggressive = compare_module(mlp, torch.randn(8, 16))
    assert aggressive.saved_bytes < default.saved_bytes


def test_matmul_not_recomputed():
    def f(x, w1, w2):
        h = (x @ w1).sin()
        return (h @ w2).cos() * h

    default, mincut = compare_fn(f, torch.randn(5, 6, requires_grad=True),
                                 torch.randn(6, 7, requires_grad=True),
                                 torch.randn(7, 7, requires_grad=True))
    def mms(gm):
        return sum(1 for n in gm.graph.nodes if n.target is aten.mm.default)

    # Two matmuls in the forward, two per matmul in the backward (the input
    # gradients): one more in min-cut's backward would be a recomputed one.
    assert mms(mincut.fw_gm) == 2
    assert mms(mincut.bw_gm) == mms(default.bw_gm) == 4


def test_layernorm_softmax():
    def f(x, w, b):
        y = F.layer_norm(x, (8,), w, b)
        return (y.softmax(-1) * y.log_softmax(-1)).relu()

    compare_fn(f, torch.randn(3, 5, 8, requires_grad=True), torch.randn(8, requires_grad=True),
               torch.randn(8, requires_grad=True))


def test_dropout_not_recomputed():
    def f(x, w):
        h = F.dropout((x @ w).sin(), 0.5, training=True).cos()
        return F.dropout(h * x, 0.3, training=True).exp()

    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    default, mincut = compare_fn(f, x, w, seed=123)
    fw_random = sum(1 for n in mincut.fw_gm.graph.nodes
                    if getattr(n.target, "overloadpacket", None) in RANDOM_OPS)
    assert fw_random == 2
    assert mincut.count(RANDOM_OPS) == 0


def test_random_op_results_saved_not_redrawn():
    # The whole chain is pointwise except the random op: the cut must keep the
    # random result (or something after it), however cheap the chain before it.
    def f(x):
        return (torch.rand_like(x) * x.sin()).cos()

    x = torch.randn(10, requires_grad=True)
    default, mincut = compare_fn(f, x, seed=7)
    assert mincut.count(RANDOM_OPS) == 0


class Block(nn.Module):
    """A pre-norm transformer block with attention and MLP dropout."""

    def __init__(self, d=32, heads=4, p=0.1):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def test_transformer_block():
    torch.manual_seed(0)
    default, mincut = compare_module(Block(), torch.randn(2, 6, 32), seed=5, atol=1e-4)
    assert mincut.saved_bytes <= default.saved_bytes
    with aotgrad.config.patch(aggressive_recomputation=True):   # Note [Recompute bans]
        _, aggressive = compare_module(Block(), torch.randn(2, 6, 32), seed=5, atol=1e-4)
    assert aggressive.saved_bytes < default.saved_bytes


def test_symbolic_shapes():
    def f(x):
        return (x.sin() * x.shape[0]).cos().view(-1).relu()

    x = torch.randn(5, 4)
    graphs: list = []
    rec = _recording_compiler(graphs)
    compiled = aotgrad.aot_function(f, rec, rec, dynamic=True,
                                    partition_fn=min_cut_rematerialization_partition)
    for shape in [(5, 4), (7, 3)]:
        x = torch.randn(shape, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        xe = x.detach().clone().requires_grad_(True)
        f(xe).sum().backward()
        torch.testing.assert_close(out, f(xe))
        torch.testing.assert_close(x.grad, xe.grad)
    saved = Compiled(None, None, *graphs[:2]).saved
    # the relu output goes to the graph output, unfused: saved, as torch's
    # min-cut does (Note [Recompute bans], ban_recompute_materialized_backward)
    assert [n.name for n in saved if isinstance(n.meta["val"], torch.Tensor)] == \
        ["primals_1", "relu"]


def test_no_gain_falls_back_to_default():
    # The backward needs x and w themselves: there is nothing to recompute.
    default, mincut = compare_fn(lambda x, w: x @ w, torch.randn(3, 4, requires_grad=True),
                                 torch.randn(4, 5, requires_grad=True))
    assert _names(mincut.saved) == _names(default.saved)

# ---------------------------------------------------------------- policy and max-flow


def _call_node(graph: fx.Graph, target, *args):
    return graph.call_function(target, args)


def test_recompute_policy():
    g = fx.Graph()
    x = g.placeholder("x")
    cheap = [_call_node(g, aten.sin.default, x), _call_node(g, aten.mul.Tensor, x, x),
             _call_node(g, aten.view.default, x, [-1]), _call_node(g, aten.t.default, x),
             _call_node(g, aten.expand.default, x, [2, 2]), _call_node(g, aten.clone.default, x),
             _call_node(g, __import__("operator").getitem, x, 0)]
    costly = [_call_node(g, aten.mm.default, x, x), _call_node(g, aten.sum.default, x),
              _call_node(g, aten.native_dropout.default, x, 0.5, True),
              _call_node(g, aten.bernoulli.p, x, 0.5), _call_node(g, aten.rand_like.default, x),
              _call_node(g, aten.add_.Tensor, x, x), _call_node(g, aten.sort.default, x),
              _call_node(g, aten.index.Tensor, x, [x]), _call_node(g, aten.convolution.default,
                                                                    x, x, None, [1], [0], [1],
                                                                    False, [0], 1)]
    assert all(is_cheap_to_recompute(n) for n in cheap)
    assert not any(is_cheap_to_recompute(n) for n in costly)
    assert not is_cheap_to_recompute(x)


def _brute_force_min_cut(n, edges, s, t):
    best = None
    others = [v for v in range(n) if v not in (s, t)]
    for bits in itertools.product((0, 1), repeat=len(others)):
        side = {s} | {v for v, b in zip(others, bits) if b}
        cut = sum(c for u, v, c in edges if u in side and v not in side)
        best = cut if best is None else min(best, cut)
    return best


def test_max_flow_equals_brute_force_min_cut():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 8)
        edges = [(rng.randrange(n), rng.randrange(n), rng.randint(0, 9))
                 for _ in range(rng.randint(0, 20))]
        edges = [(u, v, c) for u, v, c in edges if u != v]
        net = FlowNetwork(n)
        for u, v, c in edges:
            net.add_edge(u, v, c)
        flow = net.max_flow(0, n - 1)
        assert flow == _brute_force_min_cut(n, edges, 0, n - 1)
        # The vertices that reach the sink in the residual network define a cut of that value.
        sink_side = net.reaches(n - 1)
        assert not sink_side[0]
        assert sum(c for u, v, c in edges if not sink_side[u] and sink_side[v]) == flow


@pytest.mark.parametrize("partition_fn", [min_cut_rematerialization_partition])
def test_extra_kwargs_are_accepted(partition_fn):
    # torch.compile passes e.g. compiler= and static_lifetime_input_indices=.
    def f(x):
        return x.sin().cos()

    joints = []

    def capture(joint_gm, joint_inputs, *, num_fwd_outputs):
        joints.append(joint_gm)
        return partition_fn(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                            compiler="inductor", static_lifetime_input_indices=[])

    x = torch.randn(4, requires_grad=True)
    aotgrad.aot_function(f, aotgrad.nop, partition_fn=capture)(x).sum().backward()
    torch.testing.assert_close(x.grad, -x.cos() * x.sin().sin())


def test_recompute_policy_is_a_plug_in():
    # A policy that allows nothing: min-cut cannot beat default and keeps its choice.
    def f(x):
        return (x.sin() * 2).cos().sum()

    x = torch.randn(3, requires_grad=True)

    def nothing(joint_gm, joint_inputs, *, num_fwd_outputs):
        return min_cut_rematerialization_partition(joint_gm, joint_inputs,
                                                   num_fwd_outputs=num_fwd_outputs,
                                                   recompute_policy=lambda node: False)

    default = run_fn(f, [x], default_partition)
    mincut = run_fn(f, [x], nothing)
    assert _names(mincut.saved) == _names(default.saved) == ["primals_1", "mul"]
    torch.testing.assert_close(mincut.grads, default.grads)


def test_collectives_and_impure_ops_are_never_recomputed():
    from aotgrad.partition import is_random_or_mutating

    import torch.distributed  # noqa: F401  (registers the functional collectives)

    g = fx.Graph()
    x = g.placeholder("x")
    reduce = g.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    wait = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduce,))
    sin = g.call_function(aten.sin.default, (x,))
    assert is_random_or_mutating(reduce) and is_random_or_mutating(wait)
    assert not is_random_or_mutating(sin)
