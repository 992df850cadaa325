"""The partitioners: what users pass as ``partition_fn``.

``default_partition`` (save what the backward uses),
``min_cut_rematerialization_partition`` (save fewest bytes, Note [Min-cut
rematerialization], mincut.py; under a memory budget, Note [Memory budget],
budget.py) and ``MemoryPolicy`` (say what to save, recompute or offload, by
tag or op; Note [Tags], marks.py).  Each runs the layers below in order:
roles (problem.py, marks.py), a solver, the plan (plan.py), the graphs
(apply.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .. import _torch, config
from ..rng import replay_random_ops
from .apply import build_partition, eliminate_common_subexpressions, gc_paused
from .offload import insert_offload
from .budget import budget_saved_values
from .marks import node_roles
from .plan import offloaded
from .planner import parse_memory_budget, plan_for_peak
from .problem import TAG_META, RecomputePolicy, backward_uses, configured_cost, forward_nodes, \
    has_recompute_marks, is_cheap_to_recompute, joint_roles


def min_cut_rematerialization_partition(
        joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
        recompute_policy: RecomputePolicy = is_cheap_to_recompute,
        activation_memory_budget: float | None = None,
        recompute_cost: Callable[[fx.Node], int] | None = None,
        memory_budget: int | float | str | None = None,
        **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save a minimum-byte set of forward values; recompute cheap ops in the backward.

    ``recompute_policy(node) -> bool`` says which forward nodes the backward
    may recompute for free (default ``is_cheap_to_recompute``).  With an
    ``activation_memory_budget`` below 1 (default:
    ``config.activation_memory_budget``) costly ops may be recomputed too, to
    save at most that fraction of the plain min-cut's bytes, priced by
    ``recompute_cost`` (default:
    ``config.activation_memory_budget_runtime_estimator``, ``configured_cost``:
    the roofline estimate ``recompute_cost``; ``profiled_cost()`` times the ops
    instead; Note [Memory budget]).  ``memory_budget`` (default
    ``config.memory_budget``) bounds the estimated peak of the whole step
    instead: bytes (``"6GiB"``) or a fraction of the plain plan's peak (Note
    [Peak budget], planner.py).  ``config.cse`` merges repeated computations
    first (Note [CSE before partitioning]); the options of Note [Recompute
    bans] (bans.py) restrict what is recomputed for free.  Checkpoint regions
    are honoured (Note [Checkpoint regions], marks.py).  Other keyword
    arguments (``compiler=``, ``static_lifetime_input_indices=`` ...) are
    accepted and ignored.  See Note [Min-cut rematerialization].
    """
    return policy_partition(joint_gm, num_fwd_outputs, None, recompute_policy,
                            activation_memory_budget, recompute_cost, memory_budget)


