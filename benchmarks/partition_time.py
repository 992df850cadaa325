"""Partitioner time on a deep joint graph: aotgrad vs PyTorch's own AOTAutograd.

The joint forward+backward graph of the transformer of ``memory.py`` (CPU
sizes: d_model 256, 4 heads, seq 128, batch 8) with ``--layers`` blocks is
traced once per implementation, through its ``aot_module_simplified`` with nop
compilers.  A ``partition_fn`` wrapper receives the joint graph and, in place,
times only the partitioner call — ``default_partition``,
``min_cut_rematerialization_partition``, and min-cut under
``activation_memory_budget=0.5`` (torch: ``torch._functorch.config``; aotgrad:
``aotgrad.config``) and, aotgrad only, under ``memory_budget=0.7`` (a peak
budget: Note [Peak budget]; the error when no plan fits is timed too) — each ``--repeat`` times on a fresh ``copy.deepcopy`` of
the joint graph (the copy is not timed), and reports the median.  ``nodes`` is
the number of call_function nodes of the joint graph.

    python benchmarks/partition_time.py [--json PATH] [--layers 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import Transformer, WithLoss, _aotgrad_impl, _torch_impl

PARTITIONERS = ("default", "mincut", "budget", "peak")
BUDGET = 0.5
PEAK_BUDGET = 0.7   # aotgrad's memory_budget: 0.7 of the plain plan's estimated peak


def time_partitioners(impl: dict, layers: int, repeat: int) -> tuple[int, dict[str, float | str]]:
    torch.manual_seed(0)
    model = WithLoss(Transformer(layers, 256, 4)).train()
    x = torch.randn(8, 128, 256)
    result: dict[str, float | str] = {}
    nodes = [0]

    def wrapper(joint_gm, joint_inputs, **kwargs):
        nodes[0] = sum(1 for n in joint_gm.graph.nodes if n.op == "call_function")
        pristine = copy.deepcopy(joint_gm)
        for name in PARTITIONERS:
            fn = impl["default"] if name == "default" else impl["mincut"]
            samples = []
            if name not in impl and name != "default":
                result[name] = "n.a.: no such budget"
                print(f"  {name}: {result[name]}", flush=True)
                continue
            try:
                for _ in range(repeat):
                    gm = copy.deepcopy(pristine)
                    if name in ("budget", "peak"):
                        with impl[name](BUDGET if name == "budget" else PEAK_BUDGET):
                            t0 = time.perf_counter()
                            fn(gm, joint_inputs, **kwargs)
                            samples.append(time.perf_counter() - t0)
                    else:
                        t0 = time.perf_counter()
                        fn(gm, joint_inputs, **kwargs)
                        samples.append(time.perf_counter() - t0)
                result[name] = statistics.median(samples)
            except Exception as e:  # noqa: BLE001
                result[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            shown = f"{result[name]:.3f}s" if isinstance(result[name], float) else result[name]
            print(f"  {name}: {shown}", flush=True)
        return impl["default"](joint_gm, joint_inputs, **kwargs)

    def nop(gm, _example_inputs):
        return impl["boxed"](gm.forward)

    impl["aot"](model, [x], fw_compiler=nop, bw_compiler=nop, partition_fn=wrapper)
    return nodes[0], result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3, help="partition calls per row (median)")
    args = ap.parse_args()
    # copy.deepcopy of torch's pytree specs warns (torch-internal)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")

    rows = []
    for impl_name, make in (("torch", _torch_impl), ("aotgrad", _aotgrad_impl)):
        print(f"{impl_name}:", flush=True)
        try:
            t0 = time.perf_counter()
            nodes, result = time_partitioners(make(), args.layers, args.repeat)
            print(f"  (trace + timing: {time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            nodes, result = None, {p: f"{type(e).__name__}: {e}".splitlines()[0][:300] for p in PARTITIONERS}
        for p in PARTITIONERS:
            row = {"impl": impl_name, "partitioner": p, "nodes": nodes,
                   "seconds": result.get(p) if isinstance(result.get(p), float) else None}
            if isinstance(result.get(p), str):
                row["error"] = result[p]
            rows.append(row)

    seconds = {(r["impl"], r["partitioner"]): r["seconds"] for r in rows}
    print()
    print(f"partitioner time (median of {args.repeat}, s), {args.layers}-layer transformer joint graph, "
          f"torch {torch.__version__}; a/t = aotgrad/torch")
    print(f"{'impl':<8} {'partitioner':<11} {'nodes':>7} {'seconds':>9} {'a/t':>6}")
    for r in rows:
        s = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
        ratio = ""
        t = seconds.get(("torch", r["partitioner"]))
        if r["impl"] == "aotgrad" and r["seconds"] is not None and t:
            ratio = f"{r['seconds'] / t:.2f}"
        line = f"{r['impl']:<8} {r['partitioner']:<11} {r['nodes'] if r['nodes'] is not None else '-':>7} {s:>9} {ratio:>6}"
        if "error" in r:
            line += f"  ERROR {r['error']}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_version": torch.__version__, "layers": args.layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
