"""Per-call overhead: aotgrad vs PyTorch's own AOTAutograd vs eager.

Tiny programs (a few ops on 8 floats) so that the time is the framework's,
not the kernels'.  Both compilers use ``nop`` (the graphs run as Python), so
the difference is the runtime around the graphs.  Cases:

* ``fwbw``: ``(a * b).sin().sum()`` forward + ``.backward()``;
* ``inference``: the same call under ``no_grad``;
* ``mutation``: ``buf.add_(1); (buf * w).sum()`` forward + backward (the
  mutated input is written back by the runtime);
* ``view``: ``x.view(-1)`` of an input that requires grad (forward only: the
  runtime rebuilds the view);
* ``many``: 20 inputs, 20 outputs ``x * 2``, forward + backward of all;
* ``linear``: ``nn.Linear(8, 8)`` through ``aot_module``, forward + backward.

For the forward+backward cases the *floor* is a hand-written
``torch.autograd.Function`` doing the same forward and backward: what any
wrapper around a compiled forward and backward must at least pay.  For the
module case it is called from a module's ``forward`` (``LinearFloorModule``),
as eager's and the compiled module's calls go through ``nn.Module.__call__``.

Each implementation runs ``--inner`` calls per sample; samples of all
implementations are interleaved (round robin, ``--rounds`` rounds) and the
median per call is reported, in microseconds, with one thread.

    python benchmarks/overhead.py [--json PATH] [--rounds N] [--cases a,b]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import aotgrad


# ---------------------------------------------------------------- programs and floors

def tiny(a, b):
    return (a * b).sin().sum()


class TinyFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a * b).sin().sum()

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        c = (a * b).cos() * g
        return c * b, c * a


def mutate(buf, w):
    buf.add_(1)
    return (buf * w).sum()


class MutateFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, w):
        buf.add_(1)
        ctx.save_for_backward(buf)
        return (buf * w).sum()

    @staticmethod
    def backward(ctx, g):
        buf, = ctx.saved_tensors
        return None, buf * g


def view(x):
    return x.view(-1)


def many(*xs):
    return [x * 2 for x in xs]


class ManyFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):
        return tuple(x * 2 for x in xs)

    @staticmethod
    def backward(ctx, *gs):
        return tuple(g * 2 for g in gs)


class LinearFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x, g.sum(0)


class LinearFloorModule(nn.Linear):
    def forward(self, x):
        return LinearFloor.apply(x, self.weight, self.bias)


# ---------------------------------------------------------------- cases

def cases(torch_aot_function, torch_aot_module, torch_nop) -> dict[str, dict[str, Callable]]:
    """Per case, per implementation, a no-argument function doing one call."""
    def both(fn):
        return torch_aot_function(fn, torch_nop), aotgrad.aot_function(fn, aotgrad.nop)

    a = torch.randn(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = {}

    t, g = both(tiny)
    out["fwbw"] = {name: (lambda f=f: f(a, b).backward()) for name, f in
                   [("eager", tiny), ("torch", t), ("aotgrad", g), ("floor", TinyFloor.apply)]}

    def infer(f):
        def call():
            with torch.no_grad():
                f(a, b)
        return call
    out["inference"] = {"eager": infer(tiny), "torch": infer(t), "aotgrad": infer(g)}

    buf = torch.zeros(8)
    w = torch.randn(8, requires_grad=True)
    t, g = both(mutate)
    out["mutation"] = {name: (lambda f=f: f(buf, w).backward()) for name, f in
                       [("eager", mutate), ("torch", t), ("aotgrad", g),
                        ("floor", MutateFloor.apply)]}

    x = torch.randn(2, 4, requires_grad=True)
    t, g = both(view)
    out["view"] = {name: (lambda f=f: f(x)) for name, f in
                   [("eager", view), ("torch", t), ("aotgrad", g)]}

    xs = [torch.randn(8, requires_grad=True) for _ in range(20)]
    grads = [torch.ones(8) for _ in range(20)]
    t, g = both(many)

    def many_call(f):
        return lambda: torch.autograd.backward(f(*xs), grads)
    out["many"] = {name: many_call(f) for name, f in
                   [("eager", many), ("torch", t), ("aotgrad", g), ("floor", ManyFloor.apply)]}

    lin = nn.Linear(8, 8)
    xl = torch.randn(4, 8)
    compiled = {"eager": lin, "torch": torch_aot_module(lin, torch_nop),
                "aotgrad": aotgrad.aot_module(lin, aotgrad.nop)}
    out["linear"] = {name: (lambda m=m: m(xl).sum().backward()) for name, m in compiled.items()}
    floor = LinearFloorModule(8, 8)
    out["linear"]["floor"] = lambda: floor(xl).sum().backward()
    return out


def sample_us(fn: Callable, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e6


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--rounds", type=int, default=15, help="samples per implementation")
    ap.add_argument("--inner", type=int, default=200, help="calls per sample")
    ap.add_argument("--cases", help="comma-separated subset of the cases")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from functorch.compile import aot_function, aot_module, nop  # the baseline

    all_cases = cases(aot_function, aot_module, nop)
    chosen = args.cases.split(",") if args.cases else list(all_cases)
    rows = []
    for case in chosen:
        impls = all_cases[case]
        for fn in impls.values():  # compile, warm up
            for _ in range(20):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                samples[name].append(sample_us(fn, args.inner))
        med = {name: statistics.median(s) for name, s in samples.items()}
        rows.append({"case": case, "eager_us": med["eager"], "torch_us": med["torch"],
                     "aotgrad_us": med["aotgrad"], "floor_us": med.get("floor")})

    print(f"per-call time, median of {args.rounds} samples x {args.inner} calls (us); "
          f"torch {torch.__version__}, 1 thread, {machine()}")
    head = ("case", "eager", "floor", "torch", "aotgrad", "torch-eager", "aotgrad-eager",
            "ratio", "aotgrad-floor")
    print(f"{head[0]:<10}" + "".join(f"{h:>14}" for h in head[1:]))
    for r in rows:
        t_over, a_over = r["torch_us"] - r["eager_us"], r["aotgrad_us"] - r["eager_us"]
        floor = r["floor_us"]
        cells = [r["eager_us"], floor, r["torch_us"], r["aotgrad_us"], t_over, a_over]
        text = "".join(f"{c:>14.1f}" if c is not None else f"{'-':>14}" for c in cells)
        text += f"{a_over / t_over:>14.3f}" if t_over > 0 else f"{'-':>14}"
        text += f"{r['aotgrad_us'] - floor:>14.1f}" if floor is not None else f"{'-':>14}"
        print(f"{r['case']:<10}" + text)
    print("ratio: (aotgrad - eager) / (torch - eager); target <= 0.125, and aotgrad - floor "
          "<= 5 us for the forward+backward cases")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "machine": machine(), "rounds": args.rounds,
                       "inner": args.inner, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
