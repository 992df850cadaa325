"""The memory budget (Note [Memory budget], aotgrad/partition/budget.py): its three
guarantees, and gradients equal to eager's at every budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.multiprocessing.reductions import StorageWeakRef

import aotgrad
from aotgrad import min_cut_rematerialization_partition
from aotgrad.partition.peak import step_timeline
from aotgrad.models import TinyTransformer, TransformerConfig
from helpers import GraphRecorder

BUDGETS = (1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.0)
aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = F.gelu(layer(x)) + x
        return x.pow(2).mean()


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)) + y)
        return y.mean()


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyTransformer(TransformerConfig(d_model=32, n_heads=2, n_layers=2,
                                                     seq_len=16, batch=2))

    def forward(self, tokens):
        return self.net(tokens).float().pow(2).mean()


class Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = F.dropout(F.gelu(self.l1(x)), p=0.3, training=True)
        return F.dropout(self.l2(h).sin(), p=0.5, training=True).pow(2).mean()


def make(name):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), (torch.randn(16, 64),)
    if name == "cnn":
        return CNN(), (torch.randn(2, 3, 8, 8),)
    if name == "transformer":
        return Transformer(), (torch.randint(0, 128, (2, 16)),)
    return Dropout(), (torch.randn(8, 32),)


def saved_activation_bytes(fw_gm, bw_gm) -> int:
    """Memory the backward keeps alive beyond the inputs: the storages of its
    saved values, each once, leaving out the forward's inputs and views of them."""
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage())
              for n in fw_gm.graph.find_nodes(op="placeholder")}
    storages = {}
    for n in bw_gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and not n.name.startswith(("primals", "tangents")):
            key = StorageWeakRef(val.untyped_storage())
            if key not in inputs:
                storages[key] = max(storages.get(key, 0), val.numel() * val.element_size())
    return sum(storages.values())