@dataclass(frozen=True)
class MemoryPolicy:
    """What to save, recompute or offload, by tag name or by op; also a partitioner.

    ``save``: never recompute these (save them if the backward needs them);
    ``recompute``: never save these (the backward recomputes them);
    ``offload``: save these in CPU memory (pinned, copied without blocking on
    CUDA) and copy them back at the start of the backward.  Entries are tag
    names (``aotgrad.tag``) or ops (``torch.ops.aten.mm`` or an overload).
    ``budget`` is a memory budget for the rest (Note [Memory budget]; default
    ``config.activation_memory_budget``), with ``recompute_cost`` pricing
    recomputation (default: a roofline estimate; ``profiled_cost()``, problem.py,
    times the ops); ``memory_budget`` a budget in bytes of the step's peak
    instead (default ``config.memory_budget``; Note [Peak budget], planner.py).
    Pass the policy as ``partition_fn``.
    """
    save: Sequence[Any] = ()
    recompute: Sequence[Any] = ()
    offload: Sequence[Any] = ()
    budget: float | None = None
    memory_budget: int | float | str | None = None
    recompute_policy: RecomputePolicy = is_cheap_to_recompute
    recompute_cost: Callable[[fx.Node], int] | None = None

    def __post_init__(self) -> None:
        for field in ("save", "recompute", "offload"):
            items = tuple(getattr(self, field))
            for item in items:
                if not isinstance(item, (str, _torch.OpOverload, _torch.OpOverloadPacket)):
                    raise TypeError(
                        f"aotgrad.MemoryPolicy: {field} entries are tag names or aten ops "
                        f"(torch.ops.aten.mm), not {item!r}")
            object.__setattr__(self, field, items)
        parse_memory_budget(self.memory_budget)           # a bad budget fails here
        both = (set(self.save) | set(self.offload)) & set(self.recompute)
        if both:
            raise ValueError(f"aotgrad.MemoryPolicy: {sorted(map(str, both))} is both kept "
                             "(save/offload) and recomputed")

    def choice(self, node: fx.Node) -> str | None:
        """"offload", "recompute", "save" or None for this node."""
        keys = set(node.meta.get(TAG_META, ()))
        if isinstance(node.target, _torch.OpOverload):
            keys |= {node.target, node.target.overloadpacket}
        for name in ("offload", "recompute", "save"):
            if keys.intersection(getattr(self, name)):
                return name
        return None

    def __call__(self, joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
                 **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
        return policy_partition(joint_gm, num_fwd_outputs, self)


def default_partition(joint_gm: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int,
                      **_ignored) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Save every forward value the backward uses; recompute nothing — unless
    the program marks values to recompute (checkpoint regions) or names them
    (tags): then the min-cut partitioner honours the marks (Note [Checkpoint
    regions], marks.py)."""
    if has_recompute_marks(joint_gm):
        return min_cut_rematerialization_partition(joint_gm, joint_inputs,
                                                   num_fwd_outputs=num_fwd_outputs,
                                                   activation_memory_budget=1.0)
    with gc_paused():
        roles = joint_roles(joint_gm, num_fwd_outputs)
        fwd = forward_nodes(roles)
        return build_partition(joint_gm, roles, backward_uses(joint_gm, roles, fwd))


def policy_partition(joint_gm: fx.GraphModule, num_fwd_outputs: int,
                     policy: MemoryPolicy | None,
                     recompute_policy: RecomputePolicy = is_cheap_to_recompute,
                     activation_budget: float | None = None,
                     cost: Callable[[fx.Node], int] | None = None,
                     memory_budget: int | float | str | None = None,
                     ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The partition for a ``MemoryPolicy`` (or none): roles, budget, offload."""
    if policy is not None:
        recompute_policy = policy.recompute_policy
        activation_budget = policy.budget if activation_budget is None else activation_budget
        memory_budget = policy.memory_budget if memory_budget is None else memory_budget
        cost = policy.recompute_cost if cost is None else cost
    budget = config.activation_memory_budget if activation_budget is None else activation_budget
    peak = parse_memory_budget(config.memory_budget if memory_budget is None else memory_budget)
    if peak is not None and float(budget) < 1.0:
        raise ValueError(
            f"aotgrad: both a peak budget (memory_budget={peak.text!r}) and a saved-bytes "
            f"budget (activation_memory_budget={budget}) are set; they are two ways of asking "
            "for less memory: set one (Note [Peak budget])")
    with gc_paused():
        if config.cse:  # Note [CSE before partitioning] (apply.py)
            eliminate_common_subexpressions(joint_gm)
        if peak is not None:
            return plan_for_peak(joint_gm, num_fwd_outputs, peak, recompute_policy,
                                 node_roles(policy, recompute_policy), cost or configured_cost(),
                                 lambda saved: [n.name for n in offloaded(policy, saved)])
        roles = joint_roles(joint_gm, num_fwd_outputs)
        saved = budget_saved_values(joint_gm, num_fwd_outputs, float(budget), recompute_policy,
                                    node_roles(policy, recompute_policy),
                                    cost or configured_cost())
        fw_gm, bw_gm = build_partition(joint_gm, roles, saved)
        replay_random_ops(fw_gm, bw_gm, num_fwd_outputs)   # Note [Replayed random ops]
        insert_offload(fw_gm, bw_gm, [n.name for n in offloaded(policy, saved)])
    return fw_gm, bw_gm
