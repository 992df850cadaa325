"""Node metadata: the user's line on every node of the graphs.

Note [Node metadata]
~~~~~~~~~~~~~~~~~~~~
Dynamo's graph carries, per node, where the user wrote it: ``stack_trace``,
``nn_module_stack``, ``source_fn_stack`` (and ``custom`` annotations, tags
of torch's ``fx.traceback.annotate``).  Profilers, inductor's kernel names
and error messages read them from the ATen graphs.  So under torch.compile
the dynamo graph is run node by node (``fx.Interpreter``) with torch's
node-meta preservation on (``fx.traceback.preserve_node_meta``): each node
it runs becomes the *current meta*, and every ATen node the tracers record
meanwhile copies its fields (``copy_current``; make_fx does the same).

The backward is traced by autograd, not by running dynamo's nodes: hooks on
the autograd graph of the forward mark what the engine runs as backward and
with the sequence number of the forward op it differentiates
(``backward_marks``), and each backward node gets that number (``seq_nr``)
and ``autograd_backward``.  After the trace, the forward node with the same
number lends its stack trace, and its module and source stacks as
``fwd_nn_module_stack`` / ``fwd_source_fn_stack`` (the names PyTorch uses),
to the backward nodes made from it (``copy_forward_to_backward``).  Nothing
of this runs unless preservation is on (one global read per node).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable

import torch
import torch.fx as fx

from . import _torch

preserving = _torch.fx_traceback.has_preserved_node_meta


def copy_current(node: fx.Node) -> None:
    """Give ``node`` the current meta's fields (call when ``preserving()``)."""
    current = _torch.fx_traceback.get_current_meta()
    stack = current.get("stack_trace")
    if stack:
        node.meta["stack_trace"] = stack
    for field in _torch.COPIED_META_FIELDS:
        if field in current:
            node.meta[field] = copy.copy(current[field])
    if current.get("in_grad_fn", 0) > 0:
        node.meta["seq_nr"] = current["grad_fn_seq_nr"][-1]
    else:
        node.meta["seq_nr"] = torch.autograd._get_sequence_nr() - 1
    if current.get("autograd_backward"):
        node.meta["autograd_backward"] = True


def run_preserving(gm: fx.GraphModule, args: Iterable[Any]) -> Any:
    """Run dynamo's graph node by node, each node the current meta in turn."""
    return fx.Interpreter(gm).run(*args)


def has_user_meta(gm: fx.GraphModule) -> bool:
    """Whether a node of ``gm`` says where the user wrote it."""
    return any(n.meta.get("stack_trace") or n.meta.get("nn_module_stack")
               for n in gm.graph.nodes)


@contextlib.contextmanager
def backward_marks(outputs: Iterable[Any]):
    """While autograd runs the backward of ``outputs`` (when preserving):
    the current meta says backward, and the sequence number of the node."""
    if not preserving():
        yield
        return
    tb = _torch.fx_traceback
    handles = []
    for fn in _torch.autograd_nodes([t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]):
        # the "autograd_backward" mark is written directly: torch 2.11's
        # fx.traceback has no _mark_autograd_backward (2.13 writes the same key)
        def pre(grad_outputs, seq_nr=fn._sequence_nr()):
            tb.set_grad_fn_seq_nr(seq_nr)
            tb.current_meta["autograd_backward"] = True

        def post(grad_inputs, grad_outputs):
            tb.reset_grad_fn_seq_nr()
            tb.current_meta.pop("autograd_backward", None)

        handles.append(fn.register_prehook(pre))
        handles.append(fn.register_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def copy_forward_to_backward(gm: fx.GraphModule) -> None:
    """Backward nodes take from the forward node of their sequence number
    its stack trace and, as ``fwd_*``, its module and source stacks."""
    forward: dict[int, fx.Node] = {}
    for n in gm.graph.nodes:
        if "seq_nr" in n.meta and not n.meta.get("autograd_backward"):
            forward.setdefault(n.meta["seq_nr"], n)
    for n in gm.graph.nodes:
        if not n.meta.get("autograd_backward") or "seq_nr" not in n.meta:
            continue
        fwd = forward.get(n.meta["seq_nr"])
        if fwd is None:
            continue
        if "stack_trace" in fwd.meta and "stack_trace" not in n.meta:
            n.meta["stack_trace"] = fwd.meta["stack_trace"]
        n.meta["fwd_nn_module_stack"] = fwd.meta.get("nn_module_stack")
        n.meta["fwd_source_fn_stack"] = fwd.meta.get("source_fn_stack")
