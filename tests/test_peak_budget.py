"""A budget in bytes of the step's estimated peak (Note [Peak budget],
aotgrad/partition/planner.py): parsing, the plan's guarantees, values."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn as nn

import aotgrad
from aotgrad import aot_module, nop
from aotgrad.partition import MemoryPolicy, min_cut_rematerialization_partition
from aotgrad.partition.peak import step_timeline
from aotgrad.partition.planner import PLAN_META, parse_memory_budget, recompute_per_use

GiB, MiB = 2 ** 30, 2 ** 20


def mlp(layers: int = 8, width: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                           for _ in range(layers)])


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 16 * 16, 4))


def run(model: nn.Module, x: torch.Tensor, budget=None, partition=None):
    """(loss, grads, fw_gm, bw_gm) of one step compiled under ``budget``."""
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    for p in model.parameters():
        p.grad = None
    with aotgrad.config.patch(memory_budget=budget):
        compiled = aot_module(model, keep, keep,
                              partition_fn=partition or min_cut_rematerialization_partition)
        loss = compiled(x).square().sum()
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, graphs[0], graphs[1]


def eager(model: nn.Module, x: torch.Tensor):
    for p in model.parameters():
        p.grad = None
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_eager(model, x, loss, grads):
    ref_loss, ref_grads = eager(model, x)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, nbytes", [
    ("6GiB", 6 * GiB), ("6G", 6 * GiB), ("512MB", 512 * 10 ** 6), ("1.5GB", 1_500_000_000),
    ("512 MiB", 512 * MiB), ("800000000", 800_000_000), ("64kib", 64 * 1024)])
def test_sizes_parse(text, nbytes):
    assert parse_memory_budget(text).nbytes == nbytes
    assert parse_memory_budget(nbytes).nbytes == nbytes


def test_fraction_and_none():
    assert parse_memory_budget(None) is None
    b = parse_memory_budget(0.5)
    assert b.fraction == 0.5 and b.limit(1000) == 500


@pytest.mark.parametrize("bad, error, words", [
    ("6 parsecs", ValueError, "is not a size"), ("-1GiB", ValueError, "is not a size"),
    ("0MB", ValueError, "is not a size"), (0, ValueError, "positive number of bytes"),
    (-5, ValueError, "positive number of bytes"), (1.5, ValueError, "fraction in \\(0, 1\\]"),
    (0.0, ValueError, "fraction in \\(0, 1\\]"), (True, TypeError, "must be bytes"),
    ([1], TypeError, "must be bytes")])
def test_bad_budgets_say_what_to_write(bad, error, words):
    with pytest.raises(error, match=words):
        parse_memory_budget(bad)


def test_a_bad_budget_fails_where_it_is_given():
    with pytest.raises(ValueError, match="is not a size"):
        MemoryPolicy(memory_budget="lots")
    m, x = mlp(2, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="is not a size"):
        run(m, x, budget="lots")


def test_both_budgets_at_once_is_an_error():
    m, x = mlp(2, 16), torch.randn(4, 16)
    with aotgrad.config.patch(activation_memory_budget=0.5), \
            pytest.raises(ValueError, match="set one"):
        run(m, x, budget="1GiB")


# ---------------------------------------------------------------- the plan


def lowest_peak(model, x) -> int:
    """The lowest estimated peak of any plan: what the no-fit error reports."""
    import re
    with pytest.raises(ValueError, match="no plan fits memory_budget") as info:
        run(model, x, budget=1)
    return int(re.search(r"is \S+ \S+ \((\d+) bytes;", str(info.value)).group(1))


def plan_of(fw_gm):
    plan = fw_gm.meta.get(PLAN_META)
    assert plan is not None, "the planner did not run"
    return plan


@pytest.mark.parametrize("make, shape", [(mlp, (256, 128)), (convnet, (8, 3, 16, 16))])
def test_peak_within_budget_and_monotone(make, shape):
    """As the budget falls, the chosen plan's estimated peak never rises and
    its estimated time never falls; every peak is within its budget; every
    plan computes eager's values; a budget below every plan raises."""
    model = make()
    torch.manual_seed(1)
    x = torch.randn(*shape)
    _, _, fw, _ = run(model, x, budget=1.0)
    plain = plan_of(fw).plain_peak
    lowest = lowest_peak(model, x)
    assert lowest < plain, "no plan lowers this model's peak: the test shows nothing"
    chosen = []
    steps = 8
    for k in range(steps + 1):
        limit = plain - (plain - lowest) * k // steps
        loss, grads, fw, bw = run(model, x, budget=limit)
        plan = plan_of(fw)
        assert plan.limit == limit
        assert plan.chosen.peak <= limit
        # the graphs returned are the plan measured
        recomputed = plan.timeline.peak
        assert step_timeline(fw, bw, frozenset(
            n.name for n in bw.graph.nodes if n.name in {m.name for m in fw.graph.nodes}
        )).peak == recomputed
        assert_eager(model, x, loss, grads)
        chosen.append(plan.chosen)
    peaks = [c.peak for c in chosen]
    times = [c.time for c in chosen]
    assert peaks == sorted(peaks, reverse=True), peaks
    assert times == sorted(times), times
    assert peaks[-1] == lowest and peaks[0] == plain
    with pytest.raises(ValueError, match="no plan fits memory_budget") as info:
        run(model, x, budget=lowest - 1)
    assert f"lowest estimated peak of this training step is" in str(info.value)
    assert f"({lowest} bytes" in str(info.value)


