"""Offloaded saved values: copied to CPU memory by the forward, back by the backward.

Note [Offload]
~~~~~~~~~~~~~~
``insert_offload`` makes the forward copy each saved value it names to the
CPU (``aotgrad::offload``) right after computing it, and return the copy:
the value's own memory is freed after its last use in the forward, not held
to the forward's end.  The backward copies it back to its device
(``aotgrad::reload``) just before its first use, so it takes device memory
only from there.  Both are ops of their own, which any graph compiler calls
as they are.

On CUDA both copies run on side streams of the device, overlapped with
compute.  The copy out: the side stream first waits for the work queued so
far on the current stream (the value is computed), the copy goes to pinned
memory without blocking the host, and the compute stream goes on meanwhile.
The value's block is marked used by the side stream (``record_stream``), so
the caching allocator does not hand it out again before the copy has read
it.  The copy back is prefetched: ``aotgrad::reload`` only starts it, on a
second side stream (the other copy engine), into a block of the compute
stream, after that copy's event (kept by the CPU copy's address until then:
Note [Offload events]); ``aotgrad::reload_wait``, just before the value's
first use, makes the compute stream wait for it.  The wait is an op that
mutates the reloaded value (as far as a graph compiler knows, it writes the
value), so that every read of the value stays after it.

Note [Reload ahead]: ``insert_offload`` issues each reload one offloaded
value ahead -- at the first use of the offloaded value used before it (the
first one ``RELOAD_LEAD`` nodes before its own first use) -- so that its copy
runs while the backward computes with the previous one; the reloaded block
is device memory from that point, which the planner's timeline counts (Note
[Peak of a step]: a buffer from its node on).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

_streams: dict[tuple[str, int], "torch.cuda.Stream"] = {}   # by (direction, device index)

# Note [Offload events]: per CPU copy (by its data pointer) the event of its
# copy out, until its copy back waits for it.  A copy never reloaded (no
# backward) leaves its entry, replaced when the pinned block is used again.
_copied: dict[int, "torch.cuda.Event"] = {}


def _stream(direction: str, device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _streams.get((direction, index))
    if stream is None:
        stream = _streams[direction, index] = torch.cuda.Stream(device=index)
    return stream


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream the copies out of ``device`` run on."""
    return _stream("out", device)


def reload_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream the copies back to ``device`` run on (the other copy engine)."""
    return _stream("back", device)


@torch.library.custom_op("aotgrad::offload", mutates_args=())
def _offload_op(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``x``: pinned, made on a side stream, when ``x`` is on CUDA."""
    out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu",
                              pin_memory=x.is_cuda)
    if not x.is_cuda:
        return out.copy_(x)
    side = side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        out.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    x.record_stream(side)
    if out.numel():
        _copied[out.data_ptr()] = done
    return out


@_offload_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")


# Note [Offload events]: per reloaded block (by its data pointer) the event of
# its copy back, until reload_wait waits for it.
_reloading: dict[int, "torch.cuda.Event"] = {}


@torch.library.custom_op("aotgrad::reload", mutates_args=())
def _reload_op(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` copied back to ``device``: on CUDA only started (on a side stream,
    after its copy out); ``aotgrad::reload_wait`` makes it usable."""
    if x.device == device:
        return x.clone()
    out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
    if device.type != "cuda" or not out.numel():
        return out.copy_(x)
    side = reload_stream(device)
    # the block may have been another value's, read by work queued on the
    # compute stream: the copy writes it after that work
    side.wait_stream(torch.cuda.current_stream(device))
    done = _copied.pop(x.data_ptr(), None) if x.numel() else None
    with torch.cuda.stream(side):
        if done is not None:
            side.wait_event(done)
        out.copy_(x, non_blocking=x.is_pinned())
        back = torch.cuda.Event()
        back.record(side)
    _reloading[out.data_ptr()] = back
    return out


@_reload_op.register_fake
def _(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)


@torch.library.custom_op("aotgrad::reload_wait", mutates_args=("x",))
def _reload_wait_op(x: torch.Tensor) -> None:
    """Note [Offload]: the compute stream waits for ``x``'s copy back."""
    if x.is_cuda and x.numel():
        back = _reloading.pop(x.data_ptr(), None)
        if back is not None:
            torch.cuda.current_stream(x.device).wait_event(back)


@_reload_wait_op.register_fake
def _(x: torch.Tensor) -> None:
    return None


#: the ops as graphs hold them
offload_op = torch.ops.aotgrad.offload.default
reload_op = torch.ops.aotgrad.reload.default
reload_wait_op = torch.ops.aotgrad.reload_wait.default

#: Note [Reload ahead]: the first reload, in nodes before its value's first use
RELOAD_LEAD = 8


def insert_offload(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, names: Sequence[str]) -> None:
    """Note [Offload]: the saved values ``names`` go to CPU memory and back."""
    if not names:
        return
    wanted = set(names)
    out = fw_gm.graph.output_node()
    values = list(out.args[0])
    placeholders = fw_gm.graph.find_nodes(op="placeholder")
    for k, v in enumerate(values):
        if isinstance(v, fx.Node) and v.name in wanted:
            val = v.meta["val"]
            after = placeholders[-1] if v.op == "placeholder" else v
            with fw_gm.graph.inserting_after(after):
                cpu = fw_gm.graph.call_function(torch.ops.aotgrad.offload.default, (v,))
            cpu.meta["val"] = _fake_on_device(val, torch.device("cpu"))
            values[k] = cpu
    out.args = (tuple(values),)
    fw_gm.recompile()
    _insert_reloads(bw_gm, wanted)


def _insert_reloads(bw_gm: fx.GraphModule, wanted: set[str]) -> None:
    """Note [Reload ahead]: each offloaded placeholder of the backward copied
    back one offloaded value ahead, waited for just before its first use."""
    graph = bw_gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    firsts = []   # (first use, placeholder), in the order of first use
    for p in graph.find_nodes(op="placeholder"):
        if p.name in wanted and p.users:
            firsts.append((min(p.users, key=position.__getitem__), p))
    firsts.sort(key=lambda fp: position[fp[0]])
    computing = [n for n in nodes if n.op not in ("placeholder", "output")]
    previous = None
    for first_use, p in firsts:
        val = p.meta["val"]
        if previous is None:   # the first: RELOAD_LEAD compute nodes ahead
            at = computing.index(first_use) if first_use in computing else len(computing)
            start = computing[max(at - RELOAD_LEAD, 0)] if computing else first_use
        else:
            start = previous
        with graph.inserting_before(start):
            back = graph.call_function(torch.ops.aotgrad.reload.default, (p, val.device))
        back.meta["val"] = val
        with graph.inserting_before(first_use):
            wait = graph.call_function(torch.ops.aotgrad.reload_wait.default, (back,))
        wait.meta["val"] = None
        p.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        p.meta["val"] = _fake_on_device(val, torch.device("cpu"))
        previous = wait
    bw_gm.recompile()


def _fake_on_device(val: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fake tensor like ``val`` (same mode) on ``device``."""
    with val.fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)
