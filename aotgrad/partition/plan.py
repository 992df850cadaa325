"""The plan: which values the forward saves, and in what form.

The solvers (mincut.py, budget.py; ``backward_uses`` for ``default_partition``)
choose the saved set; here it becomes what the graphs keep: a tensor that the
backward reads only for its sizes is replaced by those sizes (Note [Saving
sizes, not tensors]), and a ``MemoryPolicy`` picks the saved values kept in CPU
memory (``offloaded``; Note [Offload], offload.py).  What is not saved the
backward recomputes.  apply.py builds the graphs from the plan.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from .. import _torch
from .problem import JointRoles, ancestors


_SIZE_OPS = frozenset(("aten::sym_size.int", "aten::sym_stride.int", "aten::sym_numel.",
                       "aten::sym_storage_offset."))


def _is_size_op(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return schema is not None and f"{schema.name}.{schema.overload_name}" in _SIZE_OPS


def sizes_instead_of_tensors(roles: JointRoles, saved: Sequence[fx.Node]) -> list[fx.Node]:
    """Note [Saving sizes, not tensors]: a saved tensor that the backward
    reads only for its symbolic sizes (``sym_size(primals_1, 0)`` for the
    ``expand`` of a ``sum``'s gradient) is replaced by those sizes, computed
    in the forward: the backward then keeps two ints, not the tensor, as
    PyTorch's partitioners do.  In graph order, the tensors first."""
    if not any(may_save_sizes(n) for n in saved) and len(set(saved)) == len(saved):
        return list(saved)    # nothing to replace (the loop below would keep ``saved``)
    stop = frozenset(saved) | frozenset(roles.tangents)
    backward = ancestors(roles.bwd_outputs, stop=stop) - stop
    bwd_outputs = set(roles.bwd_outputs)
    out: dict[fx.Node, None] = {}     # an ordered set
    for n in saved:
        readers = [u for u in n.users if u in backward]
        if readers and all(_is_size_op(u) for u in readers) and \
                n not in bwd_outputs and not _torch.is_sym_node(n):
            out.update(dict.fromkeys(readers))
        else:
            out[n] = None
    out = list(out)
    if len(out) == len(saved) and all(a is b for a, b in zip(out, saved)):
        return list(saved)
    order = {n: k for k, n in enumerate(roles.primals[0].graph.nodes)} if roles.primals else {}
    return sorted(out, key=lambda n: (_torch.is_sym_node(n), order.get(n, 0)))


def may_save_sizes(n: fx.Node) -> bool:
    """Whether ``sizes_instead_of_tensors`` may replace the saved ``n`` by its
    sizes: only a tensor some size op reads."""
    return any(_is_size_op(u) for u in n.users)


def offloaded(policy: MemoryPolicy | None, saved: Sequence[fx.Node]) -> list[fx.Node]:
    return [n for n in saved if policy is not None and policy.choice(n) == "offload"
            and isinstance(n.meta.get("val"), torch.Tensor)]
