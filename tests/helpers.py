"""Shared test helpers: compile, run against eager, compare everything."""

from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

import aotgrad


class GraphRecorder:
    """A compiler that records the graphs it is given and runs them as Python."""

    def __init__(self):
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": [],
                                                             "inference": []}

    def __call__(self, gm, example_inputs):
        kind = aotgrad.get_aot_compilation_context()[0][0].split("_", 1)[1]  # "0_forward"
        self.graphs[kind].append(gm)
        return gm

    def last(self, kind: str) -> torch.fx.GraphModule:
        return self.graphs[kind][-1]


def clone_inputs(args):
    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(x.requires_grad)
        return x
    return pytree.tree_map(clone, args)


def _loss(out):
    leaves = [o for o in pytree.tree_leaves(out)
              if isinstance(o, torch.Tensor) and o.requires_grad]
    if not leaves:
        return None
    return sum((o.float().sum() if o.is_floating_point() else o.abs().sum()).real
               for o in leaves)


def run_and_grads(fn, args):
    out = fn(*args)
    loss = _loss(out)
    grads = None
    inputs = [x for x in pytree.tree_leaves(args)
              if isinstance(x, torch.Tensor) and x.requires_grad]
    if loss is not None and inputs:
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out, grads


def assert_same_as_eager(testcase, fn, args, compiled=None, **aot_kwargs):
    """Compile ``fn`` (nop compilers unless given) and compare with eager on
    outputs, gradients, requires_grad and is_leaf."""
    if compiled is None:
        aot_kwargs.setdefault("fw_compiler", aotgrad.nop)
        compiled = aotgrad.aot_function(fn, **aot_kwargs)
    ref_args, test_args = clone_inputs(args), clone_inputs(args)
    ref_out, ref_grads = run_and_grads(fn, ref_args)
    test_out, test_grads = run_and_grads(compiled, test_args)
    ref_leaves, ref_spec = pytree.tree_flatten(ref_out)
    test_leaves, test_spec = pytree.tree_flatten(test_out)
    testcase.assertEqual(ref_spec, test_spec)
    for r, t in zip(ref_leaves, test_leaves):
        testcase.assertEqual(type(r), type(t))
        if isinstance(r, torch.Tensor):
            testcase.assertEqual(r.requires_grad, t.requires_grad)
            testcase.assertEqual(r.is_leaf, t.is_leaf)
            torch.testing.assert_close(t, r)
        else:
            testcase.assertEqual(r, t)
    testcase.assertEqual(ref_grads is None, test_grads is None)
    if ref_grads is not None:
        for r, t in zip(ref_grads, test_grads):
            testcase.assertEqual(r is None, t is None)
            if r is not None:
                torch.testing.assert_close(t, r)
    return compiled, test_out


def module_grads(mod):
    return [None if p.grad is None else p.grad.clone() for p in mod.parameters()]


def copy_module(mod):
    return copy.deepcopy(mod)


def tiny_llama():
    """A 2-layer transformers LlamaForCausalLM (hidden 32, vocab 64), token ids
    (2, 8), and the model through ``aot_module(model, nop)``."""
    import transformers

    import aotgrad

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    return model, ids, aotgrad.aot_module(model, aotgrad.nop)


def run_ranks(worker, world: int, *args) -> list[dict]:
    """Run ``worker(rank, port, *args, queue)`` in ``world`` spawned processes
    (a rendezvous port on 127.0.0.1); each puts one report dict on the queue,
    with an ``"error"`` key if it failed.  The reports, by rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = [queue.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for report in reports:
        assert "error" not in report, report.get("error")
    return sorted(reports, key=lambda r: r.get("rank", 0))
