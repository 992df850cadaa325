"""The partitioning problem: what the joint graph asks of a partitioner.

The bottom layer of ``aotgrad.partition``; it imports nothing of the layers
above (the solvers, the plan, applying it).  It holds

* the joint graph's nodes by role (``JointRoles``: primals, tangents,
  forward and backward outputs, the backward's effects) and the walks over it
  (``ancestors``, ``descendants``, ``forward_nodes``; ``backward_uses``: what
  ``default_partition`` saves);
* what the backward may recompute (``NodeRole``, ``default_roles``): the
  recompute policy, whose rules are data (``CHEAP_TAGS``,
  ``CHEAP_NON_POINTWISE_OPS``, ``NEVER_RECOMPUTE_TAGS`` ...);
* what values cost: the bytes a saved value keeps alive (``tensor_bytes``,
  ``activation_bytes``) and the time to recompute it (``recompute_cost``, a
  roofline; ``profiled_cost``, timed; ``configured_cost``, as the config says;
  Note [Memory budget], budget.py).
"""

from __future__ import annotations

import enum
import operator
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from .. import _torch, config, tokens
from ..descriptors import DESC, Primal, Tangent

aten = torch.ops.aten


# ---------------------------------------------------------------- the joint graph: roles and walks


#: ``joint_gm.meta`` key: the Primal indices of parameters and buffers (the
#: inputs whose lifetime is the model's, not the call's; set by the pipeline).
STATIC_INPUTS_META = "aotgrad_static_inputs"
# the marks of checkpoint regions and tags on joint-graph nodes (marks.py)
TAG_META = "aotgrad_tag"
RECOMPUTE_META = "recompute"


def has_recompute_marks(gm: fx.GraphModule) -> bool:
    return any(RECOMPUTE_META in n.meta or TAG_META in n.meta for n in gm.graph.nodes)


def static_primals(gm: fx.GraphModule) -> frozenset[int]:
    """Primal indices of the parameters and buffers among ``gm``'s inputs."""
    return frozenset(gm.meta.get(STATIC_INPUTS_META, ()))


@dataclass(frozen=True)
class JointRoles:
    """The joint graph's nodes by role."""
    primals: tuple[fx.Node, ...]
    tangents: tuple[fx.Node, ...]
    fwd_outputs: tuple            # nodes (or None)
    bwd_outputs: tuple            # nodes (or None), one per primal
    bwd_effects: tuple = ()       # effects the backward runs (Note [Effects in the backward])

    @property
    def bwd_roots(self) -> list:
        """What the backward must compute: its outputs, and its effects."""
        return list(self.bwd_outputs) + list(self.bwd_effects)


def joint_roles(joint_gm: fx.GraphModule, num_fwd_outputs: int) -> JointRoles:
    primals, tangents = [], []
    for node in joint_gm.graph.find_nodes(op="placeholder"):
        desc = node.meta.get(DESC)
        if isinstance(desc, Primal):
            primals.append(node)
        elif isinstance(desc, Tangent):
            tangents.append(node)
        else:
            raise ValueError(
                f"aotgrad partition: placeholder {node.name} has no Primal/Tangent descriptor "
                "(node.meta['desc']); partitioners take joint graphs traced by aotgrad")
    outs = tuple(joint_gm.graph.output_node().args[0])
    return JointRoles(tuple(primals), tuple(tangents), outs[:num_fwd_outputs],
                      outs[num_fwd_outputs:], _backward_effects(joint_gm.graph, tangents))


def _backward_effects(graph: fx.Graph, tangents: list[fx.Node]) -> tuple[fx.Node, ...]:
    """Note [Effects in the backward] (tokens.py): the effects the trace
    recorded in the backward, and any that read a tangent."""
    effects = tokens.effects_of(graph)
    if not effects:
        return ()
    marked = [n for n in effects if n.meta.get(tokens.BACKWARD_EFFECT)]
    side = descendants(list(tangents) + marked)
    return tuple(n for n in effects if n in side)


