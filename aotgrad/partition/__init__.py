"""Stage 5 — partition: split the joint graph into forward and backward.

Every partitioner has the signature

    partition_fn(joint_gm, joint_inputs, *, num_fwd_outputs) -> (fw_gm, bw_gm)

and produces graphs in the calling convention of Note [Calling convention]
(``aotgrad/__init__.py``): the forward returns
``(*forward_outputs, *saved_tensors, *saved_symints)``; the backward takes
``(*saved_symints, *saved_tensors, *tangents)`` and returns one gradient (or
None) per primal.  Roles are read from the descriptors the trace stage puts on
placeholders (``node.meta["desc"]``), never from node names.

``default_partition`` saves what the backward uses and recomputes nothing::

    joint:  sin = sin(primals_1); cos = cos(sin)              # forward
            mul = mul(tangents_1, neg(sin(sin)))              # backward
            mul_1 = mul(mul, cos(primals_1))
    fw:     return (cos, primals_1, sin)                      # saves primals_1, sin
    bw:     (primals_1, sin, tangents_1) -> (mul_1,)

The layers, each importing only those before it:

1. the problem — ``problem.py``: the joint graph's roles and walks, what the
   backward may recompute (``NodeRole``), what values cost (bytes, recompute
   time); ``marks.py``: the marks programs put on values (``tag``, checkpoint
   regions) and the roles they give;
2. the solvers — ``mincut.py`` (Note [Min-cut rematerialization]: fewest
   bytes, recomputing only cheap ops), then ``budget.py`` (Note [Memory
   budget]: within a budget, recomputing costly ops as cheaply as it can);
3. the plan — ``plan.py``: the saved values as the graphs keep them (sizes
   for tensors read only for their sizes; which go to CPU memory);
4. applying it — ``apply.py``: the forward and backward graphs and
   ``partition``, which runs a partitioner and checks its graphs;
   ``offload.py``: the copies to CPU memory and back (Note [Offload]);
5. the partitioners users pass — ``policy.py``: ``default_partition``,
   ``min_cut_rematerialization_partition``, ``MemoryPolicy``.

This module re-exports their public names.
"""

from .problem import (
    BUILTIN_NAMESPACES,
    CHEAP_NON_POINTWISE_OPS,
    CHEAP_TAGS,
    COMPUTE_INTENSIVE_OPS,
    NEVER_RECOMPUTE_NAMESPACES,
    NEVER_RECOMPUTE_TAGS,
    RECOMPUTE_META,
    REDUCTION_OPS,
    STATIC_INPUTS_META,
    TAG_META,
    JointRoles,
    NodeRole,
    RecomputePolicy,
    StorageCache,
    activation_bytes,
    ancestors,
    backward_uses,
    configured_cost,
    default_roles,
    descendants,
    flops,
    forward_nodes,
    has_recompute_marks,
    impure_calls,
    is_cheap_to_recompute,
    is_fusible,
    is_random_or_mutating,
    joint_roles,
    profiled_cost,
    reachable,
    recompute_cost,
    replayable_random,
    saved_tensor_bytes,
    side_effects,
    size_hint,
    static_primals,
    tensor_bytes,
)
from .marks import CheckpointRegionMarker, node_roles, strip_tags, tag
from .mincut import Cut, FlowNetwork, RematProblem, min_cut_saved_values
from .budget import budget_saved_values
from .plan import offloaded, sizes_instead_of_tensors
from .apply import (
    Partitioned,
    build_partition,
    eliminate_common_subexpressions,
    extract_graph,
    gc_paused,
    partition,
    recompute_just_in_time,
    run_joint_custom_pass,
)
from .offload import insert_offload
from .policy import (
    MemoryPolicy,
    default_partition,
    min_cut_rematerialization_partition,
    policy_partition,
)

__all__ = [
    # the problem
    "STATIC_INPUTS_META", "TAG_META", "RECOMPUTE_META", "has_recompute_marks",
    "static_primals", "JointRoles", "joint_roles", "reachable", "ancestors", "descendants",
    "impure_calls", "side_effects", "forward_nodes", "backward_uses",
    "CHEAP_NON_POINTWISE_OPS", "NEVER_RECOMPUTE_TAGS", "CHEAP_TAGS", "REDUCTION_OPS",
    "COMPUTE_INTENSIVE_OPS", "BUILTIN_NAMESPACES", "NEVER_RECOMPUTE_NAMESPACES",
    "is_cheap_to_recompute", "is_fusible", "RecomputePolicy", "NodeRole",
    "is_random_or_mutating", "replayable_random", "default_roles",
    "size_hint", "tensor_bytes", "saved_tensor_bytes", "StorageCache", "activation_bytes",
    "flops", "recompute_cost", "configured_cost", "profiled_cost",
    "tag", "strip_tags", "CheckpointRegionMarker", "node_roles",
    # the solvers
    "FlowNetwork", "Cut", "RematProblem", "min_cut_saved_values", "budget_saved_values",
    # the plan
    "sizes_instead_of_tensors", "offloaded",
    # applying it
    "build_partition", "recompute_just_in_time", "extract_graph", "gc_paused",
    "insert_offload", "Partitioned", "run_joint_custom_pass",
    "eliminate_common_subexpressions", "partition",
    # the partitioners
    "default_partition", "min_cut_rematerialization_partition", "MemoryPolicy",
    "policy_partition",
]
