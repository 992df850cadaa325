"""Effect tokens in exported graphs.

Note [Effect tokens in export]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
aotgrad's own graphs record an effectful op as the op itself (Note [Effect
tokens], record.py): the graphs it compiles are never reordered by anything
that would need a token.  Exported graphs leave aotgrad, and the programs
that read them order effects by data dependence, as PyTorch's export does:
each effectful op becomes ``with_effects(token, op, *args)``, which returns
the next token and the op's results, so the effects form one chain::

    _print = torch.ops.aten._print.default('hello')      # aotgrad's graph

becomes, with the token lifted (``config.unlift_effect_tokens=False``, the
default), a graph input before every other and a graph output before every
other (``GraphSignature.input_tokens`` / ``output_tokens`` name them)::

    def forward(self, arg0_1, arg1_1):
        with_effects = torch.ops.higher_order.with_effects(arg0_1, torch.ops.aten._print.default, 'hello')
        getitem = with_effects[0]
        ...
        return (getitem, ...)

or, unlifted (``unlift_effect_tokens=True``), made and consumed in the
graph, the calling convention unchanged::

    _make_token_default = torch.ops.prims._make_token.default()
    with_effects = torch.ops.higher_order.with_effects(_make_token_default, ...)
    getitem = with_effects[0]
    ...
    _sink_tokens_default = torch.ops.prims._sink_tokens.default([getitem])

Either way the other inputs are numbered as if the token were the first
(``arg1_1 ...``), as torch's are.  One token: torch 2.13 has one kind of
effect (ordered).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from . import _torch
from .descriptors import DESC, EffectToken


def is_effect(n: fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, _torch.OpOverload) and \
        _torch.has_effects(n.target)


def has_effects(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` runs an effectful op (recorded as the op itself)."""
    return any(is_effect(n) for n in gm.graph.nodes)


def token_value(gm: fx.GraphModule):
    """A fake empty tensor in ``gm``'s fake mode, the value of a token (as torch's)."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    mode = _torch.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return None if mode is None else mode.from_tensor(torch.empty(0))


class Chain:
    """Note [Effect tokens in export]: one token through the effectful ops of
    a graph being built, in the order they are copied into it (so that the
    nodes are named in the order a trace names them).  ``lifted``: the token
    is a placeholder ``name`` (made first: before the other placeholders)
    and the first output; else it is made after the placeholders
    (``begin``) and sunk before the output (``end``)."""

    def __init__(self, graph: fx.Graph, *, lifted: bool, name: str, val=None):
        self.graph, self.lifted, self.val = graph, lifted, val
        self.token: fx.Node | None = None
        if lifted:
            self.token = graph.placeholder(name)
            self.token.meta[DESC] = EffectToken(0)
            self._set_val(self.token, val)

    @staticmethod
    def _set_val(node: fx.Node, val) -> None:
        if val is not None:
            node.meta["val"] = val

    def begin(self) -> None:
        if not self.lifted:
            self.token = self.graph.call_function(torch.ops.prims._make_token.default, ())
            self._set_val(self.token, self.val)

    def effect(self, n: fx.Node, args: tuple, kwargs: dict) -> list[fx.Node]:
        """``n`` (``op(*args)``, its arguments already in the new graph) as
        ``with_effects(token, op, *args)``: the nodes of its results (one per
        result of the op; one, for None, when it has none), as torch's trace
        makes them.  Those nobody reads are swept by dead-code elimination."""
        op = n.target
        num_returns = len(op._schema.returns)
        graph = self.graph
        node = graph.call_function(torch.ops.higher_order.with_effects,
                                   (self.token, op, *args), kwargs)
        node.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        val = n.meta.get("val")
        results: Sequence = (None,) if num_returns == 0 else \
            (val,) if num_returns == 1 else tuple(val or (None,) * num_returns)
        node.meta["val"] = (self.val, *results)
        items = [graph.call_function(operator.getitem, (node, k))
                 for k in range(1 + len(results))]
        self._set_val(items[0], self.val)
        for item, r in zip(items[1:], results):
            self._set_val(item, r)
        self.token = items[0]
        return items[1:]

    def end(self, values: list) -> list:
        """The graph's output values, the token first when lifted."""
        if self.lifted:
            return [self.token, *values]
        self.graph.call_function(torch.ops.prims._sink_tokens.default, ([self.token],))
        return values


def inline(gm: fx.GraphModule) -> None:
    """``with_effects(token, op, *args)`` nodes of a graph make_fx traced
    under functionalization become ``op(*args)`` (aotgrad's form, Note
    [Effect tokens], record.py), and the token functionalization made for
    the first one (a tensor constant, lifted and detached) goes::

        _tensor_constant0 = self._tensor_constant0
        lift_fresh_copy = torch.ops.aten.lift_fresh_copy.default(_tensor_constant0)
        detach_ = torch.ops.aten.detach_.default(lift_fresh_copy)
        with_effects = torch.ops.higher_order.with_effects(detach_, torch.ops.aten._print.default, 'hello')
        getitem = with_effects[0]

    becomes ``_print = torch.ops.aten._print.default('hello')``."""
    graph = gm.graph
    effects = graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    if not effects:
        return
    dead: set[fx.Node] = set()
    sources: list[fx.Node] = []
    for n in effects:
        token, op, *args = n.args
        if not isinstance(op, _torch.OpOverload) or \
                any(u.target is not operator.getitem for u in n.users):
            raise AssertionError(f"aotgrad: an effect not made by functionalization: "
                                 f"{n.format_node()}")
        if not (token.op == "call_function" and token.target is operator.getitem and
                token.args[0] in effects):
            sources.append(token)
        with graph.inserting_before(n):
            new = graph.call_function(op, tuple(args), dict(n.kwargs))
        new.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        val = n.meta.get("val")
        num_returns = len(op._schema.returns)
        if isinstance(val, (list, tuple)) and num_returns:
            new.meta["val"] = val[1] if num_returns == 1 else tuple(val[1:])
        for user in list(n.users):
            k = user.args[1]
            if k == 0 or num_returns == 0:
                dead.add(user)
            elif num_returns == 1:
                user.replace_all_uses_with(new)
                dead.add(user)
            else:
                user.args = (new, k - 1)
        dead.add(n)
    for n in reversed(list(graph.nodes)):  # the token chain: only the chain reads it
        if n in dead:
            graph.erase_node(n)
    erased: set[fx.Node] = set()
    while sources:  # the first token and what made it, when nothing else reads them
        n = sources.pop()
        if n in erased or n.users or n.op == "placeholder":
            continue
        erased.add(n)
        inputs = n.all_input_nodes
        target = n.target if n.op == "get_attr" else None
        graph.erase_node(n)
        if target is not None and not graph.find_nodes(op="get_attr", target=target) and \
                hasattr(gm, target):
            delattr(gm, target)
        sources.extend(inputs)
    gm.recompile()