def reachable(start: Iterable, step, stop: frozenset = frozenset()) -> set[fx.Node]:
    """The nodes reached from ``start`` (inclusive) by ``step(node)``, not past ``stop``."""
    seen: set[fx.Node] = set()
    stack = [n for n in start if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            stack.extend(step(n))
    return seen


def ancestors(outputs: Iterable, stop: frozenset = frozenset()) -> set[fx.Node]:
    """Nodes that ``outputs`` depend on (inclusive), not walking past ``stop``."""
    return reachable(outputs, lambda n: n.all_input_nodes, stop)


def descendants(inputs: Iterable) -> set[fx.Node]:
    """Nodes that depend on ``inputs`` (inclusive)."""
    return reachable(inputs, lambda n: n.users)


def impure_calls(graph: fx.Graph) -> set[fx.Node]:
    """The call_function nodes fx calls impure.  ``Node.is_impure`` walks the
    schema and the effect tables on every call; here once per target (but
    for higher-order ops, whose verdict depends on their arguments)."""
    found, verdicts = set(), {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if isinstance(n.target, _torch.HigherOrderOperator):
            impure = n.is_impure()  # depends on the arguments
        else:
            impure = verdicts.get(n.target)
            if impure is None:
                impure = verdicts[n.target] = n.is_impure()
        if impure:
            found.add(n)
    return found


def side_effects(roles: JointRoles) -> list[fx.Node]:
    """In-place ops on primals (Note [Mutations kept in the graph],
    analyze.py) and effects that the forward must run: impure nodes that do
    not depend on tangents or on the backward's effects (Note [Effects in the
    backward], tokens.py)."""
    if not roles.primals:
        return []
    graph = roles.primals[0].graph
    backward_side = descendants(list(roles.tangents) + list(roles.bwd_effects))
    impure = impure_calls(graph)
    return [n for n in graph.nodes if n in impure and n not in backward_side]


def forward_nodes(roles: JointRoles) -> set[fx.Node]:
    """Nodes the forward computes: what its outputs need, plus the primals.

    Tuple-valued nodes pull in their ``getitem`` users so that a tuple is never
    saved whole (Note [Saved values are tensors or symbolic ints]).
    """
    nodes = ancestors(list(roles.fwd_outputs) + side_effects(roles)) | set(roles.primals)
    for n in list(nodes):
        if not isinstance(n.meta.get("val"), (torch.Tensor,) + _torch.sym_types):
            nodes.update(u for u in n.users if u.target is operator.getitem)
    return nodes


def backward_uses(joint_gm: fx.GraphModule, roles: JointRoles, fwd: set[fx.Node]) -> list[fx.Node]:
    """Forward nodes that the backward reads, in graph order."""
    bwd = ancestors(roles.bwd_roots, stop=frozenset(fwd)) - fwd
    used = {n for b in bwd for n in b.all_input_nodes if n in fwd}
    used.update(n for n in roles.bwd_outputs if n in fwd)
    return [n for n in joint_gm.graph.nodes if n in used]


# ---------------------------------------------------------------- recompute policy (rules are data)

#: Ops the backward may recompute besides pointwise ones: views and reshapes,
#: copies, and constant factories.  Keyed by overload packet.
CHEAP_NON_POINTWISE_OPS: frozenset = frozenset({
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t,
    aten.expand, aten.slice, aten.select, aten.squeeze, aten.unsqueeze, aten.clone,
    aten.alias, aten.detach, aten.narrow, aten.split, aten.split_with_sizes, aten.unbind,
    aten.full, aten.full_like, aten.zeros, aten.zeros_like, aten.ones, aten.ones_like,
    aten.scalar_tensor, aten.arange, aten.lift_fresh_copy,
})

#: Tags that forbid recomputation whatever else holds: a random op recomputed
#: draws fresh numbers and silently corrupts gradients.
NEVER_RECOMPUTE_TAGS: frozenset = frozenset({torch.Tag.nondeterministic_seeded})

#: Tags that allow recomputation (when no NEVER tag is present).
CHEAP_TAGS: frozenset = frozenset({torch.Tag.pointwise})


#: Reductions, recomputed only when ``config.ban_recompute_reductions`` is off
#: (Note [Recompute bans], bans.py).
REDUCTION_OPS: frozenset = frozenset({
    aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.var_mean,
    aten.argmax, aten.argmin, aten.any, aten.all, aten.prod, aten.logsumexp,
    aten._grad_sum_to_size, aten.sum_to_size,
})

#: Ops never recomputed for free, even in denylist mode
#: (``config.ban_recompute_not_in_allowlist = False``).
COMPUTE_INTENSIVE_OPS: frozenset = frozenset({
    aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.convolution,
    aten.convolution_backward, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    aten._flash_attention_forward, aten._efficient_attention_forward,
    aten.upsample_bilinear2d, aten._scaled_mm,
})

#: Namespaces of the ops PyTorch itself defines (the rest are custom ops).
BUILTIN_NAMESPACES: frozenset = frozenset({"aten", "prims"})


def is_cheap_to_recompute(node: fx.Node) -> bool:
    """The default recompute policy: may the backward recompute this forward node?

    Constants (``get_attr``), ``getitem``, ops tagged pointwise, and
    ``CHEAP_NON_POINTWISE_OPS``; never an op tagged in ``NEVER_RECOMPUTE_TAGS``
    (unless ``config.functionalize_rng_ops``: Note [Replayed random ops]) or
    one that mutates, and nothing unknown (matmuls, convolutions,
    reductions, sorts, indexing ...).  The options of Note [Recompute bans]
    widen it: ``ban_recompute_reductions = False`` adds ``REDUCTION_OPS``;
    ``ban_recompute_not_in_allowlist = False`` (or ``aggressive_recomputation``)
    allows every deterministic aten/prims op but ``COMPUTE_INTENSIVE_OPS``
    (custom ops too with ``is_non_builtin_to_include``).
    """
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, _torch.OpOverload):
        return False
    tags = set(target.tags)
    if target._schema.is_mutable:
        return False
    if tags & NEVER_RECOMPUTE_TAGS:
        return replayable_random(node)
    packet = target.overloadpacket
    if packet in REDUCTION_OPS:
        return not config.ban_recompute_reductions
    if bool(tags & CHEAP_TAGS) or packet in CHEAP_NON_POINTWISE_OPS:
        return True
    if config.ban_recompute_not_in_allowlist and not config.aggressive_recomputation:
        return False
    if target.namespace not in BUILTIN_NAMESPACES and not config.is_non_builtin_to_include:
        return False
    return packet not in COMPUTE_INTENSIVE_OPS and not is_random_or_mutating(node)


def is_fusible(node: fx.Node) -> bool:
    """Could ``node`` join a fusion of its neighbours (Note [Recompute bans])?
    The cheap tables, reductions, and the random pointwise ops."""
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, _torch.OpOverload) or target._schema.is_mutable:
        return False
    packet = target.overloadpacket
    return bool(set(target.tags) & CHEAP_TAGS) or packet in CHEAP_NON_POINTWISE_OPS or \
        packet in REDUCTION_OPS or packet in (aten.native_dropout, aten.rand_like, aten.randn_like)


