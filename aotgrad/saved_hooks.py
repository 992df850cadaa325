"""Saved-tensor hooks, inlined into the compiled graphs (part of the partition stage).

Note [Which hooks are inlined]: hooks given as ``fx.GraphModule``s (what
``torch.compile`` makes of hooks it can trace, or ``fx.symbolic_trace(pack)``
of the user's) are inlined as below.  Hooks that are plain Python functions
are not: they may do what a trace cannot keep (count calls, write to disk,
keep a reference, ``torch.utils.checkpoint``'s holders), so, as in eager and
in PyTorch's AOTAutograd, autograd runs them at every call on every tensor
the compiled Function saves (the runtime saves with them active).  A program
compiled so donates no saved buffer (a hook may hold the tensor it packed).

When a ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)`` context of
GraphModules is active at compile time, aotgrad traces ``pack`` into the
forward graph, once per saved tensor, and ``unpack`` into the backward graph,
so that the compiler sees (and can fuse) them — e.g. an fp8 cast of every
activation::

    forward  before: return (out, relu)            backward before: (relu, tangents_1) -> ...
    forward  after:  _to_copy = relu.to(fp8)       backward after:  (_to_copy, tangents_1)
                     return (out, _to_copy)                          relu = _to_copy.to(f32) ...

The pack hook may return any pytree; its tensor leaves are what the forward
saves, its other leaves (a dtype, say) are constants the unpack trace sees.
While a hook is traced, ``saved_tensor_hook_context()`` returns
``{"_fw_graph", "_bw_graph", "_node"}`` — the graphs and the saved node.

Which saved tensors are hooked: Note [Which saved tensors are hooked].

Note [Hooks apply once]: the runtime saves the packed tensors with the hooks
switched off (identity hooks), so they are not packed a second time; the
hooks in force are part of the guard key (``api.guard_key``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch, config
from ._torch import pytree
from .descriptors import DESC, Primal, Saved
from .partition import Partitioned

_context: dict[str, Any] | None = None


def saved_tensor_hook_context() -> dict[str, Any] | None:
    """The graphs and node whose saved-tensor hook is being traced, else None."""
    return _context


@contextlib.contextmanager
def _tracing_hook(fw: fx.GraphModule, bw: fx.GraphModule, node: fx.Node):
    global _context
    prior, _context = _context, {"_fw_graph": fw, "_bw_graph": bw, "_node": node}
    try:
        yield
    finally:
        _context = prior


def inlineable(hooks: tuple | None) -> bool:
    """Note [Which hooks are inlined]: both hooks are GraphModules."""
    return hooks is not None and all(isinstance(h, fx.GraphModule) for h in hooks)


def guard_part() -> Any:
    """The hooks in force as the guard key sees them: inlined hooks
    themselves, else whether hooks run at run time (Note [Which hooks are
    inlined]: ``save_on_cpu()`` makes new functions at every ``with``)."""
    hooks = _torch.top_saved_tensor_hooks()
    return hooks if inlineable(hooks) else hooks is not None


def _identity(x):
    return x


@contextlib.contextmanager
def hooks_off():
    """Note [Hooks apply once]."""
    with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        yield


FILTERING_MODES = ("donated", "no_static", "all")


def hooked_saved_values(parts: Partitioned, static: frozenset[int] = frozenset()) -> list[bool]:
    """Note [Which saved tensors are hooked]: per saved tensor, whether the
    inlined hooks apply to it (``config.saved_tensors_hooks_filtering_mode``).
    The use of such hooks is to shrink what the forward keeps (an fp8 copy
    instead of the value); that frees memory only for a value nothing else
    holds.  "donated" (the default): only the forward's own intermediates, not
    sharing storage with a forward input, a user output or a gradient;
    "no_static": all but the parameters and buffers themselves; "all":
    every saved tensor.  With an in-place metadata change in either graph
    (``set_``, ``t_()``), the values' storages are not trusted and "donated"
    selects none."""
    mode = config.saved_tensors_hooks_filtering_mode
    if mode not in FILTERING_MODES:
        raise ValueError(f"aotgrad.config.saved_tensors_hooks_filtering_mode must be one of "
                         f"{FILTERING_MODES}, not {mode!r}")
    fw, bw = parts.fw_gm.graph, parts.bw_gm.graph
    outs = list(fw.output_node().args[0])
    saved = outs[parts.num_fwd_outputs:parts.num_fwd_outputs + parts.num_saved_tensors]
    if mode == "all":
        return [True] * len(saved)
    if mode == "no_static":
        return [not (n.op == "placeholder" and isinstance(n.meta.get(DESC), Primal) and
                     n.meta[DESC].index in static) for n in saved]
    if any(n.op == "call_function" and isinstance(n.target, _torch.OpOverload) and
           (torch.Tag.inplace_view in n.target.tags or "set_" in n.target._schema.name)
           for g in (fw, bw) for n in g.nodes):
        return [False] * len(saved)
    held = {_storage(n) for n in fw.find_nodes(op="placeholder")}
    held |= {_storage(n) for n in outs[:parts.num_fwd_outputs] if isinstance(n, fx.Node)}
    held |= {_storage(n) for n in bw.output_node().args[0] if isinstance(n, fx.Node)}
    return [_storage(n) is not None and _storage(n) not in held for n in saved]


def _storage(n: fx.Node):
    val = n.meta.get("val")
    return _torch.storage_of(val) if isinstance(val, torch.Tensor) else None


def inline_hooks(parts: Partitioned, hooks: tuple[Callable, Callable],
                 static: frozenset[int] = frozenset()) -> Partitioned:
    """The hooks traced into the graphs, for the saved tensors
    ``hooked_saved_values`` selects; the others are saved as they are (the
    runtime saves all of them with hooks off: Note [Hooks apply once])."""
    pack, unpack = hooks
    fw, bw = parts.fw_gm, parts.bw_gm
    fw_out = fw.graph.output_node()
    outs = list(fw_out.args[0])
    out_descs = list(fw_out.meta[DESC])
    first_saved = parts.num_fwd_outputs
    saved = outs[first_saved:first_saved + parts.num_saved_tensors]
    bw_inputs = bw.graph.find_nodes(op="placeholder")
    bw_saved = bw_inputs[parts.num_saved_symints:parts.num_saved_symints + parts.num_saved_tensors]
    hooked = hooked_saved_values(parts, static)
    if not any(hooked):
        return dataclasses.replace(parts, saved_hooks_inlined=True)
    chosen = [(node, bw_node) for node, bw_node, h in zip(saved, bw_saved, hooked) if h]
    packed_all = []
    for node, bw_node in chosen:
        with _tracing_hook(fw, bw, node):
            packed_all.append(_inline_pack(fw.graph, node, pack))
    # all new placeholders first, so that the unpack code's names never collide
    new_inputs = [_add_placeholders(bw.graph, bw_node, packed)
                  for (_, bw_node), (packed, _) in zip(chosen, packed_all)]
    anchor = next(n for n in bw.graph.nodes if n.op != "placeholder")
    for (node, bw_node), inputs, (packed, leaves_spec) in zip(chosen, new_inputs, packed_all):
        with _tracing_hook(fw, bw, node):
            _inline_unpack(bw.graph, bw_node, inputs, leaves_spec, unpack, anchor)
    packed_of = {node: packed for (node, _), (packed, _) in zip(chosen, packed_all)}
    new_saved: list[fx.Node] = []
    new_descs: list = []
    for node, desc, h in zip(saved, out_descs[first_saved:], hooked):
        if h:
            new_saved += packed_of[node]
            new_descs += [Saved(p.name) for p in packed_of[node]]
        else:
            new_saved.append(node)
            new_descs.append(desc)
    end = first_saved + parts.num_saved_tensors
    fw_out.args = (tuple(outs[:first_saved] + new_saved + outs[end:]),)
    fw_out.meta[DESC] = tuple(out_descs[:first_saved] + new_descs + out_descs[end:])
    for gm in (fw, bw):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return Partitioned(fw, bw, parts.num_fwd_outputs, len(new_saved), parts.num_saved_symints,
                       saved_hooks_inlined=True)


def _trace_hook(fn: Callable, example: list) -> tuple[fx.GraphModule, list]:
    """Trace ``fn`` over fake inputs; returns the graph and its flat outputs' leaves."""
    result: list = []

    def flat(*args):
        out_leaves, spec = pytree.tree_flatten(fn(*args))
        result[:] = [out_leaves, spec]
        return [x for x in out_leaves if isinstance(x, torch.Tensor)]

    with _torch.hide_saved_tensor_hooks():
        gm = _torch.make_fx(flat)(*example)
    return gm, result


