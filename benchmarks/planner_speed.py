"""How long the partitioner takes to plan a large joint graph (issue 20: a
10k-node joint planned in < 2 s on CPU).

The joint of a deep residual MLP (LayerNorm, Linear, GELU, Linear per block)
is captured once through ``aot_function``; then, per variant, the min-cut
partitioner is timed on it alone (best of ``--repeats``): no budget, the peak
budget at fractions of the plain plan's estimated peak (``memory_budget``),
and torch's own min-cut partitioner (the baseline) with no budget.

    python benchmarks/planner_speed.py [--blocks N] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

import aotgrad
from aotgrad import aot_function, min_cut_rematerialization_partition, nop


class Deep(nn.Module):
    def __init__(self, blocks: int, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d),
                                                  nn.GELU(), nn.Linear(2 * d, d))
                                    for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x.sum()


def capture_joint(blocks: int):
    model = Deep(blocks)
    params = dict(model.named_parameters())
    captured = {}

    def partition(joint_gm, joint_inputs, *, num_fwd_outputs, **kw):
        captured.update(gm=joint_gm, inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs)
        return min_cut_rematerialization_partition(joint_gm, joint_inputs,
                                                   num_fwd_outputs=num_fwd_outputs)

    def f(params, x):
        return torch.func.functional_call(model, params, (x,))

    compiled = aot_function(f, nop, partition_fn=partition)
    compiled(params, torch.randn(64, 32, requires_grad=True)).backward()
    return captured


def best_time(fn, repeats: int) -> tuple[float, str | None]:
    """The least seconds of ``repeats`` calls, and the no-fit error if any
    (the planner's search until it reports the lowest peak is timed too)."""
    best, error = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            fn()
        except ValueError as e:   # no plan fits
            error = "no fit, lowest" + str(e).split("The lowest")[-1].split("(")[0]
        best = min(best, time.perf_counter() - t0)
    return best, error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=270, help="residual blocks (270: ~10k nodes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    joint = capture_joint(args.blocks)
    gm, inputs, nfo = joint["gm"], joint["inputs"], joint["num_fwd_outputs"]
    nodes = len(gm.graph.nodes)

    def aotgrad_plan(budget):
        return lambda: min_cut_rematerialization_partition(gm, inputs, num_fwd_outputs=nfo,
                                                           memory_budget=budget)

    variants = {"aotgrad no budget": aotgrad_plan(None)}
    for b in (0.9, 0.7, 0.5):
        variants[f"aotgrad memory_budget={b}"] = aotgrad_plan(b)
    try:
        from torch._functorch.partitioners import min_cut_rematerialization_partition as theirs
        variants["torch min-cut (baseline)"] = lambda: theirs(gm, inputs, num_fwd_outputs=nfo)
    except ImportError:
        pass
    rows = []
    for name, fn in variants.items():
        seconds, error = best_time(fn, args.repeats)
        rows.append({"variant": name, "seconds": round(seconds, 3), "error": error})
    print(f"joint: {nodes} nodes ({args.blocks} blocks); best of {args.repeats}; "
          f"torch {torch.__version__}; target: < 2 s per plan\n")
    print("| variant | seconds | < 2 s | plan |\n|---|---:|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']} | {'yes' if r['seconds'] < 2 else 'NO'} | "
              f"{r['error'] or 'fits'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nodes": nodes, "blocks": args.blocks, "torch": torch.__version__,
                       "aotgrad": aotgrad.__version__ if hasattr(aotgrad, "__version__") else None,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
