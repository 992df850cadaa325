"""Memory policies by name (aotgrad.tag, MemoryPolicy) and checkpoint regions:
what is saved, recomputed and offloaded, with gradients equal to eager's."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, \
    create_selective_checkpoint_contexts

import aotgrad
from aotgrad import MemoryPolicy, aot_function, tag
from aotgrad.partition.offload import RELOAD_LEAD
from helpers import GraphRecorder

aten = torch.ops.aten


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 16, generator=g).requires_grad_(),
            torch.randn(16, 16, generator=g).requires_grad_())


def compare(fn, partition_fn, seed=0):
    """Compile ``fn`` with ``partition_fn``; check loss and gradients against
    eager; return (forward graph, backward graph)."""
    rec = GraphRecorder()
    compiled = aot_function(fn, rec, rec, partition_fn=partition_fn)
    results = []
    for f in (fn, compiled):
        args = inputs(seed)
        torch.manual_seed(seed)
        out = f(*args)
        out.backward()
        results.append((out, [a.grad for a in args]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    return rec.last("forward"), rec.last("backward")


def saved_names(bw) -> set[str]:
    return {n.name for n in bw.graph.find_nodes(op="placeholder")
            if not n.name.startswith(("primals", "tangents"))}


def recomputed(bw, target) -> int:
    """Nodes of ``target`` in the backward that read no tangent (recomputations)."""
    def from_forward(n, seen=None):
        return not any(a.name.startswith("tangents") or
                       (a.op != "placeholder" and not from_forward(a))
                       for a in n.all_input_nodes)
    return sum(1 for n in bw.graph.nodes if n.target == target and from_forward(n))


def mlp(x, w):
    h = tag(x @ w, "h")
    a = tag(h.sin(), "act")
    return (a @ w).cos().sum()


class TestTags:
    def test_tag_is_identity_eagerly(self):
        x = torch.randn(3)
        assert tag(x, "x") is x
        with pytest.raises(TypeError, match="non-empty string"):
            tag(x, "")

    def test_tags_leave_no_trace_in_graphs(self):
        fw, bw = compare(mlp, aotgrad.min_cut_rematerialization_partition)
        for g in (fw, bw):
            assert "aotgrad" not in g.code

    def test_recompute_by_tag(self):
        _, plain = compare(mlp, aotgrad.min_cut_rematerialization_partition)
        assert "mm" in saved_names(plain) and recomputed(plain, aten.mm.default) == 0
        _, bw = compare(mlp, MemoryPolicy(recompute=["h"]))
        assert "mm" not in saved_names(bw)
        assert recomputed(bw, aten.mm.default) == 1      # h = x @ w, again in the backward

    @aotgrad.config.patch(ban_recompute_materialized_backward=False)
    def test_save_by_tag(self):
        # min-cut would recompute the cheap sin from mm (without the ban of
        # Note [Recompute bans]: the backward's matmul reads it); "save" keeps it
        _, plain = compare(mlp, aotgrad.min_cut_rematerialization_partition)
        assert "sin" not in saved_names(plain)
        _, bw = compare(mlp, MemoryPolicy(save=["act"]))
        assert "sin" in saved_names(bw)

    def test_recompute_by_op(self):
        _, bw = compare(mlp, MemoryPolicy(recompute=[aten.mm]))
        assert recomputed(bw, aten.mm.default) >= 1
        assert not {"mm", "mm_1"} & saved_names(bw)

    def test_tags_under_torch_compile(self):
        torch._dynamo.reset()
        rec = GraphRecorder()
        policy = MemoryPolicy(recompute=["h"])

        def backend(gm, example_inputs):
            return aotgrad.aot_module_simplified(gm, example_inputs, rec, rec,
                                                 partition_fn=policy)

        compiled = torch.compile(mlp, backend=backend, fullgraph=True)
        x, w = inputs()
        compiled(x, w).backward()
        assert recomputed(rec.last("backward"), aten.mm.default) == 1

    def test_bad_policies(self):
        with pytest.raises(TypeError, match="tag names or aten ops"):
            MemoryPolicy(save=[torch.sin])
        with pytest.raises(ValueError, match="both kept"):
            MemoryPolicy(save=["h"], recompute=["h"])


class TestOffload:
    def test_offload_round_trip(self):
        fw, bw = compare(mlp, MemoryPolicy(offload=["h"]))
        # Note [Offload]: the forward copies h to the CPU as soon as it is
        # computed and returns the copy (h's own memory goes after its last
        # forward use); the backward starts copying it back ahead of its first
        # use (Note [Reload ahead]) and waits for the copy just before it
        copies = [n for n in fw.graph.nodes if n.target == torch.ops.aotgrad.offload.default]
        assert len(copies) == 1 and copies[0].args[0].name == "mm"
        assert copies[0].prev is copies[0].args[0]
        assert copies[0] in fw.graph.output_node().args[0]
        assert "mm" not in {getattr(v, "name", None) for v in fw.graph.output_node().args[0]}
        reloads = [n for n in bw.graph.nodes if n.target == torch.ops.aotgrad.reload.default]
        assert len(reloads) == 1 and reloads[0].args[0].name == "mm"
        assert reloads[0].args[1] == torch.device("cpu")   # these tensors live on the CPU
        order = {n: i for i, n in enumerate(bw.graph.nodes)}
        first_use = min(reloads[0].users, key=order.__getitem__)
        assert first_use.target == torch.ops.aotgrad.reload_wait.default
        assert order[first_use] > order[reloads[0]]
        # every other use is after the wait
        assert all(order[u] > order[first_use] for u in reloads[0].users if u is not first_use)


    def test_reloads_run_one_offloaded_value_ahead(self):
        """Note [Reload ahead]: each copy back starts at the first use of the
        offloaded value used before it; the first one a few nodes ahead of its
        own first use."""
        def deep(x, w):
            h = x
            for k in range(4):
                h = tag((h @ w).tanh(), f"h{k}")
            return h.sum()

        fw, bw = compare(deep, MemoryPolicy(offload=[f"h{k}" for k in range(4)]))
        nodes = list(bw.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        reloads = [n for n in nodes if n.target == torch.ops.aotgrad.reload.default]
        waits = [n for n in nodes if n.target == torch.ops.aotgrad.reload_wait.default]
        assert len(reloads) == len(waits) >= 3
        for r in reloads:                            # waited for before any other use
            wait = next(w for w in waits if w.args[0] is r)
            assert all(order[u] > order[wait] for u in r.users if u is not wait)
        for before, after in zip(waits, waits[1:]):  # the next copy starts at this use
            assert order[after.args[0]] < order[before] < order[after]
        computing = [n for n in nodes if n.op not in ("placeholder", "output")]
        at = computing.index(waits[0])
        assert computing.index(waits[0].args[0]) == max(at - 1 - RELOAD_LEAD, 0)  # wait: +1


class TestCheckpoint:
    def block(self, x, w):
        return (x @ w).sin().cos() @ w

    def test_checkpoint_region_is_recomputed(self):
        def f(x, w):
            return checkpoint(self.block, x, w, use_reentrant=False).sum()

        _, plain = compare(lambda x, w: self.block(x, w).sum(), aotgrad.default_partition)
        assert saved_names(plain)
        for partition in (aotgrad.default_partition, aotgrad.min_cut_rematerialization_partition):
            _, bw = compare(f, partition)
            assert saved_names(bw) == set()             # only the inputs are kept
            assert recomputed(bw, aten.mm.default) == 1

    def test_selective_checkpoint_policy(self):
        def policy(ctx, op, *args, **kwargs):
            if op == aten.mm.default:
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE

        def f(x, w):
            ctx = functools.partial(create_selective_checkpoint_contexts, policy)
            return checkpoint(self.block, x, w, use_reentrant=False, context_fn=ctx).sum()

        _, bw = compare(f, aotgrad.min_cut_rematerialization_partition)
        assert recomputed(bw, aten.mm.default) == 0     # matmuls saved, as the policy says
        assert "mm" in saved_names(bw)
        assert "sin" not in saved_names(bw)             # the rest recomputed
        assert recomputed(bw, aten.sin.default) >= 1

    def test_random_op_in_region_is_saved_not_recomputed(self):
        def f(x, w):
            def body(x, w):
                return F.dropout((x @ w).sin(), p=0.5, training=True) @ w
            return checkpoint(body, x, w, use_reentrant=False).sum()

        _, bw = compare(f, aotgrad.min_cut_rematerialization_partition, seed=7)
        for n in bw.graph.nodes:
            if isinstance(n.target, torch._ops.OpOverload):
                assert torch.Tag.nondeterministic_seeded not in n.target.tags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["nop", "inductor"])
def test_offload_on_cuda(backend):
    """Offloaded values live in pinned CPU memory between forward and backward."""
    torch._dynamo.reset()
    rec = GraphRecorder()
    policy = MemoryPolicy(offload=["h"])
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    w = torch.randn(128, 128, device="cuda", requires_grad=True)
    if backend == "nop":
        compiled = aot_function(mlp, rec, rec, partition_fn=policy)
    else:
        compiled = torch.compile(mlp, backend=functools.partial(
            aotgrad.backends.inductor, partition_fn=policy))
    got = compiled(x, w)
    got.backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    want = mlp(x, w)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    if backend == "nop":
        fw = rec.last("forward")
        copies = [n for n in fw.graph.nodes if n.target == torch.ops.aotgrad.offload.default]
        assert copies and copies[0].meta["val"].device.type == "cpu"
    # the copy is pinned memory
    assert torch.ops.aotgrad.offload(w.detach()).is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("late", ["copy out", "copy back"])
def test_offload_copies_on_a_side_stream_keep_the_value(late):
    """Note [Offload]: on CUDA the copies run on side streams.  The copy out
    starts after the value is computed, and the value's block is not handed
    out again until the copy has read it (record_stream); the copy back waits
    for the copy out, writes a block no queued work still reads, and the
    compute stream waits for it at reload_wait.  One side stream is held back
    here (a sleep queued on it), so a block reused too early, or a copy not
    waited for, gives other values."""
    from aotgrad.partition.offload import reload_stream, side_stream

    dev = torch.device("cuda")
    held = side_stream(dev) if late == "copy out" else reload_stream(dev)
    for _ in range(3):
        x = torch.randn(1 << 22, device=dev)
        want = x.clone()
        with torch.cuda.stream(held):
            torch.cuda._sleep(50_000_000)      # the copy starts late
        cpu = torch.ops.aotgrad.offload(x)
        assert cpu.is_pinned() and cpu.device.type == "cpu"
        del x                                  # its block must not be reused yet
        junk = [torch.full((1 << 22,), 7.0, device=dev) for _ in range(4)]
        del junk                 # blocks of 7s the copy back may write, once filled
        back = torch.ops.aotgrad.reload(cpu, dev)
        torch.ops.aotgrad.reload_wait(back)
        torch.testing.assert_close(back, want)