def test_bytes_and_fraction_pick_the_same_plan():
    model, x = mlp(), torch.randn(256, 128)
    _, _, fw, _ = run(model, x, budget=0.9)
    by_fraction = plan_of(fw)
    _, _, fw, _ = run(model, x, budget=by_fraction.limit)
    by_bytes = plan_of(fw)
    assert by_bytes.chosen == by_fraction.chosen
    _, _, fw, _ = run(model, x, budget=f"{by_fraction.limit}B")
    assert plan_of(fw).chosen == by_fraction.chosen


def test_memory_policy_carries_a_peak_budget():
    model, x = mlp(), torch.randn(256, 128)
    loss, grads, fw, _ = run(model, x, partition=MemoryPolicy(memory_budget=0.9))
    plan = plan_of(fw)
    assert plan.chosen.peak <= plan.limit < plan.plain_peak
    assert_eager(model, x, loss, grads)


def test_recompute_per_use_lowers_a_long_chain_peak():
    """A chain recomputed whole at the start of the backward is held at once
    just in time; per use, each value is rebuilt where it is used."""
    model, x = mlp(8, 128), torch.randn(256, 128)
    _, _, fw, _ = run(model, x, budget=1.0)
    plain = plan_of(fw).plain_peak
    with pytest.raises(ValueError):
        run(model, x, budget=1)
    points = plan_of(run(model, x, budget=lowest_peak(model, x))[2]).points
    by_cut = {}
    for p in points:
        by_cut.setdefault(p.candidate.cut, {})[p.candidate.per_use] = p
    lower = [pair for pair in by_cut.values() if len(pair) == 2 and
             pair[True].peak < pair[False].peak]
    assert lower, [(p.candidate, p.peak) for p in points]
    assert all(pair[True].time >= pair[False].time for pair in lower)
    best = min(points, key=lambda p: (p.peak, p.time))
    loss, grads, fw, bw = run(model, x, budget=best.peak)
    assert plan_of(fw).chosen.candidate.per_use
    assert_eager(model, x, loss, grads)
    # a second pass finds nothing more to copy
    assert recompute_per_use(bw, {n.name for n in fw.graph.nodes}) in (True, False)


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 64),
                         nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 64), nn.Tanh()).train()


