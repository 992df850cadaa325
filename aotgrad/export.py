"""Export: the traced graphs themselves, for compilers that run them elsewhere.

* ``aot_export_module(mod, args, trace_joint=...)`` → ``(gm, GraphSignature)``:
  the graph takes ``(*parameters, *buffers, *user_inputs)``.  Without
  ``trace_joint`` it returns the user outputs; with it, ``output_loss_index``
  names the scalar loss among the outputs and the graph returns
  ``(*user_outputs, *parameter_grads, *user_input_grads)`` — gradients of the
  loss, as ``loss.backward()`` computes them (no tangent inputs).
* ``aot_export_joint_simple(fn, args, trace_joint=...)`` → the joint graph
  ``(*primals, *tangents) -> (*outputs, *grads)`` or the inference graph, for
  flat tensor inputs and outputs only.
* ``aot_export_function(fn, args, ...)`` → ``(gm, Signature, in_spec, out_spec)``.

Export never guards: the graph is valid for inputs like ``args``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._torch import pytree
from .analyze import OutputKind, Signature
from .compile import nop
from .pipeline import CompileOptions, CompileReport, Traced, trace_call


@dataclass(frozen=True)
class BackwardSignature:
    gradients_to_parameters: dict[str, str]      # graph output name -> parameter FQN
    gradients_to_user_inputs: dict[str, str]     # graph output name -> user input name
    loss_output: str                             # graph output name of the loss


@dataclass(frozen=True)
class GraphSignature:
    """How an exported module graph's inputs and outputs map to the module."""
    parameters: list[str]
    buffers: list[str]
    user_inputs: list[str]                       # placeholder names
    user_outputs: list[str]                      # output node names
    inputs_to_parameters: dict[str, str]         # placeholder name -> FQN
    inputs_to_buffers: dict[str, str]
    buffers_to_mutate: dict[str, str] = field(default_factory=dict)
    user_inputs_to_mutate: dict[str, str] = field(default_factory=dict)
    in_spec: Any = None
    out_spec: Any = None
    backward_signature: BackwardSignature | None = None


def _export(fn: Callable, args: Sequence[Any], kwargs: Mapping | None, *,
            num_params_buffers: int, decompositions: Mapping | None, trace_joint: bool,
            loss_index: int | None = None, dynamic: bool = False) -> Traced:
    leaves, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    options = CompileOptions(nop, decompositions=decompositions,
                             num_params_buffers=num_params_buffers, dynamic=dynamic)
    t = trace_call(fn, options, leaves, in_spec, CompileReport(),
                   loss_index=loss_index, require_grad=trace_joint)
    if trace_joint and not t.graph.is_joint:
        raise RuntimeError(
            "aotgrad export: trace_joint=True but no input requires grad, so there is no "
            "backward to trace. Make the parameters (or inputs) require grad.")
    for i, out in enumerate(t.signature.outputs):
        if not out.kind.through_autograd:
            what = {OutputKind.IS_INPUT: "an input itself", OutputKind.CONSTANT: "not a tensor",
                    OutputKind.ALIAS_OF_INPUT: "a view of an input",
                    OutputKind.SAME_AS_OUTPUT: "another output again"}.get(
                        out.kind, "a view of another output")
            raise RuntimeError(
                f"aotgrad export: output {i} is {what}; exported graphs return only tensors "
                "they compute. Return a fresh tensor (e.g. .clone()) instead.")
    gm = t.graph.gm
    gm.meta["aotgrad_signature"] = t.signature
    return t


def aot_export_module(mod: nn.Module, args: Sequence[Any], *, trace_joint: bool,
                      output_loss_index: int | None = None,
                      decompositions: Mapping | None = None,
                      kwargs: Mapping | None = None) -> tuple[fx.GraphModule, GraphSignature]:
    """Export ``mod``'s forward (``trace_joint=False``) or training step graph."""
    params = dict(mod.named_parameters(remove_duplicate=False))
    buffers = dict(mod.named_buffers(remove_duplicate=False))
    if trace_joint and output_loss_index is None:
        raise ValueError("aot_export_module(trace_joint=True) needs output_loss_index: the "
                         "index of the scalar loss among the module's outputs")

    def fn(*all_args, **kw):
        p = dict(zip(params, all_args[:len(params)]))
        b = dict(zip(buffers, all_args[len(params):len(params) + len(buffers)]))
        return torch.func.functional_call(mod, (p, b), all_args[len(params) + len(buffers):],
                                          kw, tie_weights=False)

    state = [*params.values(), *buffers.values()]
    if not trace_joint:
        state = [s.detach() for s in state]
    t = _export(fn, [*state, *args], kwargs, num_params_buffers=len(state),
                decompositions=decompositions, trace_joint=trace_joint,
                loss_index=output_loss_index)
    sig, gm = t.signature, t.graph.gm
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    out_nodes = list(gm.graph.output_node().args[0])
    n_p, n_b = len(params), len(buffers)
    graph_slot = t.flat.leaf_slot
    num_mutated = len(sig.mutated_inputs_out_of_graph)
    num_user_out = sig.num_graph_outputs
    user_outputs = [_name(o) for o in out_nodes[num_mutated:num_user_out]]
    mutated_names = {_name(out_nodes[k]): placeholders[i]
                     for k, i in enumerate(sig.mutated_inputs_out_of_graph)}
    buffer_of = {placeholders[graph_slot[n_p + k]]: fqn for k, fqn in enumerate(buffers)}
    if any(sig.inputs[graph_slot[k]].mutated for k in range(n_p)):
        raise RuntimeError("aot_export_module: the module mutates a parameter in place; "
                           "exported graphs support buffer and input mutations only")
    backward = None
    if trace_joint:
        grads = out_nodes[num_user_out:]
        grad_params = {}
        for k, fqn in enumerate(params):
            g = grads[graph_slot[k]]
            if g is not None:
                grad_params[_name(g)] = fqn
        grad_inputs = {}
        for slot in range(len(state), t.flat.num_graph_inputs):
            if grads[slot] is not None:
                grad_inputs[_name(grads[slot])] = placeholders[slot]
        backward = BackwardSignature(grad_params, grad_inputs, user_outputs[output_loss_index])
        # only gradients that exist are returned
        gm.graph.output_node().args = (tuple(out_nodes[:num_user_out]) +
                                       tuple(g for g in grads if g is not None),)
        gm.recompile()
    signature = GraphSignature(
        parameters=list(params), buffers=list(buffers),
        user_inputs=placeholders[n_p + n_b:], user_outputs=user_outputs,
        inputs_to_parameters={placeholders[graph_slot[k]]: fqn for k, fqn in enumerate(params)},
        inputs_to_buffers=buffer_of,
        buffers_to_mutate={o: buffer_of[p] for o, p in mutated_names.items() if p in buffer_of},
        user_inputs_to_mutate={o: p for o, p in mutated_names.items() if p not in buffer_of},
        in_spec=t.flat.in_spec, out_spec=sig.out_spec, backward_signature=backward)
    return gm, signature


def _name(node: Any) -> str:
    return node.name if isinstance(node, fx.Node) else str(node)


def aot_export_joint_simple(func: Callable, args: Sequence[Any], *, trace_joint: bool,
                            num_params_buffers: int = 0,
                            decompositions: Mapping | None = None) -> fx.GraphModule:
    """The joint (or inference) graph of ``func`` over flat tensor args."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("aot_export_joint_simple takes a flat list of tensors as args")
    t = _export(func, args, None, num_params_buffers=num_params_buffers,
                decompositions=decompositions, trace_joint=trace_joint)
    shape = pytree.tree_unflatten(list(range(len(t.signature.outputs))), t.signature.out_spec)
    flat_out = isinstance(shape, int) or (isinstance(shape, (tuple, list)) and
                                          all(isinstance(x, int) for x in shape))
    if not flat_out:
        raise ValueError("aot_export_joint_simple: func must return a tensor or a flat "
                         "tuple/list of tensors")
    return t.graph.gm


def aot_export_function(func: Callable, args: Sequence[Any], *,
                        num_params_buffers: int = 0, decompositions: Mapping | None = None,
                        trace_joint: bool = False, dynamic_shapes: bool = False,
                        kwargs: Mapping | None = None,
                        ) -> tuple[fx.GraphModule, Signature, Any, Any]:
    """Export ``func`` over pytree args: ``(gm, Signature, in_spec, out_spec)``."""
    t = _export(func, args, kwargs, num_params_buffers=num_params_buffers,
                decompositions=decompositions, trace_joint=trace_joint, dynamic=dynamic_shapes)
    return t.graph.gm, t.signature, t.flat.in_spec, t.signature.out_spec
