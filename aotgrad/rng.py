"""Random ops the backward recomputes, with the forward's random numbers.

Note [Replayed random ops]
--------------------------
A random op recomputed in the backward draws new numbers: the gradients
would be silently wrong, so by default the partitioners never recompute one
(``partition.is_random_or_mutating``).  With ``config.functionalize_rng_ops``
they may: the forward saves the generator's state just before each random op
it shares with the backward, and the backward runs the op again from that
state (torch's ``run_and_save_rng_state`` / ``run_with_rng_state`` operators:
the state is an ordinary saved tensor, so nothing changes in the runtime or
the calling convention).  The backward restores the generator afterwards, so
code after the backward sees the generator as eager leaves it.  What is
saved is the generator state (5 KB for the CPU generator, 16 bytes on CUDA)
instead of the op's output::

    fw before:  rand_like = rand_like(primals_1); ...; return (mul, rand_like)
    fw after:   run_and_save_rng_state = run_and_save_rng_state(rand_like.default, primals_1)
                getitem = run_and_save_rng_state[0]; rand_like = run_and_save_rng_state[1]
                ...; return (mul, primals_1, getitem)
    bw after:   rand_like = run_with_rng_state(getitem, rand_like.default, primals_1)

A random op the forward does not compute (one only the gradients need) is
left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import _torch, config
from .descriptors import DESC, Saved, Tangent


def _random_calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and
            isinstance(n.target, _torch.OpOverload) and
            torch.Tag.nondeterministic_seeded in n.target.tags and
            not n.target._schema.is_mutable]


def _fake_state(node: fx.Node) -> torch.Tensor:
    """A fake tensor like the generator state of the device ``node`` runs on."""
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    mode = _torch.detect_fake_mode([first])
    return mode.from_tensor(state) if mode is not None else state


def replay_random_ops(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Note [Replayed random ops], in place on both graphs (when
    ``config.functionalize_rng_ops``)."""
    if not config.functionalize_rng_ops:
        return
    fw_random = {n.name: n for n in _random_calls(fw_gm.graph)}
    replays = [n for n in _random_calls(bw_gm.graph) if n.name in fw_random]
    if not replays:
        return
    save_state, run_with_state = _torch.rng_replay_ops()
    fw, bw = fw_gm.graph, bw_gm.graph
    out = fw.output_node()
    values, descs = list(out.args[0]), list(out.meta[DESC])
    num_syms = 0
    while num_syms < len(values) - num_fwd_outputs and \
            _torch.is_sym_node(values[len(values) - 1 - num_syms]):
        num_syms += 1
    first_tangent = next((p for p in bw.find_nodes(op="placeholder")
                          if isinstance(p.meta.get(DESC), Tangent)), None)
    states = []
    for node in replays:
        f = fw_random[node.name]
        state_val = _fake_state(f)
        with fw.inserting_before(f):
            pair = fw.call_function(save_state, (f.target, *f.args), dict(f.kwargs))
            state = fw.call_function(operator.getitem, (pair, 0))
            value = fw.call_function(operator.getitem, (pair, 1))
        pair.meta["val"] = (state_val, f.meta.get("val"))
        state.meta["val"] = state_val
        value.meta = dict(f.meta)
        f.replace_all_uses_with(value)
        fw.erase_node(f)
        states.append(state)
        p = _saved_placeholder(bw, state.name, first_tangent)
        p.meta["val"] = state_val
        p.meta[DESC] = Saved(state.name)
        with bw.inserting_before(node):
            again = bw.call_function(run_with_state, (p, node.target, *node.args),
                                     dict(node.kwargs))
        again.meta = dict(node.meta)
        node.replace_all_uses_with(again)
        bw.erase_node(node)
    end = len(values) - num_syms
    out.args = (tuple(values[:end] + states + values[end:]),)
    out.meta[DESC] = tuple(descs[:end] + [Saved(s.name) for s in states] + descs[end:])
    fw.lint()
    bw.lint()
    fw_gm.recompile()
    bw_gm.recompile()


def _saved_placeholder(bw: fx.Graph, name: str, first_tangent: fx.Node | None) -> fx.Node:
    """A new backward input after the saved values, before the tangents."""
    if first_tangent is not None:
        where = bw.inserting_before(first_tangent)
    else:
        placeholders = bw.find_nodes(op="placeholder")
        where = bw.inserting_after(placeholders[-1]) if placeholders else \
            bw.inserting_before(next(iter(bw.nodes)))
    with where:
        return bw.placeholder(name)
