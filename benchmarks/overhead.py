"""Per-call overhead: aotgrad vs PyTorch's own AOTAutograd vs eager.

A tiny program (a few pointwise ops on 8 floats) so that the time is the
framework's, not the kernels'.  Both compilers use `nop` (the graph runs as
Python), so the difference is the runtime wrapper.  Rows: training call
(forward + backward) and inference call (no_grad), median microseconds per
call over repeated runs, and the overhead over eager.

    python benchmarks/overhead.py [--json PATH] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aotgrad


def program(x, w):
    return ((x * w).sin() + x).sum()


def median_us(fn, repeat: int, inner: int = 200) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from functorch.compile import aot_function as torch_aot_function  # the baseline
    from functorch.compile import nop as torch_nop

    x = torch.randn(8)
    w = torch.randn(8, requires_grad=True)
    impls = {
        "eager": program,
        "torch": torch_aot_function(program, torch_nop),
        "aotgrad": aotgrad.aot_function(program, aotgrad.nop),
    }
    rows = []
    for name, fn in impls.items():
        def train(fn=fn):
            fn(x, w).backward()

        def infer(fn=fn):
            with torch.no_grad():
                fn(x, w)

        rows.append({"impl": name, "mode": "train", "us_per_call": median_us(train, args.repeat)})
        rows.append({"impl": name, "mode": "inference", "us_per_call": median_us(infer, args.repeat)})
    eager = {r["mode"]: r["us_per_call"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["overhead_us"] = r["us_per_call"] - eager[r["mode"]]

    print(f"per-call time (median, us), torch {torch.__version__}, 1 thread")
    print(f"{'impl':<9} {'mode':<10} {'us/call':>9} {'over eager':>11}")
    for r in rows:
        print(f"{r['impl']:<9} {r['mode']:<10} {r['us_per_call']:>9.1f} {r['overhead_us']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
