"""Applying a plan: the forward and backward graphs, and the passes around them.

``build_partition`` extracts from the joint graph the forward (which returns
the saved values) and the backward (which takes them, and recomputes
everything else it needs just in time; ``offload.insert_offload`` moves the
offloaded values to CPU memory and back).  Around a
partitioner: the user's joint pass, common-subexpression elimination
(Note [CSE before partitioning]), and ``partition``, which runs any
partitioner, saves copies of mutated inputs and checks the calling
convention, giving a ``Partitioned``.
"""

from __future__ import annotations

import contextlib
import gc
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from .. import _torch, config
from ..descriptors import DESC, Primal, Saved, Tangent
from ..views import is_view_op
from .plan import sizes_instead_of_tensors
from .problem import RECOMPUTE_META, TAG_META, JointRoles, ancestors, impure_calls, side_effects


# ---------------------------------------------------------------- the forward and backward graphs


def build_partition(joint_gm: fx.GraphModule, roles: JointRoles,
                    saved: Sequence[fx.Node]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward graphs, given what the forward saves.

    Everything the backward needs that is not saved or a tangent is
    recomputed in the backward from saved values; ``saved`` must make that
    possible (a backward node may not reach a primal that is not saved).

    Note [Saved values are tensors or symbolic ints]: the forward returns
    saved tensors then saved symbolic ints; the backward takes them in the
    opposite order, symbolic ints first.
    """
    # a Python object the graph makes from constants (an invoke_quant's options):
    # the backward makes it again
    saved = [n for n in sizes_instead_of_tensors(roles, saved)
             if n.all_input_nodes or _torch.is_sym_node(n) or
             isinstance(n.meta.get("val"), torch.Tensor)]
    saved_syms = [n for n in saved if _torch.is_sym_node(n)]
    saved_tensors = [n for n in saved if not _torch.is_sym_node(n)]
    for n in saved_tensors:
        if not isinstance(n.meta.get("val"), torch.Tensor):
            raise AssertionError(f"aotgrad partition: saved value {n.format_node()} is not a tensor")
    fw_outputs = list(roles.fwd_outputs) + saved_tensors + saved_syms
    fw = extract_graph(joint_gm.graph, list(roles.primals), fw_outputs, side_effects(roles))
    _set_output_descs(fw, len(roles.fwd_outputs), saved_tensors + saved_syms)
    bw_inputs = saved_syms + saved_tensors + list(roles.tangents)
    bw = extract_graph(joint_gm.graph, bw_inputs, list(roles.bwd_outputs), roles.bwd_effects)
    bw = recompute_just_in_time(bw, len(roles.tangents))
    for node, src in zip(bw.find_nodes(op="placeholder"), bw_inputs):
        node.meta[DESC] = src.meta[DESC] if src in roles.tangents else Saved(src.name)
    return _torch.lazy_graph_module(joint_gm, fw), _torch.lazy_graph_module(joint_gm, bw)


def inputs_first(roots, placed: set[fx.Node]) -> list[fx.Node]:
    """The roots and the inputs they need, each after its inputs (depth first,
    without recursion), skipping the ``placed`` ones; ``placed`` grows."""
    order: list[fx.Node] = []
    for root in roots:
        stack = [(root, False)]
        while stack:
            n, inputs_done = stack.pop()
            if n in placed:
                continue
            if inputs_done:
                placed.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.all_input_nodes) if a not in placed)
    return order


def recompute_just_in_time(graph: fx.Graph, num_tangents: int) -> fx.Graph:
    """Note [Recompute just in time]: in the joint, every forward node comes
    before every backward node, so a backward extracted in that order
    recomputes everything first, and all the recomputed values are alive at
    once -- at the start of the backward, where the memory saved by not
    saving them is spent again.  Here the nodes that read a tangent (and the
    impure ones, and the output) keep their order, and every other node --
    a recomputation, or any work on saved values alone -- moves to just
    before the first of them that needs it, its own inputs first.  The
    nodes are moved, not copied; the graph computes the same values."""
    placeholders = graph.find_nodes(op="placeholder")
    anchored = set(placeholders[len(placeholders) - num_tangents:]) if num_tangents else set()
    impure = impure_calls(graph)
    for n in graph.nodes:
        if n.op == "output" or n in impure or \
                any(a in anchored for a in n.all_input_nodes):
            anchored.add(n)
    order = inputs_first([n for n in graph.nodes if n in anchored and n.op != "placeholder"],
                         set(placeholders))
    cursor = placeholders[-1] if placeholders else None
    for n in order:
        if cursor is None:
            first = next(iter(graph.nodes))
            if first is not n:
                first.prepend(n)
        elif cursor.next is not n:
            cursor.append(n)
        cursor = n
    if config.debug_assert:  # Note [Graph invariants] (check.py)
        graph.lint()
    return graph


def _set_output_descs(graph: fx.Graph, num_fwd_outputs: int, saved: list[fx.Node]) -> None:
    from ..descriptors import UserOutput

    graph.output_node().meta[DESC] = tuple(UserOutput(k) for k in range(num_fwd_outputs)) + \
        tuple(Saved(n.name) for n in saved)


def extract_graph(graph: fx.Graph, inputs: Sequence[fx.Node], outputs: Sequence,
                  effects: Sequence[fx.Node] = ()) -> fx.Graph:
    """A new graph computing ``outputs`` (and running ``effects``) from
    ``inputs`` (placeholders, in order).

    Nodes keep their names and meta.  Raises if an output depends on a
    placeholder of ``graph`` that is not among ``inputs``.
    """
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        p = _torch.add_node(new, "placeholder", n.name, (), {}, name=n.name)  # snake already
        p.meta.update(n.meta)    # (a new node's own dict: no attribute set, which costs)
        env[n] = p
    needed = ancestors(list(outputs) + list(effects), stop=frozenset(inputs))
    for n in graph.nodes:
        if n not in needed or n in env:
            continue
        if n.op == "placeholder":
            raise AssertionError(
                f"aotgrad partition: {n.name} is needed but is not an input of the new graph")
        if n.op == "output":
            continue
        made = _torch.add_node(new, n.op, n.target, fx.map_arg(n.args, env.__getitem__),
                               fx.map_arg(n.kwargs, env.__getitem__), n.name, n.type)
        made.meta.update(n.meta)
        env[n] = made
    new.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    return new  # in the source graph's order, so well formed (no lint: 2% of a CNN's compile)


@contextlib.contextmanager
def gc_paused():
    """Note [No GC while partitioning]: building two graphs allocates many
    small objects, and in a process holding large graphs each collection
    walks them all; a partition makes no garbage cycles worth collecting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- around a partitioner


def _save_copies_of_mutated_primals(fw_gm: fx.GraphModule, num_fwd_outputs: int,
                                    mutated: frozenset[int]) -> None:
    """Note [Saving mutated inputs]: an input that is mutated (in the graph or
    by the runtime's write-back) must not be saved as is — the backward would
    read the mutated value.  The forward saves a clone of its original value."""
    if not mutated:
        return
    graph = fw_gm.graph
    out = graph.output_node()
    values = list(out.args[0])
    clones: dict[fx.Node, fx.Node] = {}
    placeholders = graph.find_nodes(op="placeholder")
    for k in range(num_fwd_outputs, len(values)):
        v = values[k]
        if not isinstance(v, fx.Node) or _torch.is_sym_node(v):
            continue
        root = _view_root(v)  # a view of a mutated input dies with it too
        desc = root.meta.get(DESC)
        if root.op == "placeholder" and isinstance(desc, Primal) and desc.index in mutated:
            if v not in clones:
                with graph.inserting_after(v if v.op != "placeholder" else placeholders[-1]):
                    c = graph.call_function(_torch.aten.clone.default, (v,))
                c.meta["val"] = v.meta.get("val")
                clones[v] = c
            values[k] = clones[v]
    if clones:
        out.args = (tuple(values),)
        fw_gm.recompile()


def _view_root(node: fx.Node) -> fx.Node:
    """The node ``node`` is a view of, through view ops and the items of
    multi-output views (``split(x)[1]``)."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if is_view_op(node.target) or (node.target is operator.getitem and
                                       source.op == "call_function" and
                                       is_view_op(source.target)):
            node = source
        else:
            break
    return node


@dataclass(frozen=True)
class Partitioned:
    """The forward and backward graphs and how many values the forward saves."""
    fw_gm: fx.GraphModule
    bw_gm: fx.GraphModule
    num_fwd_outputs: int
    num_saved_tensors: int
    num_saved_symints: int
    saved_hooks_inlined: bool = False     # Note [Hooks apply once] (saved_hooks.py)
    saved_hooks_at_runtime: bool = False  # Note [Which hooks are inlined] (saved_hooks.py)


def run_joint_custom_pass(joint_gm: fx.GraphModule, joint_inputs) -> fx.GraphModule:
    """``config.joint_custom_pass(joint_gm, joint_inputs)`` when set: a pass of
    the user's on the joint graph, before the partitioner.  It may change the
    graph in place or return another one; either must keep the placeholders'
    descriptors (``node.meta["desc"]``), which partitioners read roles from."""
    custom = config.joint_custom_pass
    if custom is None:
        return joint_gm
    if not callable(custom):
        raise TypeError(f"aotgrad.config.joint_custom_pass must be a callable "
                        f"(joint_gm, joint_inputs) -> joint_gm, not {custom!r}")
    out = custom(joint_gm, joint_inputs)
    if not isinstance(out, fx.GraphModule):
        raise TypeError("aotgrad.config.joint_custom_pass must return the joint "
                        f"fx.GraphModule, not {type(out).__name__}")
    for key, value in joint_gm.meta.items():  # e.g. STATIC_INPUTS_META
        out.meta.setdefault(key, value)
    return out


#: Ops CSE never merges: two calls are two different tensors (``empty``'s
#: contents are undefined, each is its own buffer).
_NEVER_MERGED = frozenset({_torch.aten.empty, _torch.aten.empty_like, _torch.aten.empty_strided,
                           _torch.aten.new_empty, _torch.aten.new_empty_strided})


def eliminate_common_subexpressions(gm: fx.GraphModule) -> int:
    """Note [CSE before partitioning] (``config.cse``): nodes that call the same
    op on the same arguments are merged, in place, before the min-cut chooses
    what to save -- a value computed twice is otherwise saved (or recomputed)
    twice.  Never merged: random ops (each call draws new numbers), effectful
    and mutating ops, ``empty``, nodes across an in-place op (the key carries a
    count of the mutations before the node), nodes whose values share storage
    with a graph output (eager returns separate tensors), and nodes with
    different checkpoint marks or tags.  Returns the number of nodes removed::

        before: sin = sin(primals_1); sin_1 = sin(primals_1); add = add(sin, sin_1)
        after:  sin = sin(primals_1); add = add(sin, sin)
    """
    graph = gm.graph
    out_storages = {_storage(n) for n in graph.output_node().all_input_nodes} - {None}
    impure = impure_calls(graph)
    seen: dict = {}
    region = 0
    removed = 0

    def key_of(a):
        if isinstance(a, fx.Node):
            return ("node", a)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(key_of(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, key_of(v)) for k, v in a.items())))
        if isinstance(a, slice):
            return ("slice", key_of(a.start), key_of(a.stop), key_of(a.step))
        return (type(a), a)   # 1, 1.0 and True are equal as keys, not as arguments

    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        target = n.target
        if isinstance(target, _torch.OpOverload) and target._schema.is_mutable or n in impure:
            region += 1
            continue
        if isinstance(target, _torch.OpOverload) and (
                torch.Tag.nondeterministic_seeded in target.tags or
                target.overloadpacket in _NEVER_MERGED):
            continue
        if _storage(n) in out_storages:
            continue
        try:
            key = (target, key_of(n.args), key_of(n.kwargs), region,
                   repr(n.meta.get(RECOMPUTE_META)), n.meta.get(TAG_META))
            hash(key)
        except TypeError:  # an argument that cannot be a key
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = n
            continue
        n.replace_all_uses_with(first)
        graph.erase_node(n)
        removed += 1
    if removed:
        gm.recompile()
    return removed


def _storage(n: fx.Node):
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return _torch.StorageWeakRef(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


def partition(joint_gm: fx.GraphModule, joint_inputs, num_fwd_outputs: int,
              partition_fn, mutated_primals: frozenset[int] = frozenset()) -> Partitioned:
    """Run a partitioner and check that its graphs follow the calling convention
    (after ``config.joint_custom_pass``, when set)."""
    joint_gm = run_joint_custom_pass(joint_gm, joint_inputs)
    fw_gm, bw_gm = partition_fn(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)
    _save_copies_of_mutated_primals(fw_gm, num_fwd_outputs, mutated_primals)
    fw_outs = fw_gm.graph.output_node().args[0]
    saved = fw_outs[num_fwd_outputs:]
    num_syms = sum(1 for n in saved if isinstance(n, fx.Node) and _torch.is_sym_node(n))
    num_tensors = len(saved) - num_syms
    if any(_torch.is_sym_node(n) for n in saved[:num_tensors]):
        raise AssertionError("aotgrad partition: the forward must return saved tensors before "
                             "saved symbolic ints (Note [Saved values are tensors or symbolic ints])")
    num_tangents = sum(1 for n in joint_gm.graph.find_nodes(op="placeholder")
                       if isinstance(n.meta.get(DESC), Tangent))
    num_bw_inputs = len(bw_gm.graph.find_nodes(op="placeholder"))
    if num_bw_inputs != len(saved) + num_tangents:
        raise AssertionError(
            f"aotgrad partition: the backward takes {num_bw_inputs} inputs, expected "
            f"{len(saved)} saved values + {num_tangents} tangents")
    return Partitioned(fw_gm, bw_gm, num_fwd_outputs, num_tensors, num_syms)
