"""When a plan's offload copies run: what the compute waits for them, and how
long the blocks they read stay allocated.

Note [Copies in time]
~~~~~~~~~~~~~~~~~~~~~
The copies of Note [Offload] (offload.py) run beside the compute, so what
offloading costs is not the copies' time but the time the compute stream
waits for them, and what it saves is less than the offloaded bytes while a
copy out is still reading its block.  ``copy_times`` plays a plan's graphs
on three queues, in the planner's cost units (``recompute_cost``'s, one
low-precision FLOP of an H100/H200):

* the compute stream runs the nodes in graph order, the forward's then the
  backward's, each for its ``cost``;
* the copy-out engine runs each ``aotgrad::offload`` once its value is
  computed (the node is reached) and the previous copy out is done, for
  ``COPY_COST_PER_BYTE`` a byte;
* the copy-back engine runs each ``aotgrad::reload`` once it is issued (the
  node is reached: Note [Reload ahead]), its value's copy out is done and
  the previous copy back is done, for as long;
* ``aotgrad::reload_wait`` holds the compute stream until its copy back is
  done.

``stall`` is the time the compute stream waits in all: the plan's offload
cost.  An offloaded value's block stays allocated until its copy out is done
(``record_stream``): ``held_until`` is the step -- the timeline's numbering,
Note [Peak of a step] -- the compute stream is at then, which the timeline
counts the block to.  Roofline costs are a lower bound of the compute's time,
so the estimate hides fewer of the copies than the device does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .offload import offload_op, reload_op, reload_wait_op
from .peak import Timeline, step_timeline
from .problem import tensor_bytes

#: A byte copied one way between pinned CPU memory and a device (~50 GB/s of
#: PCIe), in ``recompute_cost``'s units.
COPY_COST_PER_BYTE = 20_000


@dataclass(frozen=True)
class CopyTimes:
    """Note [Copies in time]: the compute stream's waits, the blocks' holds."""
    stall: int = 0
    held_until: dict[str, int] = field(default_factory=dict)   # offloaded value -> step


def timeline(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule | None, recomputed: frozenset[str],
             cost: Callable[[fx.Node], int], cache: dict | None = None,
             device: torch.device | None = None) -> tuple[Timeline, CopyTimes]:
    """The step's timeline (Note [Peak of a step]; ``cache``, ``device``:
    step_timeline's) with its offloaded blocks held until their copies out are
    done, and the copies' times."""
    offloads = bool(fw_gm.graph.find_nodes(op="call_function", target=offload_op))
    copies = copy_times(fw_gm, bw_gm, cost) if offloads else CopyTimes()
    return step_timeline(fw_gm, bw_gm, recomputed, copies.held_until, cache, device), copies


def copy_times(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule | None,
               cost: Callable[[fx.Node], int]) -> CopyTimes:
    """Note [Copies in time] for the graphs ``fw_gm`` then ``bw_gm``."""
    nodes = [n for n in fw_gm.graph.nodes if n.op == "call_function"]
    if bw_gm is not None:
        nodes += [n for n in bw_gm.graph.nodes if n.op == "call_function"]
    now, stall = 0, 0
    out_free = back_free = 0          # when each copy engine is next free
    out_done: dict[str, int] = {}     # offloaded value -> when its copy out is done
    back_done: dict[fx.Node, int] = {}
    ends: list[int] = []              # per step, when the compute stream is past it
    for n in nodes:
        if n.target is offload_op:
            value = n.args[0]
            start = max(now, out_free)
            out_free = out_done[value.name] = start + COPY_COST_PER_BYTE * _bytes(value)
        elif n.target is reload_op:
            start = max(now, back_free, out_done.get(n.args[0].name, 0))
            back_free = back_done[n] = start + COPY_COST_PER_BYTE * _bytes(n)
        elif n.target is reload_wait_op:
            ready = back_done.get(n.args[0], now)
            if ready > now:
                stall += ready - now
                now = ready
        else:
            now += cost(n)
        ends.append(now)
    last = len(ends) - 1
    held = {name: min(bisect.bisect_left(ends, done), last) for name, done in out_done.items()}
    return CopyTimes(stall, held)


def _bytes(n: fx.Node) -> int:
    return (tensor_bytes(n) or 0) if isinstance(n.meta.get("val"), torch.Tensor) else 0
