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

On CUDA the copy out runs on a side stream of the device (one per device):
the side stream first waits for the work queued so far on the current
stream (the value is computed), the copy goes to pinned memory without
blocking the host, and the compute stream goes on meanwhile -- the copy
overlaps the rest of the forward instead of queueing between its kernels.
The value's block is marked used by the side stream (``record_stream``), so
the caching allocator does not hand it out again before the copy has read
it.  The copy back waits, on the stream that reads it, for that copy's event
(kept by the CPU copy's address until then: Note [Offload events]), then
copies on that stream.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

_side_streams: dict[int, "torch.cuda.Stream"] = {}

# Note [Offload events]: per CPU copy (by its data pointer) the event of its
# copy out, until its copy back waits for it.  A copy never reloaded (no
# backward) leaves its entry, replaced when the pinned block is used again.
_copied: dict[int, "torch.cuda.Event"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream the copies out of ``device`` run on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(device=index)
    return stream


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


@torch.library.custom_op("aotgrad::reload", mutates_args=())
def _reload_op(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` copied back to ``device``, after its copy out (not waited for by
    the host from pinned memory)."""
    if x.device == device:
        return x.clone()
    if device.type == "cuda":
        done = _copied.pop(x.data_ptr(), None) if x.numel() else None
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
    return x.to(device, non_blocking=x.is_pinned())


@_reload_op.register_fake
def _(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)


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
    position = {n: i for i, n in enumerate(bw_gm.graph.nodes)}
    for p in bw_gm.graph.find_nodes(op="placeholder"):
        if p.name in wanted:
            val = p.meta["val"]
            first_use = min(p.users, key=position.__getitem__, default=None)
            if first_use is None:
                continue
            with bw_gm.graph.inserting_before(first_use):
                back = bw_gm.graph.call_function(torch.ops.aotgrad.reload.default,
                                                 (p, val.device))
            back.meta["val"] = val
            p.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
            p.meta["val"] = _fake_on_device(val, torch.device("cpu"))
    bw_gm.recompile()


def _fake_on_device(val: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fake tensor like ``val`` (same mode) on ``device``."""
    with val.fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)
