"""Export: the traced graphs themselves, for compilers that run them elsewhere.

The three entry points behave as PyTorch 2.13's functions of the same names:

* ``aot_export_module(mod, args, trace_joint=...)`` → ``(gm, GraphSignature)``.
  The graph takes ``(*parameters, *buffers, *user_leaves)`` (placeholders
  ``arg0_1 ...``) and returns ``(*new_values_of_mutated_inputs, *user_outputs)``,
  and with ``trace_joint=True`` also the gradients of the scalar loss
  ``output_loss_index`` with respect to every input that requires grad (no
  tangent inputs: the loss is differentiated as ``loss.backward()`` would)::

      def forward(self, arg0_1, arg1_1):          # (p, x), loss = (p * x).sum()
          mul = torch.ops.aten.mul.Tensor(arg0_1, arg1_1)
          sum_1 = torch.ops.aten.sum.default(mul)
          ...
          return (sum_1, mul_2)                   # loss, grad of p

  ``pre_dispatch=True`` (inference only) traces above autograd: composite ops
  (``linear``, ``matmul``) and grad-mode switches stay in the graph.
* ``aot_export_joint_simple(fn, args, trace_joint=...)`` → the graph with no
  calling-convention change: inference ``(*args) -> (*outs)``, or the joint
  ``(primals, tangents) -> ((*outs), (*grads))`` (one gradient per argument,
  ``None`` where there is none) whose forward, once partitioned, takes ``args``.
* ``aot_export_function(fn, args, ...)`` → ``(gm, Signature, in_spec, out_spec)``
  for pytree arguments (torch's ``_aot_export_function``); the joint has the
  ``(primals, tangents)`` convention, ``no_tangents=True`` differentiates a
  single scalar output without a tangent.

Refused, with torch's messages: metadata mutations of inputs, data mutations
of inputs that require grad (joint), mutated inputs passed twice or aliasing
other inputs, tensor subclass inputs, ``config.functionalize_rng_ops``; for
modules, outputs that are not a tuple/list, outputs other than the loss that
require grad; for ``aot_export_joint_simple``, input mutations, outputs that
alias inputs, pytree inputs or outputs.  Export never guards: the graph is
valid for inputs like ``args``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import _torch, config, stateless, subclass, tokens
from ._torch import pytree
from .analyze import OutputKind, Signature
from .compile import nop
from .descriptors import DESC, EffectToken, Grad, MutatedInput, Primal, Tangent, UserOutput
from .opened import _Opened
from .pipeline import CompileOptions, CompileReport, Traced, trace_call


@dataclass(frozen=True)
class BackwardSignature:
    """The backward half of an exported joint module graph."""
    gradients_to_parameters: dict[str, str]      # graph output name -> parameter FQN
    gradients_to_user_inputs: dict[str, str]     # graph output name -> user input name
    loss_output: str                             # graph output name of the loss


@dataclass(frozen=True)
class GraphSignature:
    """How an exported module graph's inputs and outputs map to the module
    (the fields and their order are torch's).  ``input_tokens`` and
    ``output_tokens``: the effect token placeholder and output of a graph
    running effectful ops (``aten._print``, linalg's error checks), empty
    when it runs none or under ``config.unlift_effect_tokens`` (Note [Effect
    tokens in export], tokens.py)."""
    parameters: list[str]
    buffers: list[str]
    user_inputs: list[str]                       # placeholder names
    user_outputs: list[str | None]               # output node names (None: a constant)
    inputs_to_parameters: dict[str, str]         # placeholder name -> FQN
    inputs_to_buffers: dict[str, str]
    buffers_to_mutate: dict[str, str] = field(default_factory=dict)      # output -> FQN
    parameters_to_mutate: dict[str, str] = field(default_factory=dict)   # output -> FQN
    user_inputs_to_mutate: dict[str, str] = field(default_factory=dict)  # output -> input
    in_spec: Any = None
    out_spec: Any = None
    backward_signature: BackwardSignature | None = None
    input_tokens: list[str] = field(default_factory=list)
    output_tokens: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- tracing for export

@dataclass(frozen=True)
class Exported:
    """One export trace: the pipeline's first stages plus the call's leaves."""
    traced: Traced
    leaves: list                     # the call's flat leaves, as given
    in_spec: Any
    dupes: tuple[tuple[int, ...], ...]  # leaf positions holding the same tensor object


# Note [Duplicated inputs in export]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# aotgrad's pipeline makes a tensor passed twice one graph input; export keeps
# the user's calling convention instead, as torch's does: every leaf is a
# placeholder.  So before tracing, each repeated occurrence of a tensor is
# replaced by a detached alias of it (same storage, its own TensorImpl, same
# requires_grad): the pipeline then sees distinct inputs, each use reads its
# own placeholder, and gradients flow to each occurrence.  That is only
# exact when neither occurrence is mutated (a write through one must show
# through the other), so a mutated duplicate is refused afterwards, with
# torch's message; so are mutated inputs that share storage with another.

def _distinct_leaves(leaves: list) -> tuple[list, tuple[tuple[int, ...], ...]]:
    first: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    out = list(leaves)
    for k, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        j = first.setdefault(id(leaf), k)
        if j != k:
            groups.setdefault(j, [j]).append(k)
            out[k] = leaf.detach().requires_grad_(leaf.requires_grad)
    return out, tuple(tuple(g) for g in groups.values())


def trace_for_export(fn: Callable, args: Sequence[Any], kwargs: Mapping | None, *,
                     num_params_buffers: int = 0, decompositions: Mapping | None = None,
                     dynamic: bool | None = None, keep_input_mutations: bool = False,
                     grad_enabled: bool | None = None, loss_index: int | None = None,
                     trace_joint: bool = False, args_container: type = tuple) -> Exported:
    """flatten -> analyze -> trace for export, then torch's export refusals."""
    leaves, in_spec = pytree.tree_flatten((args_container(args), dict(kwargs or {})))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and subclass.is_subclass(leaf):
            raise RuntimeError(
                "aot_export is not currently supported with traceable tensor subclass.\n"
                "(aotgrad: export graphs take plain tensors; compile subclass programs with "
                "aot_function / aot_module, or pass the subclass's inner tensors.)")
    trace_leaves, dupes = _distinct_leaves(leaves)
    if dynamic is None:  # Note [Inferred dynamic shapes]
        mode = _torch.detect_fake_mode(trace_leaves)
        dynamic = mode is not None and mode.shape_env is not None
    options = CompileOptions(nop, decompositions=decompositions,
                             num_params_buffers=num_params_buffers, dynamic=bool(dynamic),
                             keep_inference_input_mutations=keep_input_mutations)
    try:
        t = trace_call(fn, options, trace_leaves, in_spec, CompileReport(),
                       loss_index=loss_index, require_grad=grad_enabled)
    except RuntimeError as error:
        # Note [Mutated inputs that require grad]: in grad mode an in-place op on
        # an input that requires grad is refused by autograd itself (the
        # inputs are leaves) before the Signature exists; torch's export
        # reports its own refusal for that program, and so does this one.
        if trace_joint and _LEAF_MUTATION in str(error):
            raise RuntimeError(_GRAD_INPUT_MUTATED + "\n\n" + _GRAD_INPUT_MUTATED_HINT) \
                from error
        raise
    spec = t.signature.out_spec
    if spec.type is _Opened and spec.context.uses_inputs:  # Note [Objects passed in]
        raise RuntimeError(
            "aotgrad: the exported function writes into an object passed in (or returns one): "
            "an exported graph cannot replay that (Note [Objects passed in], objects.py). "
            "Pass the object's tensors as arguments and return the new ones, or compile the "
            "function with aot_function / aot_module.")
    e = Exported(t, leaves, in_spec, dupes)
    check_exportable(e, trace_joint)
    return e


# Note [Inferred dynamic shapes]: ``dynamic_shapes=None`` (torch's default)
# means "as the inputs are": fake tensors of a mode with a ShapeEnv (dynamo's,
# or the user's) give a symbolic trace in that mode; real tensors a static one.


_LEAF_MUTATION = "a leaf Variable that requires grad is being used in an in-place operation"
_GRAD_INPUT_MUTATED = (
    "Found a graph input that requires gradients, and received a mutation.\n"
    "This is currently banned in the aot_export workflow. If you need this "
    "functionality, please file a github issue.")
_GRAD_INPUT_MUTATED_HINT = (
    "(aotgrad: mutate a clone, or do the update under torch.no_grad() outside the "
    "exported function; aot_function / aot_module compile such programs.)")


def _meta_text(sig: Signature) -> str:
    return f"(aotgrad signature: inputs={list(sig.inputs)})"


def check_exportable(e: Exported, trace_joint: bool) -> None:
    """torch's export refusals, in torch's order (Note [Duplicated inputs in export])."""
    sig, flat = e.traced.signature, e.traced.flat
    infos = [sig.inputs[s] if s >= 0 else None for s in flat.leaf_slot]
    if any(i is not None and (i.mutates_metadata or i.mutates_storage) for i in infos):
        raise RuntimeError(
            "Found an input that received a metadata mutation, through e.g. a call to "
            "`.resize_()` or `.transpose_()`.\nThis is currently banned in the aot_export "
            "workflow. If you need this functionality, please file a github issue.\n\n"
            "(aotgrad: return the changed tensor instead, e.g. `x = x.t()`; "
            "aot_function / aot_module compile such programs.)\n" + _meta_text(sig))
    if trace_joint and any(i is not None and i.requires_grad and i.mutates_data
                           for i in infos):
        raise RuntimeError(_GRAD_INPUT_MUTATED + "\n\n" + _GRAD_INPUT_MUTATED_HINT + "\n" +
                           _meta_text(sig))
    if getattr(config, "functionalize_rng_ops", False):
        raise RuntimeError(
            "Functionalized RNG is not currently supported in the aot_export workflow. "
            "Please file a github issue,\nor otherwise set "
            "aotgrad.config.functionalize_rng_ops = False.")
    for group in e.dupes:
        if any(infos[k] is not None and infos[k].mutates_data for k in group):
            raise RuntimeError(
                "Encountered duplicated inputs that are mutated in the graph you are trying "
                "to export.\nThis functionality is currently not supported. If needed, please "
                f"file a github issue.\n\n(aotgrad: arguments {list(group)} are the same "
                "tensor; pass a clone for all but one.)\n" + _meta_text(sig))
    tensors = [k for k, leaf in enumerate(e.leaves) if isinstance(leaf, torch.Tensor)]
    dup_positions = {k for g in e.dupes for k in g[1:]}
    by_storage: dict[int, list[int]] = {}
    for k in tensors:
        if k not in dup_positions:
            by_storage.setdefault(_torch.live_storage_key(e.leaves[k]), []).append(k)
    for group in by_storage.values():
        if len(group) > 1 and any(infos[k] is not None and infos[k].mutates_data
                                  for k in group):
            raise RuntimeError(
                "Encountered aliased inputs that are mutated in the graph you are trying to "
                "export.\nThis functionality is currently not supported. If needed, please "
                f"file a github issue.\n\n(aotgrad: arguments {group} share storage and one "
                "is mutated; pass clones that do not alias.)\n" + _meta_text(sig))


# ---------------------------------------------------------------- graph rebuilding

# Note [Export calling convention]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The pipeline's graphs take one placeholder per *graph input* (tensors,
# deduplicated; constants baked in) and return only tensors.  Export graphs
# follow torch's convention instead: one placeholder per *leaf* of the call
# (a constant gets a placeholder that nothing reads, so that the graph can be
# called with the user's arguments), and the outputs list every user output
# leaf (a constant inline, a repeated output again).  ``rebuild`` copies a
# traced graph into that shape; node names and meta are kept (node_copy).

def rebuild(gm: fx.GraphModule, inputs: Sequence[tuple[str, fx.Node | None, Any]],
            outputs: Sequence[Any], *, class_name: str, out_descs: Sequence[Any] | None = None,
            pytree_io: tuple[list[str], Any, Any] | None = None,
            token: tuple[bool, str] | None = None) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s nodes with placeholders
    ``inputs`` (name, the placeholder of ``gm`` it replaces or None, its
    descriptor) and outputs ``outputs`` (nodes of ``gm`` or constants).
    ``pytree_io`` (argument names, in_spec, out_spec): a pytree calling
    convention, as make_fx gives functions of pytrees.  ``token`` (lifted,
    placeholder name): effectful ops chained through an effect token (Note
    [Effect tokens in export], tokens.py); the specs must count it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    chain = tokens.Chain(graph, lifted=token[0], name=token[1], val=tokens.token_value(gm)) \
        if token is not None else None
    for name, old, desc in inputs:
        node = graph.placeholder(name)
        if old is not None:
            node.meta.update(old.meta)
            env[old] = node
        node.meta[DESC] = desc
    if chain is not None:
        chain.begin()
    results: dict[fx.Node, list[fx.Node]] = {}  # effectful ops of several results
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node not in env and node.users:
                raise AssertionError(f"aotgrad export: placeholder {node.name} was dropped "
                                     "but is used")
            continue
        if node.op == "output":
            continue
        if chain is not None and tokens.is_effect(node):
            items = chain.effect(node, fx.map_arg(node.args, env.__getitem__),
                                 fx.map_arg(node.kwargs, env.__getitem__))
            if not tokens.returns_tuple(node):
                env[node] = items[0]
            else:
                results[node] = items
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and \
                node.args[0] in results:
            env[node] = results[node.args[0]][node.args[1]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    values = [env[o] if isinstance(o, fx.Node) else o for o in outputs]
    if chain is not None:
        values = chain.end(values)
        if out_descs is not None:
            out_descs = [EffectToken(0), *out_descs] if token[0] else out_descs
    # make_fx's pytree graphs return a list, its flat ones a tuple
    out = graph.output(values if pytree_io is not None else tuple(values))
    if out_descs is not None:
        out.meta[DESC] = tuple(out_descs)
    if pytree_io is not None:
        names, in_spec, out_spec = pytree_io
        graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, in_spec, out_spec))
    graph.eliminate_dead_code()  # what only the dropped outputs used (placeholders stay)
    new = fx.GraphModule(gm, graph, class_name)
    new.meta.update(gm.meta)
    return new


@dataclass(frozen=True)
class GraphParts:
    """A traced graph read by role (descriptors), per leaf and per output leaf."""
    leaf_placeholder: list[fx.Node | None]   # per call leaf (None: a constant)
    tangents: list[fx.Node]
    mutated: list[tuple[int, fx.Node]]       # (leaf of the mutated input, new value)
    user_outputs: list[Any]                  # per output leaf: node or constant
    grads: list[fx.Node | None]              # per call leaf (joint only)
    intermediate_bases: list[fx.Node]


def graph_parts(e: Exported) -> GraphParts:
    t = e.traced
    sig, flat, gm = t.signature, t.flat, t.graph.gm
    by_slot: dict[int, fx.Node] = {}
    tangents = []
    for node in gm.graph.find_nodes(op="placeholder"):
        desc = node.meta.get(DESC)
        if isinstance(desc, Primal):
            by_slot[desc.index] = node
        elif isinstance(desc, Tangent):
            tangents.append(node)
    out_node = gm.graph.output_node()
    values = list(out_node.args[0])
    descs = out_node.meta[DESC]
    leaf_of_slot = {s: k for k, s in enumerate(flat.leaf_slot) if s >= 0}
    mutated, bases, graph_out, grad_of_slot = [], [], {}, {}
    for value, desc in zip(values, descs):
        if isinstance(desc, MutatedInput):
            mutated.append((leaf_of_slot[desc.index], value))
        elif isinstance(desc, UserOutput):
            graph_out[desc.index] = value
        elif isinstance(desc, Grad):
            grad_of_slot[desc.index] = value
        else:
            bases.append(value)
    user_outputs: list[Any] = []
    for i, info in enumerate(sig.outputs):
        if info.kind is OutputKind.CONSTANT:
            user_outputs.append(info.constant)
        elif info.kind is OutputKind.SAME_AS_OUTPUT:
            user_outputs.append(graph_out[info.base])
        else:
            user_outputs.append(graph_out[i])
    return GraphParts(
        [by_slot.get(s) if s >= 0 else None for s in flat.leaf_slot], tangents, mutated,
        user_outputs, [grad_of_slot.get(s) if s >= 0 else None for s in flat.leaf_slot], bases)


def _pytree_joint(e: Exported, parts: GraphParts, class_name: str,
                  extra_tangent: bool = False, lift_tokens: bool = False) -> fx.GraphModule:
    """The joint as torch's export gives it: ``(primals, tangents) ->
    ((*mutated, *outs, *intermediate_bases), (*grads))``, a primal per leaf.
    ``lift_tokens``: effectful ops chained through a token, the first primal
    and the first forward output (Note [Effect tokens in export])."""
    gm = e.traced.graph.gm
    shift = 1 if lift_tokens and tokens.has_effects(gm) else 0
    inputs = [(f"primals_{k + 1 + shift}", node, Primal(k))
              for k, node in enumerate(parts.leaf_placeholder)]
    tangents = list(parts.tangents)
    inputs += [(f"tangents_{j + 1}", node, Tangent(j)) for j, node in enumerate(tangents)]
    if extra_tangent:  # no_tangents: torch's graph still takes the (unused) tangent
        inputs.append(("tangents_1", None, Tangent(0)))
        tangents = [None]
    fwd = [v for _, v in parts.mutated] + list(parts.user_outputs) + parts.intermediate_bases
    grads = list(parts.grads)
    in_spec = pytree.tree_flatten((list(range(len(parts.leaf_placeholder) + shift)),
                                   list(range(len(tangents)))))[1]
    out_spec = pytree.tree_flatten((tuple(range(len(fwd) + shift)),
                                    tuple(range(len(grads)))))[1]
    descs = [MutatedInput(k) for k, _ in parts.mutated] + \
        [UserOutput(i) for i in range(len(parts.user_outputs))] + \
        [None] * len(parts.intermediate_bases) + [Grad(k) for k in range(len(grads))]
    out = rebuild(gm, inputs, fwd + grads, class_name=class_name, out_descs=descs,
                  pytree_io=(["primals", "tangents"], in_spec, out_spec),
                  token=(True, "primals_1") if shift else None)
    if extra_tangent:  # its example value: the loss's (a scalar: the graph's ones_like)
        loss_val = next(v.meta.get("val") for v, d in zip(fwd, descs)
                        if isinstance(v, fx.Node) and isinstance(d, UserOutput) and
                        isinstance(v.meta.get("val"), torch.Tensor) and v.meta["val"].dim() == 0)
        out.graph.find_nodes(op="placeholder")[-1].meta["val"] = loss_val
    return out


def _flat_graph(e: Exported, parts: GraphParts, class_name: str, *, prefix: str = "arg",
                grads: bool = False, lift_tokens: bool | None = None) -> fx.GraphModule:
    """Placeholders ``arg{k}_1`` per leaf; ``(*mutated, *outs[, *grads that exist])``.
    ``lift_tokens`` (None: effectful ops left as they are): Note [Effect tokens
    in export], the token a graph input and output (True) or made in the graph."""
    gm = e.traced.graph.gm
    shift = 1 if lift_tokens is not None and tokens.has_effects(gm) else 0
    inputs = [(f"{prefix}{k + shift}_1", node, Primal(k))
              for k, node in enumerate(parts.leaf_placeholder)]
    outs = [v for _, v in parts.mutated] + list(parts.user_outputs)
    descs = [MutatedInput(k) for k, _ in parts.mutated] + \
        [UserOutput(i) for i in range(len(parts.user_outputs))]
    if grads:
        kept = [(k, g) for k, g in enumerate(parts.grads) if g is not None]
        outs += [g for _, g in kept]
        descs += [Grad(k) for k, _ in kept]
    return rebuild(gm, inputs, outs, class_name=class_name, out_descs=descs,
                   token=(lift_tokens, f"{prefix}0_1") if shift else None)


# ---------------------------------------------------------------- pre_dispatch

def _pre_dispatch_graph(e: Exported, fn: Callable, decompositions: Mapping | None
                        ) -> fx.GraphModule:
    """Note [Pre-dispatch export]: the program traced above autograd, under
    functionalization in its pre-dispatch, export flavour (torch's
    FunctionalTensorMode: composite ops are kept, and a view they return
    aliases frozen storage, so mutating it raises "cannot mutate tensors with
    frozen storage", as torch's export does).  The Signature comes from the
    ordinary trace (``e``); this trace only records the graph.  It runs in
    the caller's grad mode: grad-mode switches in the program are recorded."""
    t = e.traced
    sig, flat = t.signature, t.flat
    flat_fn = _FlatCall(fn, flat)
    mutated = sig.mutated_inputs_out_of_graph

    def program(*graph_inputs):
        with _torch.FunctionalTensorMode(pre_dispatch=True, export=True,
                                         _allow_token_discovery=True):
            f_args = [_torch.to_functional(x) for x in graph_inputs]
            outs = flat_fn(*f_args)
            values = [f_args[i] for i in mutated] + list(outs)
            return [_torch.from_functional(v) for v in values]

    with _torch.tracing_context(t.fake_mode), _torch.enable_python_dispatcher():
        traced = _torch.make_fx(program, decomposition_table=decompositions,
                                pre_dispatch=True)(*t.fake_inputs)
    tokens.inline(traced)  # Note [Effect tokens in export]: threaded again below
    shift = 1 if tokens.has_effects(traced) else 0
    placeholders = traced.graph.find_nodes(op="placeholder")
    out_values = list(traced.graph.output_node().args[0])
    leaf_of_slot = {s: k for k, s in enumerate(flat.leaf_slot) if s >= 0}
    inputs = [(f"arg{k + shift}_1", placeholders[s] if s >= 0 else None, Primal(k))
              for k, s in enumerate(flat.leaf_slot)]
    descs = [MutatedInput(leaf_of_slot[i]) for i in mutated] + \
        [UserOutput(i) for i in range(len(sig.outputs))]
    return rebuild(traced, inputs, out_values, class_name="<lambda>", out_descs=descs,
                   token=(_lift_tokens(), "arg0_1") if shift else None)


class _FlatCall:
    """The user's function of the graph inputs (constants put back), returning
    its flat output leaves."""

    def __init__(self, fn: Callable, flat):
        self.fn, self.flat = fn, flat

    def __call__(self, *graph_inputs):
        flat = self.flat
        leaves = [graph_inputs[s] if s >= 0 else c for s, c in zip(flat.leaf_slot, flat.constants)]
        args, kwargs = pytree.tree_unflatten(leaves, flat.in_spec)
        return pytree.tree_leaves(self.fn(*args, **kwargs))


# ---------------------------------------------------------------- aot_export_module

def _module_call(mod: nn.Module, params: dict, buffers: dict, *, strict_out_tuple: bool = True,
                 ) -> Callable:
    n_p, n_b = len(params), len(buffers)

    def functional_call(*all_args, **kw):
        p = dict(zip(params, all_args[:n_p]))
        b = dict(zip(buffers, all_args[n_p:n_p + n_b]))
        out = stateless.functional_call(mod, (p, b), tuple(all_args[n_p + n_b:]), kw,
                                        strict=False)
        if strict_out_tuple and not isinstance(out, (tuple, list)):
            raise RuntimeError(
                "Graph output must be a (). This is so that we can avoid pytree processing "
                "of the outputs. Please change the module to have tuple outputs or use "
                "aot_module instead.")
        return out

    return functional_call


def _loss_checks(fn: Callable, loss_index: int | None) -> Callable:
    """torch's checks of a training step's outputs, run while it is traced."""

    def step(*args, **kwargs):
        out = fn(*args, **kwargs)
        if loss_index is None:
            raise RuntimeError(
                "If trace_joint=True, it is required that one of your forward outputs must "
                "be a scalar loss.\nYou must specify the which (index) output is the loss "
                "with output_loss_index.")
        outs = (out,) if isinstance(out, torch.Tensor) else out
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                raise RuntimeError(
                    "Expected forward output to be either a tensor or a list/tuple of "
                    f"tensors. found {type(o)} (output {i})")
            if o.requires_grad and i != loss_index:
                raise RuntimeError(
                    "Found an output of the forward that requires gradients, that was not "
                    "the scalar loss.\nWe require all outputs to the forward that are not the "
                    "scalar loss to not require gradient,\nbecause we will only compute a "
                    "backward graph against the scalar loss.\nYou can fix this by calling "
                    ".detach() on each of your forward outputs that is not the loss.\nYou "
                    f"specified that output index {loss_index} is the loss, but we found that"
                    f"\nthe output at index {i} requires gradients.")
        loss = outs[loss_index]
        if not loss.requires_grad:
            raise RuntimeError(f"The output at index {loss_index} was marked as the loss, "
                               "but it does not require gradients")
        if loss.numel() != 1:
            raise RuntimeError(
                f"We require the output marked as the loss (at index {loss_index}) to be a "
                f"scalar, but it has shape {loss.shape}")
        return out

    return step


def aot_export_module(mod: nn.Module, args: Sequence[Any], *,
                      decompositions: Mapping | None = None, trace_joint: bool,
                      output_loss_index: int | None = None, pre_dispatch: bool = False,
                      dynamic_shapes: bool | None = None, kwargs: Mapping | None = None,
                      ) -> tuple[fx.GraphModule, GraphSignature]:
    """Export ``mod``'s forward (``trace_joint=False``) or training step graph
    (module docstring; torch's ``aot_export_module``)."""
    if pre_dispatch and trace_joint:
        raise RuntimeError("pre_dispatch is not supported when trace_joint is True.")
    params = dict(mod.named_parameters(remove_duplicate=False))
    buffers = dict(mod.named_buffers(remove_duplicate=False))
    call = _module_call(mod, params, buffers)
    fn = _loss_checks(call, output_loss_index) if trace_joint else call
    state = [*params.values(), *buffers.values()]
    # the inference graph is traced under no_grad, as torch's (pre_dispatch:
    # this trace is the analysis; the graph is traced in the caller's grad mode)
    e = trace_for_export(fn, [*state, *args], kwargs, num_params_buffers=len(state),
                         decompositions=decompositions, dynamic=dynamic_shapes,
                         grad_enabled=None if trace_joint else False,
                         loss_index=output_loss_index if trace_joint else None,
                         trace_joint=trace_joint)
    t = e.traced
    if trace_joint and not t.graph.is_joint:
        raise RuntimeError(
            "aot_export_module(trace_joint=True): nothing requires grad (grad mode is off, "
            "or no parameter or input requires grad), so there is no backward to trace. "
            "Call it with grad mode on and parameters that require grad.")
    parts = graph_parts(e)
    if trace_joint:
        _check_every_grad(e, parts)
        gm = _flat_graph(e, parts, "<lambda>", grads=True, lift_tokens=_lift_tokens())
    elif pre_dispatch:
        gm = _pre_dispatch_graph(e, fn, decompositions)
    else:
        gm = _flat_graph(e, parts, "<lambda>", lift_tokens=_lift_tokens())
    return gm, _graph_signature(gm, e, list(params), list(buffers), trace_joint,
                                output_loss_index)


def _lift_tokens() -> bool:
    """Note [Effect tokens in export]: tokens of the graphs torch would unlift
    are lifted unless ``config.unlift_effect_tokens``.  (torch unlifts them
    where it partitions or compiles: never in an exported joint of
    ``aot_export_joint_simple`` or ``aot_export_function``, whose tokens
    stay lifted.)"""
    return not config.unlift_effect_tokens


def _check_every_grad(e: Exported, parts: GraphParts) -> None:
    for k, leaf in enumerate(e.leaves):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and parts.grads[k] is None:
            raise AssertionError(
                "Found a parameter that did not receive a gradient.\n\"This is most likely "
                "a bug, but if this needs to be supported please comment on this Github "
                "issue:\nhttps://github.com/pytorch/pytorch/issues/101192\n\n(aotgrad: "
                f"argument {k} requires grad but the loss does not depend on it; set "
                "requires_grad=False on it, or use it.)")


def _graph_signature(gm: fx.GraphModule, e: Exported, params: list[str], buffers: list[str],
                     trace_joint: bool, loss_index: int | None) -> GraphSignature:
    placeholders = gm.graph.find_nodes(op="placeholder")
    input_tokens = [n.name for n in placeholders if isinstance(n.meta.get(DESC), EffectToken)]
    names = [n.name for n in placeholders if not isinstance(n.meta.get(DESC), EffectToken)]
    out_node = gm.graph.output_node()
    outs = list(out_node.args[0])
    descs = out_node.meta[DESC]
    n_p, n_b = len(params), len(buffers)
    fqn = {k: name for k, name in enumerate([*params, *buffers])}
    buffers_to_mutate, parameters_to_mutate, inputs_to_mutate = {}, {}, {}
    user_outputs: list[str | None] = []
    output_tokens: list[str] = []
    grads_to_params, grads_to_inputs = {}, {}
    for value, desc in zip(outs, descs):
        name = value.name if isinstance(value, fx.Node) else None
        if isinstance(desc, EffectToken):
            output_tokens.append(name)
        elif isinstance(desc, MutatedInput):
            k = desc.index
            target = parameters_to_mutate if k < n_p else \
                buffers_to_mutate if k < n_p + n_b else inputs_to_mutate
            target[name] = fqn[k] if k < n_p + n_b else names[k]
        elif isinstance(desc, UserOutput):
            user_outputs.append(name)
        elif isinstance(desc, Grad):
            if desc.index < n_p + n_b:
                grads_to_params[name] = fqn[desc.index]
            else:
                grads_to_inputs[name] = names[desc.index]
    backward = None
    if trace_joint:
        # Note [The loss output]: the name of the loss node itself.  (torch
        # 2.13 names the graph output at position output_loss_index, which is
        # a mutated buffer's new value when the module mutates buffers.)
        backward = BackwardSignature(grads_to_params, grads_to_inputs, user_outputs[loss_index])
    out_spec = e.traced.signature.out_spec
    return GraphSignature(
        parameters=params, buffers=buffers, user_inputs=names[n_p + n_b:],
        user_outputs=user_outputs,
        inputs_to_parameters=dict(zip(names[:n_p], params)),
        inputs_to_buffers=dict(zip(names[n_p:n_p + n_b], buffers)),
        buffers_to_mutate=buffers_to_mutate, parameters_to_mutate=parameters_to_mutate,
        user_inputs_to_mutate=inputs_to_mutate, in_spec=e.in_spec, out_spec=out_spec,
        backward_signature=backward, input_tokens=input_tokens, output_tokens=output_tokens)


# ---------------------------------------------------------------- aot_export_joint_simple

def aot_export_joint_simple(func: Callable, args: Sequence[Any], *, trace_joint: bool,
                            num_params_buffers: int = 0,
                            decompositions: Mapping | None = None) -> fx.GraphModule:
    """The joint (or inference) graph of ``func`` with no calling-convention
    change (module docstring; torch's ``aot_export_joint_simple``)."""
    e = trace_for_export(func, args, None, num_params_buffers=num_params_buffers,
                         decompositions=decompositions,
                         grad_enabled=None if trace_joint else False, trace_joint=trace_joint,
                         args_container=list)
    sig = e.traced.signature
    if any(i.mutated for i in sig.inputs):
        raise RuntimeError("aot_export_joint_simple does not support input mutations. "
                           "(aotgrad: return the new value instead, or use "
                           "aot_export_function.) " + _meta_text(sig))
    if any(o.kind not in (OutputKind.FRESH, OutputKind.CONSTANT, OutputKind.SAME_AS_OUTPUT)
           for o in sig.outputs):
        raise RuntimeError("aot_export_joint_simple does not support outputs that alias "
                           "inputs. (aotgrad: return a fresh tensor, e.g. `.clone()`.) "
                           f"outputs={[o.kind.value for o in sig.outputs]}")
    in_spec = _torch.spec_children(e.in_spec)[0]
    if not all(c.is_leaf() for c in _torch.spec_children(in_spec)):
        raise RuntimeError("aot_export_joint_simple requires individual inputs not to be "
                           f"pytrees. in_spec={in_spec} (aotgrad: flatten them, or use "
                           "aot_export_function.)")
    out_spec = sig.out_spec
    if out_spec.type is _Opened:  # an object pytree does not open, somewhere in the output
        raise RuntimeError(
            f"Found {out_spec.context.unknown} in output, which is not a known type. If this "
            "type holds tensors, you need to register a pytree for it. (aotgrad: "
            "aot_export_joint_simple exports a graph whose outputs are a list or tuple of "
            "tensors; return the object's tensors instead, or compile the function with "
            "aot_function, which builds such objects on each call.)")
    if out_spec.is_leaf():
        raise RuntimeError("aot_export_joint_simple requires outputs to be a single "
                           f"list/tuple. out_spec={out_spec} (aotgrad: return `(out,)`.)")
    if not all(c.is_leaf() for c in _torch.spec_children(out_spec)):
        raise RuntimeError("aot_export_joint_simple requires individual outputs not to be "
                           f"pytrees. out_spec={out_spec}")
    parts = graph_parts(e)
    if e.traced.graph.is_joint:
        return _pytree_joint(e, parts, "inner_f", lift_tokens=True)
    return _flat_graph(e, parts, "<lambda>", lift_tokens=_lift_tokens())


# ---------------------------------------------------------------- aot_export_function

def aot_export_function(func: Callable, args: Sequence[Any], *,
                        num_params_buffers: int = 0, decompositions: Mapping | None = None,
                        no_tangents: bool = False, pre_dispatch: bool = False,
                        dynamic_shapes: bool | None = None, keep_input_mutations: bool = False,
                        trace_joint: bool = False, kwargs: Mapping | None = None,
                        ) -> tuple[fx.GraphModule, Signature, Any, Any]:
    """Export ``func`` over pytree args: ``(gm, Signature, in_spec, out_spec)``
    (torch's ``_aot_export_function``; its ViewAndMutationMeta is aotgrad's
    Signature here).  A joint is traced when grad mode is on and an output
    requires grad; ``trace_joint`` adds the joint's refusals."""
    grad = False if pre_dispatch else None
    if no_tangents:
        e0 = trace_for_export(func, args, kwargs, num_params_buffers=num_params_buffers,
                              decompositions=decompositions, dynamic=dynamic_shapes,
                              keep_input_mutations=keep_input_mutations, grad_enabled=grad,
                              trace_joint=trace_joint)
        loss = _single_scalar_output(e0)
        e = e0 if loss is None else trace_for_export(
            func, args, kwargs, num_params_buffers=num_params_buffers,
            decompositions=decompositions, dynamic=dynamic_shapes,
            keep_input_mutations=keep_input_mutations, loss_index=loss,
            trace_joint=trace_joint)
    else:
        e = trace_for_export(func, args, kwargs, num_params_buffers=num_params_buffers,
                             decompositions=decompositions, dynamic=dynamic_shapes,
                             keep_input_mutations=keep_input_mutations, grad_enabled=grad,
                             trace_joint=trace_joint)
    t = e.traced
    if pre_dispatch:
        gm = _pre_dispatch_graph(e, func, decompositions)
    elif t.graph.is_joint:
        gm = _pytree_joint(e, graph_parts(e), "inner_f", extra_tangent=no_tangents,
                           lift_tokens=True)
    else:
        gm = _flat_graph(e, graph_parts(e), "<lambda>", lift_tokens=_lift_tokens())
    return gm, t.signature, e.in_spec, t.signature.out_spec


def _single_scalar_output(e: Exported) -> int | None:
    """no_tangents: the one output that gets a gradient, which must be a
    single element (torch: "expected single scalar tangent")."""
    sig = e.traced.signature
    if not e.traced.graph.is_joint:
        return None
    needs = [k for k, m in enumerate(sig.tangent_mask) if m]
    user = [i for i in sig.user_graph_outputs]
    first = len(sig.mutated_inputs_out_of_graph)
    if len(needs) != 1 or not first <= needs[0] < first + len(user):
        raise AssertionError(
            f"expected single scalar tangent for no_tangents mode, got {len(needs)} tangents"
            " (aotgrad: no_tangents differentiates one scalar output; detach the others)")
    index = user[needs[0] - first]
    if sig.outputs[index].shape is None or len(sig.outputs[index].shape) != 0:
        raise AssertionError(
            "expected single scalar tangent for no_tangents mode, got an output of shape "
            f"{list(sig.outputs[index].shape or ())} (aotgrad: a 0-dim loss is needed)")
    return index