def _inline_pack(graph: fx.Graph, node: fx.Node, pack: Callable):
    val = node.meta["val"]
    gm, (leaves, spec) = _trace_hook(pack, [val])
    with graph.inserting_before(graph.output_node()):
        mapped = graph.graph_copy(gm.graph, {gm.graph.find_nodes(op="placeholder")[0]: node})
    mapped = list(mapped) if isinstance(mapped, (list, tuple)) else [mapped]
    for m, leaf in zip(mapped, [x for x in leaves if isinstance(x, torch.Tensor)]):
        m.meta.setdefault("val", leaf)
    # structure for the unpack side: tensor leaves by position, other leaves as constants
    return mapped, (leaves, spec)


def _add_placeholders(graph: fx.Graph, old: fx.Node, packed: list) -> list[fx.Node]:
    new_inputs = []
    with graph.inserting_before(old):
        for p in packed:
            ph = graph.placeholder(p.name)
            ph.meta["val"] = p.meta.get("val")
            ph.meta[DESC] = Saved(p.name)
            new_inputs.append(ph)
    return new_inputs


def _inline_unpack(graph: fx.Graph, old: fx.Node, new_inputs: list, leaves_spec,
                   unpack: Callable, anchor: fx.Node):
    leaves, spec = leaves_spec
    tensor_slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def unpack_flat(*tensors):
        filled = list(leaves)
        for i, t in zip(tensor_slots, tensors):
            filled[i] = t
        return unpack(pytree.tree_unflatten(filled, spec))

    gm, _ = _trace_hook(unpack_flat, [p.meta["val"] for p in new_inputs])
    with graph.inserting_before(anchor):
        env = dict(zip(gm.graph.find_nodes(op="placeholder"), new_inputs))
        out = graph.graph_copy(gm.graph, env)
    out = out[0] if isinstance(out, (list, tuple)) else out
    old.replace_all_uses_with(out)
    graph.erase_node(old)
