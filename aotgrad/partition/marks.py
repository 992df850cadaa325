"""Saying what the backward keeps, by name: tags, policies, checkpoint regions.

    def attention(q, k, v):
        scores = aotgrad.tag(q @ k.transpose(-2, -1), "attn_scores")
        return scores.softmax(-1) @ v

    policy = aotgrad.MemoryPolicy(recompute=["attn_scores"], offload=[torch.ops.aten.mm])
    compiled = aotgrad.aot_function(f, nop, partition_fn=policy)

Note [Tags]: ``tag(x, name)`` returns ``x`` when run eagerly.  While aotgrad
(or dynamo) traces, it calls the op ``aotgrad::tag``, whose gradient is the
identity; right after tracing, ``strip_tags`` removes those nodes from the
graph and records the name on the node that computed ``x``
(``node.meta["aotgrad_tag"]``).  Graphs never contain the op.

Note [Checkpoint regions]: ``torch.utils.checkpoint`` marks what to recompute
in ``node.meta["recompute"]`` (a ``CheckpointPolicy``): selective
checkpointing's policy marks every op it sees while aotgrad traces, and
dynamo marks the ops of a plain checkpoint region.  For a plain region traced
by ``aot_function`` (whose hooks autograd ignores while aotgrad traces),
``CheckpointRegionMarker`` marks the ops run while the region's saved-tensor
hook is innermost as ``PREFER_RECOMPUTE``.  The partitioners honour the marks
(``node_roles``): recompute what is marked so — never a random op (its output
is saved instead: same numbers, as checkpoint's RNG replay gives) and not a
region output used outside the region (eager saves those for the ops after
the region) — and keep what is marked to save.

Priority, per value: a ``MemoryPolicy`` entry (by tag name or op; the policy
itself is in policy.py), then the checkpoint mark, then the partitioner's own
choice.
"""


from __future__ import annotations

import itertools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _torch, hops
from ..descriptors import DESC, Grad
from .problem import RECOMPUTE_META, TAG_META, NodeRole, RecomputePolicy, ancestors, \
    default_roles, is_cheap_to_recompute, is_random_or_mutating


# ---------------------------------------------------------------- tags


@torch.library.custom_op("aotgrad::tag", mutates_args=())
def _tag_op(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@_tag_op.register_fake
def _(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _tag_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    return grad, None


_tag_op.register_autograd(_tag_backward)


def tag(x: torch.Tensor, name: str) -> torch.Tensor:
    """Name the value ``x`` for a ``MemoryPolicy`` (Note [Tags]); returns ``x``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"aotgrad.tag: the name must be a non-empty string, not {name!r}")
    if torch.compiler.is_compiling() or _torch.is_functional(x) or \
            isinstance(x, _torch.FakeTensor):  # traced (Note [Functional already], trace.py)
        return torch.ops.aotgrad.tag(x, name)
    return x


def strip_tags(gm: fx.GraphModule) -> None:
    """Remove ``aotgrad::tag`` nodes, recording their names (Note [Tags])."""
    nodes = gm.graph.find_nodes(op="call_function", target=torch.ops.aotgrad.tag.default)
    for node in nodes:
        src, name = node.args
        src.meta[TAG_META] = (*src.meta.get(TAG_META, ()), name)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    if nodes:
        gm.recompile()


# ---------------------------------------------------------------- checkpoint regions

class CheckpointRegionMarker(TorchDispatchMode):
    """Marks the nodes traced inside a plain checkpoint region (Note [Checkpoint regions])."""

    supports_higher_order_operators = True  # they pass through like any op

    ignore_compile_internals = hops.transparent_to_hop_compiles  # Note [Dynamo under
                                                                 # aotgrad's modes] (hops.py)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "prim":  # metadata queries (prim::device), asked by C++
            return func(*args, **(kwargs or {}))  # code that an exception cannot cross
        graph = None
        if _torch.in_checkpoint_region():  # (the light tracer refuses regions itself)
            graph = _torch.current_trace_graph()
        if graph is None:
            return func(*args, **(kwargs or {}))
        before = len(graph.nodes)
        out = func(*args, **(kwargs or {}))
        # a selective-checkpoint policy's mark when one is active (torch 2.11 leaves
        # it in fx_traceback's current meta), else the plain region's
        mark = _torch.selective_checkpoint_mark() or \
            _torch.checkpoint_policies().PREFER_RECOMPUTE
        for node in itertools.islice(reversed(graph.nodes), len(graph.nodes) - before):
            node.meta.setdefault(RECOMPUTE_META, mark)
        return out


# ---------------------------------------------------------------- roles, from a policy and the marks


def node_roles(policy: MemoryPolicy | None,
               recompute_policy: RecomputePolicy = is_cheap_to_recompute,
               ) -> Callable[[fx.Node], NodeRole]:
    """Node roles for the min-cut network from a policy, the checkpoint
    marks and the recompute policy (Note [Checkpoint regions])."""
    base = default_roles(recompute_policy)
    cp = _torch.checkpoint_policies()
    keep = {cp.MUST_SAVE, cp.PREFER_SAVE}
    forward: dict[int, set] = {}   # per joint graph: what its forward outputs need

    def used_outside_region(n: fx.Node) -> bool:
        """Read by a forward op after the region (eager saves it for that op)."""
        if id(n.graph) not in forward:
            out = n.graph.output_node()
            descs = out.meta.get(DESC) or ()
            forward[id(n.graph)] = ancestors(
                [v for v, d in zip(out.args[0], descs) if not isinstance(d, Grad)])
        fwd = forward[id(n.graph)]
        return any(u.op == "output" or (RECOMPUTE_META not in u.meta and u in fwd)
                   for u in n.users)

    def role(n: fx.Node) -> NodeRole:
        if n.op == "placeholder":
            return NodeRole.BANNED
        want = policy.choice(n) if policy is not None else None
        if want is None and RECOMPUTE_META in n.meta:
            mark = n.meta[RECOMPUTE_META]
            if mark in keep:
                want = "save"
            elif mark == cp.MUST_RECOMPUTE or not used_outside_region(n):
                want = "recompute"
        if want in ("save", "offload"):
            return NodeRole.BANNED
        if want == "recompute":
            if is_random_or_mutating(n) or not isinstance(n.meta.get("val"), torch.Tensor) or \
                    (n.target is operator.getitem and is_random_or_mutating(n.args[0])):
                return base(n)   # a random op's outputs are saved, never recomputed
            return NodeRole.NO_SAVE
        return base(n)

    return role