RecomputePolicy = Callable[[fx.Node], bool]

# ---------------------------------------------------------------- sizes

#: Bytes assumed for a symbolic size that has no hint.
UNHINTED_SIZE = 4096


def size_hint(s) -> int:
    """A concrete size: ``s``, or the hint of a symbolic one (UNHINTED_SIZE without)."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else UNHINTED_SIZE
    return int(s)


def tensor_bytes(node: fx.Node) -> int | None:
    """Estimated bytes of a tensor node's value; None when it is not a tensor."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    numel = 1
    for s in val.shape:
        numel *= size_hint(s)
    return numel * val.element_size()


def saved_tensor_bytes(saved: Iterable[fx.Node]) -> int:
    """Bytes of the tensors among ``saved`` (symbolic ints count nothing)."""
    return sum(tensor_bytes(n) or 0 for n in saved if not _torch.is_sym_node(n))


class StorageCache:
    """Storage of each value (fake tensors in ``node.meta["val"]``), computed once.

    ``inputs``: the storages of graph inputs, which saving costs nothing —
    but for parameters and buffers when ``config.treat_parameters_as_free_to_save``
    is off (``priced_primals``: those placeholders)."""

    def __init__(self, gm: fx.GraphModule):
        self._keys: dict[fx.Node, Any] = {}
        placeholders = gm.graph.find_nodes(op="placeholder")
        static = static_primals(gm) if not config.treat_parameters_as_free_to_save else ()
        self.priced_primals = {p for p in placeholders if isinstance(p.meta.get(DESC), Primal)
                               and p.meta[DESC].index in static}
        self.inputs = {self.key(p) for p in placeholders
                       if p not in self.priced_primals} - {None}

    def key(self, n: fx.Node) -> Any:
        if n not in self._keys:
            val = n.meta.get("val")
            self._keys[n] = _torch.StorageWeakRef(val.untyped_storage()) \
                if isinstance(val, torch.Tensor) else None
        return self._keys[n]

    def on_input(self, n: fx.Node) -> bool:
        """A graph input, or a view of one (``t(weight)``): no memory of its own."""
        return self.key(n) in self.inputs


