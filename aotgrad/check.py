"""The checker run after every stage that makes a graph, and the first-call
check of custom ops (Note [Custom ops returning aliases]).

Note [Graph invariants]: every graph aotgrad builds is in topological order,
its placeholders all carry a role descriptor, and its single output node
returns a flat tuple whose length matches the output descriptors.  The
first (FX's ``Graph.lint``: topological order, well-formed nodes) walks every
node's arguments, about 2 ms of a CNN's first call; it runs under
``config.debug_assert``.  A graph out of order also fails when its code is
made or run (a name read before it is bound).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from . import _torch, config
from ._torch import pytree
from .descriptors import DESC


def check_graph(gm: fx.GraphModule) -> None:
    graph = gm.graph
    if config.debug_assert:
        graph.lint()  # topological order, well-formed nodes
    for node in graph.find_nodes(op="placeholder"):
        if DESC not in node.meta:
            raise AssertionError(f"aotgrad: placeholder {node.name} has no role descriptor")
    out = graph.output_node()
    values = out.args[0]
    if not isinstance(values, (tuple, list)):
        raise AssertionError(f"aotgrad: the graph returns {type(values).__name__}, not a tuple")
    descs = out.meta.get(DESC)
    if descs is not None and len(descs) != len(values):
        raise AssertionError(
            f"aotgrad: the graph returns {len(values)} values but has {len(descs)} output "
            "descriptors")


# Note [Custom ops returning aliases]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A custom op (torch.library) that declares no aliasing in its schema is
# taken as functional: the trace makes its outputs fresh values.  One whose
# implementation returns an input, or a view of one (or one output twice),
# breaks that -- a later in-place change of its output changes the input too,
# which the compiled program does not know.  As PyTorch's AOTAutograd does, the
# first call of a forward (or inference) graph holding such ops runs under a
# mode that checks each one's outputs against its inputs and other outputs by
# storage (``config.check_custom_op_aliasing``); a violation warns, or raises
# under ``config.error_on_custom_op_aliasing``.  Later calls are not checked.

_BUILTIN_NAMESPACES = frozenset({"aten", "prim", "prims", "_c10d_functional", "c10d",
                                 "onednn", "aotgrad", "fsdp"})


def _is_custom_op(target) -> bool:
    if not isinstance(target, _torch.OpOverload) or target.namespace in _BUILTIN_NAMESPACES:
        return False
    schema = target._schema
    return not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns))


def has_custom_ops(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls a custom op Note [Custom ops returning aliases] checks."""
    return any(n.op == "call_function" and _is_custom_op(n.target) for n in gm.graph.nodes)


def _storages(values) -> list:
    out = []
    for v in pytree.tree_leaves(values):
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and v.numel() and \
                type(v) in (torch.Tensor, torch.nn.Parameter):
            out.append(v.untyped_storage().data_ptr())
    return out


def _check_outputs(op, args, kwargs, result) -> None:
    inputs = set(_storages((args, kwargs)))
    outs = _storages(result)
    shared = [k for k, s in enumerate(outs) if s in inputs or outs.index(s) != k]
    if not shared:
        return
    message = (f"aotgrad: the custom op {op.name()} returned output {shared[0]} aliasing one of "
               "its inputs or another of its outputs, which its schema does not declare: "
               "the compiled program takes its outputs as new tensors. Return a copy "
               "(.clone()) or declare the aliasing in the schema (Note [Custom ops returning "
               "aliases]).")
    if config.error_on_custom_op_aliasing:
        raise RuntimeError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


class _CheckCustomOps(_torch.TorchDispatchMode):
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _is_custom_op(func):
            _check_outputs(func, args, kwargs, result)
        return result


class FirstCallChecked:
    """A boxed graph callable whose first call runs under the check of
    Note [Custom ops returning aliases]."""

    _boxed_call = True

    def __init__(self, fn) -> None:
        self.fn = fn
        self.first = True

    def __call__(self, args: list):
        if not self.first:
            return self.fn(args)
        self.first = False
        with _CheckCustomOps():
            return self.fn(args)


def checked_first_call(fn, gm: fx.GraphModule):
    """``fn`` (boxed), checked at its first call where Note [Custom ops
    returning aliases] asks for it."""
    if not config.check_custom_op_aliasing or not has_custom_ops(gm):
        return fn
    return FirstCallChecked(fn)
