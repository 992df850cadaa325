"""Stage 4 — trace: one functional ATen graph, joint or inference.

With autograd needed (``Signature.needs_autograd``) the *joint* graph is
traced: it takes ``(primals, tangents)`` and returns the forward outputs
followed by one gradient per primal (``None`` where no gradient exists)::

    def forward(self, primals_1, primals_2, tangents_1):
        mul = torch.ops.aten.mul.Tensor(primals_1, primals_2)
        mul_1 = torch.ops.aten.mul.Tensor(tangents_1, primals_2)
        return (mul, mul_1, None)

Otherwise the *inference* graph takes the graph inputs (``arg0_1`` ...) and
returns the outputs.  Both are traced with ``make_fx`` over fake tensors under
functionalization, so the graphs hold functional ATen ops (views stay views);
decompositions apply here.  Placeholders and the output node carry role
descriptors (``aotgrad.descriptors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from . import _torch
from .analyze import OutputInfo, Signature
from .descriptors import DESC, Grad, Primal, Tangent, UserOutput
from .flatten import FlatFunction


@dataclass(frozen=True)
class TracedGraph:
    gm: fx.GraphModule
    is_joint: bool
    example_inputs: tuple[Any, ...]          # fake: primals (+ tangents when joint)
    num_fwd_outputs: int                     # joint: outputs before the gradients


def trace(flat_fn: FlatFunction, fake_inputs: Sequence[torch.Tensor], sig: Signature,
          decompositions: Mapping | None, *, loss_index: int | None = None) -> TracedGraph:
    """The joint graph when ``sig.needs_autograd``, else the inference graph.

    With ``loss_index`` (export of a training step) the joint takes no
    tangents: it differentiates the scalar output ``loss_index`` (a graph
    output index) as ``loss.backward()`` would.
    """
    if sig.needs_autograd:
        return _trace_joint(flat_fn, fake_inputs, sig, decompositions, loss_index)
    return _trace_inference(flat_fn, fake_inputs, sig, decompositions)


def _graph_outputs(outs: list, sig: Signature) -> list:
    return [outs[i] for i in sig.graph_outputs]


def _trace_inference(flat_fn, fake_inputs, sig, decompositions) -> TracedGraph:
    def inference(*args):
        with _torch.functional_mode():
            f_args = [_torch.to_functional(a) for a in args]
            outs = _graph_outputs(flat_fn(*f_args), sig)
            return [_torch.from_functional(o) for o in outs]

    with torch.no_grad():
        gm = _torch.make_fx(inference, decomposition_table=decompositions)(*fake_inputs)
    _flatten_codegen(gm)
    drop_detaches(gm)
    out_descs = tuple(UserOutput(k) for k in range(len(sig.graph_outputs)))
    _annotate(gm, [Primal(i) for i in range(len(fake_inputs))], out_descs)
    return TracedGraph(gm, False, tuple(fake_inputs), len(out_descs))


def example_tangents(outputs: Sequence[OutputInfo]) -> list[torch.Tensor]:
    """Tangents are traced contiguous; the runtime makes them contiguous too."""
    return [torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outputs]


def _trace_joint(flat_fn, fake_inputs, sig, decompositions, loss_index) -> TracedGraph:
    diff = sig.differentiable_outputs if loss_index is None else (loss_index,)
    if loss_index is not None:
        loss = sig.outputs[sig.graph_outputs[loss_index]]
        if len(loss.shape) != 0 or not loss.requires_grad:
            raise ValueError(
                f"aotgrad: output {loss_index} is not a scalar that requires grad (shape "
                f"{list(loss.shape)}, requires_grad={loss.requires_grad}); the loss must be one")
    grad_is_none: list[bool] = []

    def joint(primals, tangents):
        with _torch.functional_mode():
            f_primals = [_torch.to_functional(p) for p in primals]
            f_tangents = [_torch.to_functional(t) for t in tangents]
            outs = _graph_outputs(flat_fn(*f_primals), sig)
            wrt = [p for p, info in zip(f_primals, sig.inputs) if info.requires_grad]
            grads: list = []
            if diff and wrt:
                grads = list(torch.autograd.grad(
                    [outs[k] for k in diff], wrt, f_tangents or None, allow_unused=True))
            grads_iter = iter(grads)
            all_grads = [next(grads_iter, None) if info.requires_grad else None
                         for info in sig.inputs]
            grad_is_none[:] = [g is None for g in all_grads]
            return ([_torch.from_functional(o) for o in outs],
                    [_torch.from_functional(g) for g in all_grads if g is not None])

    graph_outs = [sig.outputs[i] for i in sig.graph_outputs]
    tangents = example_tangents([graph_outs[k] for k in diff]) if loss_index is None else []
    primals = [_detached_like(x) for x in fake_inputs]
    with torch.enable_grad():
        gm = _torch.make_fx(joint, decomposition_table=decompositions)(primals, tangents)
    num_fwd = len(sig.graph_outputs)
    _flatten_codegen(gm, insert_none_after=num_fwd, none_mask=grad_is_none)
    drop_detaches(gm)
    in_descs = [Primal(i) for i in range(len(primals))] + [Tangent(k) for k in range(len(tangents))]
    out_descs = tuple(UserOutput(k) for k in range(num_fwd)) + \
        tuple(Grad(i) for i in range(len(primals)))
    _annotate(gm, in_descs, out_descs)
    return TracedGraph(gm, True, (*primals, *tangents), num_fwd)


def _detached_like(x: Any) -> Any:
    # Each primal is a leaf of the joint's autograd graph (symbolic sizes pass).
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.requires_grad)
    return x


def _flatten_codegen(gm: fx.GraphModule, insert_none_after: int | None = None,
                     none_mask: Sequence[bool] = ()) -> None:
    """Drop make_fx's pytree calling convention: flat inputs, one flat tuple out.

    ``none_mask`` restores the ``None`` gradients that pytree flattening drops.
    """
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()
    out_node = graph.output_node()
    flat = list(_torch.pytree.tree_leaves(out_node.args[0]))
    if insert_none_after is not None:
        fwd, grads = flat[:insert_none_after], iter(flat[insert_none_after:])
        flat = fwd + [None if is_none else next(grads) for is_none in none_mask]
    out_node.args = (tuple(flat),)
    gm._in_spec = None
    gm._out_spec = None
    gm.recompile()


def drop_detaches(gm: fx.GraphModule) -> None:
    """Remove ``aten.detach`` nodes that only feed other ops.

    Autograd's saved-value unpacking leaves ``detach`` chains in traced graphs;
    in a functional graph they are identities.  A detach that is itself a
    graph output is kept (it decides an output's aliasing).

        detach = detach(relu); detach_1 = detach(detach); tb = threshold_backward(g, detach_1, 0)
        ->  tb = threshold_backward(g, relu, 0)
    """
    graph = gm.graph
    out_node = graph.output_node()
    changed = False
    for node in list(graph.find_nodes(op="call_function", target=_torch.aten.detach.default)):
        if out_node in node.users:
            continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()


def _annotate(gm: fx.GraphModule, in_descs: list, out_descs: tuple) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert len(placeholders) == len(in_descs), (len(placeholders), len(in_descs))
    for node, desc in zip(placeholders, in_descs):
        node.meta[DESC] = desc
    gm.graph.output_node().meta[DESC] = out_descs