def activation_bytes(saved: Iterable[fx.Node], storages: StorageCache | None = None) -> int:
    """Memory the saved values keep alive beyond the graph inputs: each
    storage once (a view saved beside its base costs nothing more), inputs and
    views of inputs not at all."""
    saved = [n for n in saved if not _torch.is_sym_node(n)]
    if not saved:
        return 0
    if storages is None:
        storages = StorageCache(saved[0].graph.owning_module)
    sizes: dict = {}
    for n in saved:
        key = storages.key(n)
        if key is None or key in storages.inputs or \
                (n.op == "placeholder" and n not in storages.priced_primals):
            continue
        sizes[key] = max(sizes.get(key, 0), tensor_bytes(n) or 0)
    return sum(sizes.values())


# ---------------------------------------------------------------- node roles


class NodeRole(enum.Enum):
    """What the partitioner may do with a forward value (Note [Min-cut rematerialization])."""
    CHEAP = "cheap"          # the backward may recompute it for free
    COSTLY = "costly"        # the backward may recompute it at its cost (memory budget only)
    BANNED = "banned"        # the forward computes it (primals, random and in-place ops,
                             # values a policy says to save or offload)
    NO_SAVE = "no_save"      # never saved: recomputed (a policy's or a checkpoint's)


#: Op namespaces never recomputed: collectives must run once per rank, in the
#: same order on every rank.
NEVER_RECOMPUTE_NAMESPACES: frozenset = frozenset({"_c10d_functional", "c10d_functional",
                                                   "_dtensor", "c10d"})


def is_random_or_mutating(node: fx.Node) -> bool:
    """Ops the backward never recomputes: random ones (fresh numbers; unless
    ``config.functionalize_rng_ops`` replays them, Note [Replayed random ops]),
    in-place ones, collectives (unless
    ``config.unsafe_allow_optimization_of_collectives``), and anything else fx
    calls impure."""
    target = node.target
    if not isinstance(target, _torch.OpOverload):
        return False
    if replayable_random(node):
        return False
    if target.namespace in NEVER_RECOMPUTE_NAMESPACES:
        return not config.unsafe_allow_optimization_of_collectives
    return bool(set(target.tags) & NEVER_RECOMPUTE_TAGS) or target._schema.is_mutable or \
        node.is_impure()


def replayable_random(node: fx.Node) -> bool:
    """A functional random op the backward may recompute by replaying the RNG
    state the forward saved (``config.functionalize_rng_ops``)."""
    target = node.target
    return config.functionalize_rng_ops and node.op == "call_function" and \
        isinstance(target, _torch.OpOverload) and \
        torch.Tag.nondeterministic_seeded in target.tags and not target._schema.is_mutable


def default_roles(recompute_policy: RecomputePolicy) -> Callable[[fx.Node], NodeRole]:
    """Roles from a recompute policy alone: what it allows is CHEAP; other
    deterministic ops are COSTLY (custom ops only with
    ``config.is_non_builtin_to_include``); random and in-place ops are BANNED."""
    def role(n: fx.Node) -> NodeRole:
        if n.op == "placeholder" or is_random_or_mutating(n):
            return NodeRole.BANNED
        if recompute_policy(n):
            return NodeRole.CHEAP
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor):
            if isinstance(n.target, _torch.OpOverload) and \
                    n.target.namespace not in BUILTIN_NAMESPACES | NEVER_RECOMPUTE_NAMESPACES \
                    and not config.is_non_builtin_to_include:
                return NodeRole.BANNED
            return NodeRole.COSTLY
        return NodeRole.BANNED
    return role


# ---------------------------------------------------------------- recompute costs


#: Roofline costs, in time units of one low-precision matmul FLOP (an H100 or
#: H200: ~1000 TFLOP/s in bf16/fp16, ~60 in fp32 without TF32, ~4 TB/s of
#: memory): per byte moved, and per FLOP by dtype.
COST_PER_BYTE = 200
COST_PER_FLOP = {torch.float32: 16, torch.float64: 32}