def eager_saved_bytes(model, inputs) -> int:
    """What eager autograd keeps for the backward (distinct storages, inputs
    and parameters excluded).  Buffers count: BatchNorm's backward keeps the
    running statistics, which eager updates in place and a compiled graph
    returns as new values (written back by the runtime)."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {x.untyped_storage().data_ptr() for x in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())


def run(name, budget, seed=1, partition="mincut"):
    """Compiled under ``budget``: (loss, grads, saved bytes, backward graph)."""
    model, inputs = make(name)
    rec = GraphRecorder()
    partition_fn = min_cut_rematerialization_partition if partition == "mincut" else \
        aotgrad.default_partition
    with aotgrad.config.patch(activation_memory_budget=budget):
        compiled = aotgrad.aot_module(model, rec, rec, partition_fn=partition_fn)
        torch.manual_seed(seed)
        loss = compiled(*inputs)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    bw = rec.last("backward")
    return loss, grads, saved_activation_bytes(rec.last("forward"), bw), bw


def eager(name, seed=1):
    model, inputs = make(name)
    torch.manual_seed(seed)
    loss = model(*inputs)
    loss.backward()
    return loss, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "dropout"])
def test_budget_guarantees(name):
    model, inputs = make(name)
    eager_bytes = eager_saved_bytes(model, inputs)
    want_loss, want_grads = eager(name)
    saved = []
    for budget in BUDGETS:
        loss, grads, nbytes, bw = run(name, budget)
        torch.testing.assert_close(loss, want_loss)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        # never more than eager autograd keeps
        assert nbytes <= eager_bytes, (budget, nbytes, eager_bytes)
        saved.append(nbytes)
    # saved bytes never increase as the budget decreases
    assert all(a >= b for a, b in zip(saved, saved[1:])), saved
    # the budget is met where it can be (the smallest saving is the floor); it
    # is relative to the default partition (nothing recomputed)
    _, _, default_bytes, _ = run(name, 1.0, partition="default")
    for budget, nbytes in zip(BUDGETS, saved):
        assert nbytes <= max(budget * default_bytes, saved[-1]), (budget, saved)
    assert saved[-1] < saved[0], saved   # recomputation bought memory on every model


def test_random_ops_are_never_recomputed_and_gradients_match_eager():
    # dropout under budget 0: everything deterministic may be recomputed, the
    # dropout masks may not (fresh randomness would corrupt the gradients)
    loss, grads, _, bw = run("dropout", 0.0, seed=123)
    want_loss, want_grads = eager("dropout", seed=123)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    for n in bw.graph.nodes:
        if isinstance(n.target, torch._ops.OpOverload):
            assert torch.Tag.nondeterministic_seeded not in n.target.tags, n.format_node()
    # and it did recompute: the backward holds a matmul of the forward
    assert any(n.target in (aten.mm.default, aten.addmm.default) and
               not any(a.name.startswith("tangents") for a in n.all_input_nodes)
               for n in bw.graph.nodes)


def test_budget_recomputes_costly_ops_only_when_needed():
    _, _, full, bw_full = run("mlp", 1.0)
    _, _, zero, bw_zero = run("mlp", 0.0)

    def forward_matmuls(bw):
        return sum(1 for n in bw.graph.nodes if n.target == aten.addmm.default)

    assert forward_matmuls(bw_full) == 0
    assert forward_matmuls(bw_zero) > 0
    assert zero < full


def test_bad_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="activation_memory_budget"):
        run("mlp", 1.5)


def test_explicit_budget_argument_overrides_config():
    model, inputs = make("mlp")
    rec = GraphRecorder()

    def partition(joint, joint_inputs, *, num_fwd_outputs):
        return min_cut_rematerialization_partition(joint, joint_inputs,
                                                   num_fwd_outputs=num_fwd_outputs,
                                                   activation_memory_budget=0.0)

    aotgrad.aot_module(model, rec, rec, partition_fn=partition)(*inputs).backward()
    assert saved_activation_bytes(rec.last("forward"), rec.last("backward")) == \
        run("mlp", 0.0)[2]


def test_profiled_cost_prices_ops_by_timing():
    from aotgrad.partition import profiled_cost

    model, inputs = make("transformer")
    rec = GraphRecorder()
    cost = profiled_cost(repeats=1)
    seen = []

    def timed(node):
        seen.append(node.target)
        return cost(node)

    def partition(joint, joint_inputs, *, num_fwd_outputs):
        return min_cut_rematerialization_partition(
            joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, activation_memory_budget=0.3,
            recompute_cost=timed)

    torch.manual_seed(1)
    loss = aotgrad.aot_module(model, rec, rec, partition_fn=partition)(*inputs)
    loss.backward()
    want_loss, want_grads = eager("transformer")
    torch.testing.assert_close(loss, want_loss)
    for p, w in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)
    assert aten.mm.default in seen or aten.bmm.default in seen or aten.addmm.default in seen
    # costs are positive nanoseconds, cached per op and shapes
    assert all(isinstance(cost(n), int) and cost(n) > 0
               for n in rec.last("forward").graph.nodes if n.op == "call_function")


def _tangent_free(bw) -> list:
    """Backward nodes that read no tangent: recomputations, work on saved values."""
    reads_tangent = set(n for n in bw.graph.find_nodes(op="placeholder")
                        if n.name.startswith("tangents"))
    for n in bw.graph.nodes:
        if n.op == "call_function" and any(a in reads_tangent for a in n.all_input_nodes):
            reads_tangent.add(n)
    return [n for n in bw.graph.nodes if n.op == "call_function" and n not in reads_tangent]


class Blocks(nn.Module):
    """Residual blocks whose inner activations a policy recomputes."""

    def __init__(self, n=6, d=32):
        super().__init__()
        self.l1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(n))
        self.l2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(n))

    def forward(self, x):
        for l1, l2 in zip(self.l1, self.l2):
            x = x + l2(aotgrad.tag(F.gelu(l1(x)), "inner"))
        return x.pow(2).mean()


def test_recomputation_runs_just_before_it_is_needed():
    # Note [Recompute just in time]: each block's recomputation runs right
    # before that block's gradients, not all blocks' at the start of the
    # backward, so fewer recomputed values are alive at once
    torch.manual_seed(0)
    model, x = Blocks(), torch.randn(512, 32)
    rec = GraphRecorder()
    policy = aotgrad.MemoryPolicy(recompute=["inner"])
    compiled = aotgrad.aot_module(model, rec, rec, partition_fn=policy)
    compiled(x).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    bw = rec.last("backward")
    free = _tangent_free(bw)
    assert sum(n.target == aten.gelu.default for n in free) == 6     # one per block
    nodes = list(bw.graph.nodes)
    for n in free:  # the next tangent-reading node after n uses n (maybe through others)
        later = nodes[nodes.index(n) + 1:]
        anchor = next(m for m in later if m not in free)
        assert n in _ancestors(anchor), (n.name, anchor.name)
    # the same backward with every recomputation first: its peak is higher
    everything_first = copy.deepcopy(bw)
    moved = {n.name for n in free}
    last_input = list(everything_first.graph.find_nodes(op="placeholder"))[-1]
    for n in reversed([n for n in everything_first.graph.nodes if n.name in moved]):
        last_input.append(n)
    everything_first.graph.lint()
    recomputed = frozenset(n.name for n in free if n.target == aten.gelu.default)
    fw = rec.last("forward")

    def backward_peak(bw_gm) -> int:
        timeline = step_timeline(fw, bw_gm, recomputed)
        return max(timeline.live[timeline.num_forward_steps:])

    just_in_time, first = backward_peak(bw), backward_peak(everything_first)
    assert just_in_time + 4 * 512 * 32 * 4 <= first, (just_in_time, first)


def _ancestors(node) -> set:
    seen, stack = set(), [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen
