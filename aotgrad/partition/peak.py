"""The memory of a training step, node by node: what a plan's peak is.

Note [Peak of a step]
~~~~~~~~~~~~~~~~~~~~~
``step_timeline(fw_gm, bw_gm)`` estimates the device memory live after each
node of the forward, then of the backward, run in graph order, as buffers
with a first and a last step:

* the forward's inputs (parameters, buffers, user inputs): the whole step;
* a value the forward computes: from its node to its last use -- to the
  end of the forward for a user output (the caller holds it) and, for a
  saved value, to its last use in the backward (the backward is called boxed
  and frees each saved value there: Note [Freeing saved values]);
* an offloaded value: on the device from its node until its copy out
  (``aotgrad::offload``) has read it (``held_until``: Note [Copies in
  time]), and again from its copy back (``aotgrad::reload``, issued ahead of
  its first use: Note [Reload ahead]) to its last use; its CPU copy is not
  device memory;
* the tangents and the backward's temporaries (recomputed values
  included): from their node to their last use; the gradients it returns:
  to the end of the step (they become ``.grad``).

Each storage is counted once (views share their base's; the fake values'
storages say which).  On a CPU graph every byte counts; on a device graph,
the bytes on that device.  It is an estimate: a compiler that fuses ops
(inductor) allocates less, the caching allocator rounds each block up
(``benchmarks/memory.py`` checks it against ``torch.cuda.max_memory_allocated``).
Which nodes share a storage follows the data flow (Note [Storages by data
flow], below).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import _torch
from .offload import offload_op, reload_op
from ..descriptors import DESC, Saved, Tangent, UserOutput


@dataclass(frozen=True)
class Buffer:
    """One storage, live from step ``start`` to step ``end`` (inclusive)."""
    name: str
    nbytes: int
    kind: str          # input, activation, output, saved, offloaded, reloaded, tangent,
                       # temporary, recomputed, gradient
    start: int
    end: int


@dataclass(frozen=True)
class Timeline:
    """Note [Peak of a step]: steps are ``"forward:<node>"`` / ``"backward:<node>"``."""
    steps: tuple[str, ...]
    buffers: tuple[Buffer, ...]

    @property
    def live(self) -> list[int]:
        """Bytes live at each step."""
        delta = [0] * (len(self.steps) + 1)
        for b in self.buffers:
            delta[b.start] += b.nbytes
            delta[b.end + 1] -= b.nbytes
        del delta[-1]
        return list(itertools.accumulate(delta))

    @property
    def peak(self) -> int:
        return max(self.live, default=0)

    @property
    def peak_step(self) -> int:
        live = self.live
        return live.index(max(live)) if live else 0

    @property
    def num_forward_steps(self) -> int:
        return sum(1 for s in self.steps if s.startswith("forward:"))


def _device_of(gm: fx.GraphModule) -> torch.device:
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type != "cpu":
            return val.device
    return torch.device("cpu")


def _storage_info(val: torch.Tensor, cache: dict | None = None) -> tuple:
    """(device, storage key, bytes) of a fake value; a tensor without
    storage: (device, None, its size).  The key is the storage's identity,
    which the value keeps alive.  ``cache``: by the value's id, the value
    kept with its answer (so the id stands for it) -- the planner measures
    many plans whose nodes carry the joint's values."""
    if cache is not None:
        hit = cache.get(id(val))
        if hit is not None:
            return hit[1]
    try:
        info = (val.device, _torch.live_storage_key(val), int(val.untyped_storage().nbytes()))
    except (NotImplementedError, RuntimeError):
        info = (val.device, None, _torch_bytes(val))
    if cache is not None:
        cache[id(val)] = (val, info)
    return info


def _storage(n: fx.Node, device: torch.device, cache: dict | None = None):
    """(storage key, bytes) of ``n``'s tensor on ``device``, or None."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    on, key, nbytes = _storage_info(val, cache)
    if on != device:
        return None
    return (key, nbytes) if key is not None else (("node", n), nbytes)


def _torch_bytes(val: torch.Tensor) -> int:
    numel = 1
    for s in val.shape:
        numel *= int(s) if not isinstance(s, torch.SymInt) else s.node.hint or 1
    return numel * val.element_size()


def known_storages_bytes(nodes, device: torch.device, cache: dict | None = None) -> int:
    """The bytes of the distinct storages of ``nodes``' values on ``device``
    (a tensor without storage, ``_storage``'s fallback, is not counted)."""
    seen, total = set(), 0
    for n in nodes:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        on, key, nbytes = _storage_info(val, cache)
        if on != device or key is None:
            continue
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def timeline_device(joint_gm: fx.GraphModule, primals) -> torch.device | None:
    """The device ``step_timeline`` measures every partition of ``joint_gm``
    on (``_device_of`` the forward), or None when it may depend on the
    partition: all tensors on the CPU, or one other device that a primal is on
    (the forward's placeholders come first)."""
    devices = {n.meta["val"].device for n in joint_gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)} - {torch.device("cpu")}
    if not devices:
        return torch.device("cpu")
    if len(devices) == 1 and any(isinstance(p.meta.get("val"), torch.Tensor) and
                                 p.meta["val"].device in devices for p in primals):
        return next(iter(devices))
    return None


def step_timeline(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule | None,
                  recomputed: frozenset[str] = frozenset(),
                  held_until: dict[str, int] | None = None,
                  cache: dict | None = None, device: torch.device | None = None) -> Timeline:
    """Note [Peak of a step]: the timeline of running ``fw_gm`` then ``bw_gm``.
    ``recomputed``: names of backward nodes that recompute forward values;
    ``held_until``: per offloaded value, the step its block is held to (its
    copy out still reading it: Note [Copies in time], copies.py); ``cache``:
    ``_storage_info``'s, for timelines of one joint's plans; ``device``: the
    one measured, when known (``timeline_device``), else ``_device_of`` the forward."""
    device = _device_of(fw_gm) if device is None else device
    fw_nodes = [n for n in fw_gm.graph.nodes if n.op == "call_function"]
    bw_nodes = [n for n in bw_gm.graph.nodes if n.op == "call_function"] if bw_gm else []
    steps = tuple([f"forward:{n.name}" for n in fw_nodes] +
                  [f"backward:{n.name}" for n in bw_nodes])
    last_step = max(len(steps) - 1, 0)
    nf = len(fw_nodes)
    fw_index = {n: i for i, n in enumerate(fw_nodes)}
    bw_index = {n: nf + i for i, n in enumerate(bw_nodes)}

    def last_use(n: fx.Node, index: dict, default: int) -> int:
        return max((index[u] for u in n.users if u in index), default=default)

    # storage -> [name, bytes, kind, start, end]
    spans: dict = {}

    def touch(key, nbytes, name, kind, start, end):
        span = spans.get(key)
        if span is None:
            spans[key] = [name, nbytes, kind, start, end]
        else:
            span[3], span[4] = min(span[3], start), max(span[4], end)
            if kind == "gradient":  # a view of a temporary returned: the storage is a gradient
                span[2] = kind

    # Note [Storages by data flow]: a node shares a storage only with an input
    # whose value has the same one (a view, an in-place op's result); anything
    # else is a new allocation.  The fake values cannot say it alone: a
    # recomputed node in the backward carries the forward node's value (and
    # storage), and per-use copies (planner.recompute_per_use) each carry it again.
    key_of: dict[fx.Node, object] = {}
    storage_of: dict[fx.Node, object] = {}   # the storage each placed node's value has

    def key(n: fx.Node, s, by_storage: dict | None = None):
        for a in n.all_input_nodes:
            if a in key_of and storage_of.get(a) == s[0]:
                return key_of[a]
        if by_storage is not None and s[0] in by_storage:
            return by_storage[s[0]]
        return ("node", id(n))

    def place(n: fx.Node, s, by_storage: dict | None = None):
        storage_of[n] = s[0]
        key_of[n] = k = key(n, s, by_storage)
        return k

    inputs = set()
    input_keys: dict = {}      # storage of a forward input -> its key
    for p in fw_gm.graph.find_nodes(op="placeholder"):
        s = _storage(p, device, cache)
        if s is not None:
            inputs.add(p.name)
            k = input_keys.setdefault(s[0], ("input", s[0]))
            storage_of[p] = s[0]
            key_of[p] = k
            touch(k, s[1], p.name, "input", 0, last_step)
    out = fw_gm.graph.output_node()
    descs = out.meta.get(DESC) or ()
    role = {}
    for v, d in zip(out.args[0], descs):
        if isinstance(v, fx.Node):
            role.setdefault(v, d)
    bw_places = {p.name: p for p in bw_gm.graph.find_nodes(op="placeholder")} if bw_gm else {}
    offloaded = {n.args[0] for n in fw_nodes if n.target is offload_op and n.args}
    fw_by_name = {}
    for n in fw_nodes:
        s = _storage(n, device, cache)
        if s is None:
            continue
        k = place(n, s, input_keys)
        fw_by_name[n.name] = (k, s[0])
        end, kind = last_use(n, fw_index, fw_index[n]), "activation"
        d = role.get(n)
        if isinstance(d, UserOutput):
            end, kind = max(end, nf - 1), "output"
        elif isinstance(d, Saved) and n.name in bw_places and n not in offloaded:
            end, kind = max(end, last_use(bw_places[n.name], bw_index, nf)), "saved"
        if n in offloaded:
            kind = "offloaded"
            end = max(end, (held_until or {}).get(n.name, end))
        touch(k, s[1], n.name, kind, fw_index[n], end)
    saved_keys: dict = dict(input_keys)   # storage -> key, of what the backward is given
    for name, p in bw_places.items():
        s = _storage(p, device, cache)
        if s is None:
            continue
        storage_of[p] = s[0]
        if name in inputs:
            key_of[p] = input_keys.get(s[0], ("input", s[0]))
            continue  # a saved input: counted whole step
        d = p.meta.get(DESC)
        if isinstance(d, Saved) and name in fw_by_name:
            key_of[p] = fw_by_name[name][0]
            saved_keys.setdefault(s[0], key_of[p])
            continue  # saved values were counted from the forward
        key_of[p] = k = saved_keys.get(s[0]) or ("node", id(p))
        saved_keys.setdefault(s[0], k)
        touch(k, s[1], name, "tangent" if isinstance(d, Tangent) else "saved", nf,
              last_use(p, bw_index, nf))
    grads = {a for a in (bw_gm.graph.output_node().args[0] if bw_gm else ())
             if isinstance(a, fx.Node)}
    input_key_set = set(input_keys.values())
    for n in bw_nodes:
        s = _storage(n, device, cache)
        if s is None:
            continue
        k = place(n, s)
        if n in grads:
            kind, end = "gradient", last_step
        else:
            kind = "reloaded" if n.target is reload_op else \
                "recomputed" if n.name in recomputed else "temporary"
            end = last_use(n, bw_index, bw_index[n])
        if k in input_key_set:
            continue  # a view of an input (t(weight))
        touch(k, s[1], n.name, kind, bw_index[n], end)
    return Timeline(steps, tuple(Buffer(*span) for span in spans.values()))