def _flop_cost(node: fx.Node) -> int:
    val = node.meta.get("val")
    return COST_PER_FLOP.get(getattr(val, "dtype", None), 1)


def flops(node: fx.Node) -> int:
    """FLOPs of ``node`` by torch's formulas (matmuls, convolutions), else 0."""
    target = getattr(node.target, "overloadpacket", None)
    formula = flop_registry.get(target) if target is not None else None
    if formula is None:
        return 0
    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a
    args = torch.utils._pytree.tree_map(val, node.args)
    kwargs = torch.utils._pytree.tree_map(val, node.kwargs)
    try:
        return int(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except Exception:  # a formula that does not take these arguments
        return 0


def recompute_cost(node: fx.Node) -> int:
    """Time to recompute ``node`` on a roofline (Note [Memory budget])."""
    moved = (tensor_bytes(node) or 0) + sum(tensor_bytes(a) or 0 for a in node.all_input_nodes)
    return max(1, flops(node) * _flop_cost(node), COST_PER_BYTE * moved)


#: The unit of a callable estimator's estimates (milliseconds, say) in cost units.
ESTIMATE_SCALE = 10 ** 6


def configured_cost() -> Callable[[fx.Node], int]:
    """The recompute cost ``config.activation_memory_budget_runtime_estimator``
    names: "flops" (the roofline estimate, ``recompute_cost``), "profile"
    (``profiled_cost()``: time each op), "testing" (1 per op), or a callable
    ``node -> float`` (scaled by ``ESTIMATE_SCALE`` to integer costs)."""
    estimator = config.activation_memory_budget_runtime_estimator
    if estimator == "flops":
        return recompute_cost
    if estimator == "profile":
        return profiled_cost()
    if estimator == "testing":
        return lambda node: 1
    if callable(estimator):
        return lambda node: max(1, round(float(estimator(node)) * ESTIMATE_SCALE))
    raise ValueError(
        "aotgrad.config.activation_memory_budget_runtime_estimator must be 'flops', "
        f"'profile', 'testing' or a callable node -> float, not {estimator!r}")


def profiled_cost(device: str | torch.device | None = None,
                  repeats: int = 3) -> Callable[[fx.Node], int]:
    """A ``recompute_cost`` that times each op (nanoseconds) on random inputs
    of the node's shapes and dtypes, on ``device`` (default: where the
    node's values live).  Timings are cached by op, shapes and dtypes; an op
    that cannot be run this way is priced by the roofline estimate."""
    cache: dict[Any, int] = {}

    def cost(node: fx.Node) -> int:
        key = (node.target, _signature(node.args), _signature(tuple(node.kwargs.items())))
        if key not in cache:
            try:
                cache[key] = _time_node(node, device, repeats)
            except Exception:  # an op that random inputs cannot drive
                cache[key] = recompute_cost(node)
        return cache[key]

    return cost


def _signature(args: Any) -> Any:
    def sig(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                return ("t", tuple(size_hint(s) for s in val.shape), val.dtype, val.device)
            return ("v", repr(val))
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        return repr(a)
    return sig(args)


def _time_node(node: fx.Node, device: Any, repeats: int) -> int:
    def real(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                dev = torch.device(device) if device is not None else val.device
                shape = [size_hint(s) for s in val.shape]
                if val.dtype.is_floating_point or val.dtype.is_complex:
                    return torch.randn(shape, dtype=val.dtype, device=dev)
                return torch.zeros(shape, dtype=val.dtype, device=dev)
            if isinstance(val, _torch.sym_types):
                return size_hint(val)
            raise TypeError(f"cannot make an input for {a.format_node()}")
        if isinstance(a, (list, tuple)):
            return type(a)(real(x) for x in a)
        return a

    args, kwargs = real(node.args), {k: real(v) for k, v in node.kwargs.items()}
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda
               for t in torch.utils._pytree.tree_leaves((args, kwargs)))
    with torch.no_grad():
        node.target(*args, **kwargs)                       # warm up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter_ns()
        for _ in range(repeats):
            node.target(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    return max(1, (time.perf_counter_ns() - start) // repeats)
