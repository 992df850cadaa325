"""Saved bytes against recomputed FLOPs of aotgrad's memory budget, per budget.

The joint of ``memory.py``'s CUDA transformer (8 pre-LN blocks, d=1024, 16
heads, seq 512) at batch 1, traced on the CPU with inductor's decompositions,
partitioned by ``aotgrad.min_cut_rematerialization_partition`` at each
budget.  For each: the activation bytes the backward keeps (placeholders of
the backward graph that are neither tangents nor primals) and the FLOPs of
the matmuls it recomputes (forward nodes that reappear in the backward).
Nothing runs on a device: this is the trade-off curve the budget solver
chooses from, to set beside measured step times (RESULTS.md).

    python benchmarks/budget_curve.py [--layers 8] [--budgets 1.0 0.5 0.35 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import aotgrad  # noqa: E402
from aotgrad.partition import flops  # noqa: E402
from memory import Transformer, WithLoss  # noqa: E402


def step_flops(bw_gm, fw_gm) -> tuple[int, int]:
    """(recomputed matmul FLOPs in the backward, all matmul FLOPs of both graphs)."""
    fw_names = {n.name for n in fw_gm.graph.nodes}
    recomputed = sum(flops(n) for n in bw_gm.graph.nodes
                     if n.op == "call_function" and n.name in fw_names)
    total = sum(flops(n) for g in (fw_gm, bw_gm) for n in g.graph.nodes if n.op == "call_function")
    return recomputed, total


def measure(layers: int, budget: float) -> dict:
    from torch._inductor.decomposition import select_decomp_table

    torch.manual_seed(0)
    model = WithLoss(Transformer(layers, 1024, 16))
    x = torch.randn(1, 512, 1024)
    graphs = {}

    def compiler(name):
        def compile_(gm, example_inputs):
            graphs[name] = gm
            return aotgrad.make_boxed_func(gm.forward)
        return compile_

    with aotgrad.config.patch(activation_memory_budget=budget):
        fn = aotgrad.aot_module_simplified(
            model, [x], fw_compiler=compiler("fw"), bw_compiler=compiler("bw"),
            partition_fn=aotgrad.min_cut_rematerialization_partition,
            decompositions=select_decomp_table())
        fn(x)[0].backward()
    saved = [n.meta["val"] for n in graphs["bw"].graph.find_nodes(op="placeholder")
             if not n.name.startswith(("tangents", "primals"))
             and isinstance(n.meta.get("val"), torch.Tensor)]
    recomputed, total = step_flops(graphs["bw"], graphs["fw"])
    return {"budget": budget, "saved_bytes": sum(v.numel() * v.element_size() for v in saved),
            "recomputed_flops": recomputed, "step_flops": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.35, 0.2])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    rows = [measure(args.layers, b) for b in args.budgets]
    # the extra work: recomputed FLOPs over those of the step without them
    print(f"{'budget':>7} {'saved MB':>9} {'recomputed GFLOP':>17} {'extra':>7}")
    for r in rows:
        print(f"{r['budget']:7.2f} {r['saved_bytes'] / 1e6:9.1f} {r['recomputed_flops'] / 1e9:17.2f} "
              f"{r['recomputed_flops'] / (r['step_flops'] - r['recomputed_flops']):+7.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": args.layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