class Attention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 3):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d),
            ln2=nn.LayerNorm(d), up=nn.Linear(d, 4 * d), down=nn.Linear(4 * d, d)))
            for _ in range(layers))

    def forward(self, x):
        b, t, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(d, dim=-1)
            q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                       for y in (q, k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["out"](a.transpose(1, 2).reshape(b, t, d))
            x = x + blk["down"](torch.nn.functional.gelu(blk["up"](blk["ln2"](x))))
        return x


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention()


@pytest.mark.parametrize("make, shape", [(mlp, (256, 128)), (convnet, (8, 3, 16, 16)),
                                         (dropout_mlp, (128, 64)), (attention, (4, 32, 64))])
def test_bounds_prune_no_choice(make, shape, monkeypatch):
    """Note [Peak budget]: the planner skips plans by bounds on their peak and
    time (checked, under debug_assert, against every plan it builds); building
    every plan (``EXHAUSTIVE``) chooses the same one, at every budget, and
    reports the same lowest peak when none fits.  A plan recomputing per use
    never takes less time than the same cut just in time."""
    from aotgrad.partition import planner
    model = make()
    torch.manual_seed(1)
    x = torch.randn(*shape)
    budgets = (1.0, 0.97, 0.94, 0.9, 0.87, 0.84, 0.8, 0.75, 0.7, 0.6, 0.5, 1)
    found = {}
    for exhaustive in (True, False):
        monkeypatch.setattr(planner, "EXHAUSTIVE", exhaustive)
        for budget in budgets:
            try:
                with aotgrad.config.patch(debug_assert=True):
                    _, _, fw, _ = run(model, x, budget=budget)
            except ValueError as e:
                found[exhaustive, budget] = str(e)
                continue
            plan = plan_of(fw)
            found[exhaustive, budget] = (plan.chosen, plan.limit, plan.timeline.peak)
            if exhaustive:
                by = {p.candidate: p for p in plan.points}
                for c, p in by.items():
                    jit = by.get(dataclasses.replace(c, per_use=False))
                    assert jit is None or p.time >= jit.time, (p, jit)
    for budget in budgets:
        assert found[False, budget] == found[True, budget], budget
    assert any(isinstance(found[True, b], str) for b in budgets)


def test_random_ops_are_never_drawn_again():
    """Dropout's mask is saved (or its RNG state replayed), never redrawn:
    the values equal those of the plain plan under the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 64),
                          nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 64), nn.Tanh()).train()
    x = torch.randn(128, 64)
    torch.manual_seed(3)
    ref_loss, ref_grads, _, _ = run(model, x, budget=None)
    _, _, fw, _ = run(model, x, budget=1.0)
    plain = plan_of(fw).plain_peak
    lowest = lowest_peak(model, x)
    torch.manual_seed(3)
    loss, grads, fw, bw = run(model, x, budget=lowest)
    assert plan_of(fw).chosen.peak < plain
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    drawn = [n for n in bw.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and
             torch.Tag.nondeterministic_seeded in n.target.tags]
    assert not drawn, drawn


def test_config_budget_under_torch_compile():
    """config.memory_budget reaches the partitioner under torch.compile: the
    graphs handed to the compiler are the plan's, its estimated peak within
    the limit and below the plain plan's; the values are eager's."""
    model, x = mlp(4, 64), torch.randn(256, 64)
    ref_loss, ref_grads = eager(model, x)
    forwards = []

    def backend(gm, example_inputs):
        def keep(g, _):
            forwards.append(g)
            return g
        return aotgrad.aot_module_simplified(
            gm, example_inputs, fw_compiler=keep, bw_compiler=lambda g, _: g,
            partition_fn=min_cut_rematerialization_partition)

    for budget in ("1GiB", 0.9):
        torch._dynamo.reset()
        forwards.clear()
        for p in model.parameters():
            p.grad = None
        with aotgrad.config.patch(memory_budget=budget):
            compiled = torch.compile(model, backend=backend, fullgraph=True)
            loss = compiled(x).square().sum()
            loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss)
        for p, r in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r)
        (fw,) = forwards
        plan = plan_of(fw)
        assert plan.timeline.peak == plan.chosen.peak <= plan.limit
        if budget == 0.9:
            assert plan.chosen.peak < plan.plain_peak, plan.chosen
    torch._dynamo.reset()


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Reduced(nn.Module):
    """A collective (an all-reduce over one rank) before a long chain."""

    def __init__(self, group):
        super().__init__()
        self.lin, self.group = nn.Linear(64, 64), group

    def forward(self, x):
        from torch.distributed._functional_collectives import all_reduce
        h = all_reduce(self.lin(x), "sum", self.group)
        for _ in range(6):
            h = torch.tanh(h) * 1.5
        return h


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_collectives_are_never_recomputed_under_a_peak_budget():
    """Note [Peak budget]: whatever the budget, the backward recomputes no
    collective (it must run once per rank, in the same order on every rank):
    it runs only its own (the gradient's all-reduce), where
    ``unsafe_allow_optimization_of_collectives`` lets the planner recompute
    the forward's too.  The plans that fit give eager's values."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def collectives(gm) -> int:
        return sum(n.op == "call_function" and n.target.namespace == "_c10d_functional"
                   for n in gm.graph.nodes)

    try:
        torch.manual_seed(0)
        model = Reduced(dist.group.WORLD)
        x = torch.randn(256, 64)
        want = eager(model, x)
        found = {}
        for unsafe in (False, True):
            with aotgrad.config.patch(unsafe_allow_optimization_of_collectives=unsafe):
                for budget in (1.0, 0.9, 0.5):
                    try:
                        loss, grads, fw, bw = run(model, x, budget=budget)
                    except ValueError as e:
                        assert "no plan fits" in str(e)
                        continue
                    torch.testing.assert_close((loss, grads), want)
                    assert collectives(fw) == 2     # all_reduce, wait_tensor
                    found.setdefault(unsafe, set()).add(collectives(bw))
        assert found[False] == {2}, found           # the gradient's all-reduce only
        assert max(found[True]) > 2, found          # the forward's, recomputed
    finally:
        dist.destroy_process_group()
