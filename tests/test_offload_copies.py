"""Note [Copies in time] (partition/copies.py): what the compute waits for the
offload copies, and how long their blocks stay in the step's timeline."""

from __future__ import annotations

import torch

from aotgrad import MemoryPolicy, aot_function, tag
from aotgrad.partition import copies
from aotgrad.partition.peak import step_timeline
from helpers import GraphRecorder


def one_offload(x, w):
    h = tag(torch.tanh(x @ w), "h")
    return (torch.sin(h @ w) * h).sum()


def graphs(fn, names):
    rec = GraphRecorder()
    compiled = aot_function(fn, rec, rec, partition_fn=MemoryPolicy(offload=names))
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    got = compiled(x, w)
    got.backward()
    want_x, want_w = x.grad, w.grad
    x.grad = w.grad = None
    fn(x, w).backward()
    torch.testing.assert_close(want_x, x.grad)
    torch.testing.assert_close(want_w, w.grad)
    return rec.last("forward"), rec.last("backward")


def steps(fw, bw):
    return [n for g in (fw, bw) for n in g.graph.nodes if n.op == "call_function"]


def is_op(n, name):
    return str(n.target).startswith(f"aotgrad.{name}.")


def test_one_copy_by_hand(monkeypatch):
    """Each compute node costs 1; each copy ``per_byte`` a byte: the stall and
    the hold follow from the nodes' positions."""
    fw, bw = graphs(one_offload, ["h"])
    nodes = steps(fw, bw)
    offload = next(k for k, n in enumerate(nodes) if is_op(n, "offload"))
    reload = next(k for k, n in enumerate(nodes) if is_op(n, "reload"))
    wait = next(k for k, n in enumerate(nodes) if is_op(n, "reload_wait"))
    nbytes = 8 * 16 * 4

    def at(k):   # the compute stream's time when step k is reached (copy ops cost 0)
        return sum(1 for n in nodes[:k] if n.op == "call_function" and
                   not str(n.target).startswith("aotgrad."))

    for per_byte in (0, 1, 7, 1000):
        monkeypatch.setattr(copies, "COPY_COST_PER_BYTE", per_byte)
        times = copies.copy_times(fw, bw, lambda n: 1)
        out_done = at(offload) + per_byte * nbytes
        back_done = max(at(reload), out_done) + per_byte * nbytes
        assert times.stall == max(0, back_done - at(wait)), per_byte
        held = times.held_until[nodes[offload].args[0].name]
        # the first step the compute stream ends at or after the copy out is done
        ends = []
        now = 0
        for k, n in enumerate(nodes):
            if k == wait:
                now = max(now, back_done)
            elif not str(n.target).startswith("aotgrad."):
                now += 1
            ends.append(now)
        assert held == min(next((k for k, e in enumerate(ends) if e >= out_done), len(ends)),
                           len(ends) - 1)


def test_slow_copies_hold_blocks_and_stall(monkeypatch):
    """Slower copies never stall less or hold a block for less time, and the
    timeline's peak never falls."""
    def deep(x, w):
        h = x
        for k in range(4):
            h = tag(torch.tanh(h @ w), f"h{k}")
        return h.sum()

    fw, bw = graphs(deep, [f"h{k}" for k in range(4)])
    previous = None
    for per_byte in (0, 1, 10, 100, 10_000):
        monkeypatch.setattr(copies, "COPY_COST_PER_BYTE", per_byte)
        timeline, times = copies.timeline(fw, bw, frozenset(), lambda n: 1)
        assert set(times.held_until) == {f"tanh{'_' + str(k) if k else ''}" for k in range(4)}
        if per_byte == 0:
            assert times.stall == 0
            assert timeline.peak == step_timeline(fw, bw).peak
        if previous is not None:
            assert times.stall >= previous[1].stall
            assert all(times.held_until[v] >= previous[1].held_until[v]
                       for v in times.held_until)
            assert timeline.peak >= previous[0].peak
        previous = timeline, times
    assert previous[1].stall > 0
    # at 10k cost units a byte, each copy out outlasts the forward: the blocks
    # are held into the backward
    num_forward = sum(1 for n in fw.graph.nodes if n.op == "call_function")
    assert all(step >= num_forward for step in previous[1].held_until.values())
