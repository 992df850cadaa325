"""Measured peak memory against step time: aotgrad's peak budget beside torch's.

Per model, one training step (forward + ``loss.backward()``, no optimizer)
compiled through ``aot_module_simplified`` of each implementation, with the
compilers of ``memory.py`` (CUDA: inductor's ``compile_fx_inner`` and
decompositions; CPU: the graphs run as Python), at these points:

* ``eager``;
* torch (``torch._functorch``'s min-cut partitioner): no budget, and
  ``activation_memory_budget`` = 0.8 ... 0.0; its activation offloading
  (``enable_activation_offloading``, with ``activation_offload_separate_stream``
  where this torch has it) without a budget and at budget 0.5 -- "unavailable"
  where this torch has no such config;
* aotgrad (``aotgrad.min_cut_rematerialization_partition``): no budget, and
  ``aotgrad.config.memory_budget`` = 0.9 ... 0.2 (a fraction of the estimated
  peak of its plain min-cut plan; on CUDA its planner may offload saved values
  to CPU memory).  A budget no plan meets is a "no fit" point (the lowest
  estimated peak, from the error, is kept).

Models: ``memory.py``'s transformer and CNN at its sizes (float32), and a
Llama-shaped ``transformers`` model (``e2e.py``'s; 4 layers, d=1024, seq 1024,
batch 4, bfloat16 on CUDA) wrapped to return ``(loss,)`` so that it goes
through ``aot_module_simplified`` like the others.  ``--sizes small`` takes
tiny shapes (a CPU smoke test).  Each model runs in a child process of this
script (``--child MODEL``), compiling its points in a priority order and
skipping the rest past ``--compile-limit`` seconds.  With ``--parallel`` (the
default on CUDA) the children compile side by side, then time one at a time,
each alone on the device (a barrier, then a lock: ``timing_turn``).

Per point: ``peak`` -- on CUDA ``max_memory_allocated`` during one step minus
what was allocated before it (``memory.measure_peak``: activations, gradients,
temporaries), and ``step peak`` = that plus the parameters, buffers and inputs,
the quantity aotgrad estimates (Note [Peak of a step]); ``est`` / ``limit`` --
aotgrad's estimated step peak of the plan chosen and the budget in bytes
(``fw_gm.meta["aotgrad_peak_plan"]``; for its no-budget point, the plain
plan's estimate); ``step ms`` -- median step time, the points timed
round-robin (``memory.time_variants``).  On CPU there is no measured peak:
the Pareto front then uses aotgrad's estimates (torch points have none).

Targets (printed PASS/FAIL with their numbers, CUDA; on ``peak``):
T1: the lowest aotgrad peak at step time <= 1.10 x aotgrad's no-budget step is
<= 0.5 x torch's no-budget peak.  T2: the same for aotgrad points whose plan
offloads, at <= 0.7 x torch's no-budget peak and <= 1.03 x aotgrad's
no-budget step.  T3: every torch point (eager aside) is dominated by an aotgrad
point: peak <= and step time <= 1.02 x (2% for timing noise).  T4: every
aotgrad budget point's step peak is within its limit plus a slack, with two
slacks: the plain plan's own error (its measured step peak minus its
estimate, at least 0) and a fixed 5% + 64 MiB.

    python benchmarks/peak_pareto.py [--device cpu|cuda] [--models transformer cnn llama]
        [--sizes default|small] [--repeats N] [--compile-limit S] [--[no-]parallel] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import CNN, Transformer, Variant, WithLoss, _aotgrad_impl, _torch_impl, build, \
    compile_variant, eager_saved_bytes, inductor_decomps, time_variants  # noqa: E402

MODELS = ("transformer", "cnn", "llama")
TORCH_BUDGETS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
AOTGRAD_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
OFFLOAD_BUDGETS = (None, 0.5)
T1_TIME, T1_PEAK = 1.10, 0.5
T2_TIME, T2_PEAK = 1.03, 0.7
T3_NOISE = 0.02
T4_FIXED = (0.05, 64 * 2 ** 20)
MB = 1e6


# ---------------------------------------------------------------- models

class LMLoss(nn.Module):
    """A ``transformers`` causal LM returning ``(loss,)`` (its own cross entropy)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return (self.lm(input_ids=ids, labels=ids).loss,)


def build_model(name: str, device: str, small: bool) -> tuple[nn.Module, list[torch.Tensor]]:
    cuda = device == "cuda"
    if name == "llama":
        import e2e
        shape = dict(layers=2, dim=64, seq=32, batch=2, vocab=256) if small else \
            dict(layers=4, dim=1024, seq=1024, batch=4, vocab=32000)
        args = types.SimpleNamespace(device=device, dtype="bfloat16" if cuda else "float32", **shape)
        torch.manual_seed(0)
        model = LMLoss(e2e.build("llama", args)).train()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        return model, [ids]
    if not small:
        return build(name, device, torch.float32)
    torch.manual_seed(0)
    if name == "transformer":
        net, shape = Transformer(2, 64, 4), (4, 128, 64)
    elif name == "cnn":
        net, shape = CNN(channels=(8, 16, 32), blocks_per_stage=1), (8, 3, 32, 32)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model = WithLoss(net).to(device=device).train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    return model, [x]


def resident_bytes(model: nn.Module, inputs: list) -> int:
    """Parameters, buffers and inputs, each storage once: what a step's
    estimate counts beyond ``measure_peak``'s difference."""
    storages = {}
    for t in [*model.parameters(), *model.buffers(), *inputs]:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------- points

@dataclass
class Point(Variant):
    offload: bool = False           # torch's activation offloading
    est_peak: int | None = None     # aotgrad's estimated step peak of the plan chosen
    limit: int | None = None        # aotgrad's budget in bytes
    plain_est: int | None = None    # aotgrad's estimate of its plain min-cut plan
    plan: str | None = None
    offloaded_bytes: int | None = None
    no_fit_peak: int | None = None  # the lowest estimated peak a "no fit" error names
    compile_s: float | None = None
    graphs: int = 0

    @property
    def label(self) -> str:
        if self.impl == "eager":
            return "eager"
        name = f"{self.impl} {'offload' if self.offload else 'budget' if self.budget is not None else 'mincut'}"
        return name + ("" if self.budget is None else f" {self.budget:g}")


def spread(xs: tuple) -> list:
    """``xs`` reordered so that every prefix spans their range: the middle one,
    then each time the one farthest from those taken."""
    out = [xs[len(xs) // 2]]
    while len(out) < len(xs):
        out.append(max((x for x in xs if x not in out), key=lambda x: min(abs(x - y) for y in out)))
    return out


def points_for(model: str) -> list[Point]:
    """In priority order: what is compiled first survives ``--compile-limit``
    (the budgets ``spread``, so that a cut-short run still spans them)."""
    pts = [Point(model, "eager", "default", None), Point(model, "torch", "mincut", None),
           Point(model, "aotgrad", "mincut", None)]
    pts += [Point(model, "torch", "offload", b, offload=True) for b in OFFLOAD_BUDGETS]
    for a, t in itertools.zip_longest(spread(AOTGRAD_BUDGETS), spread(TORCH_BUDGETS)):
        if a is not None:
            pts.append(Point(model, "aotgrad", "budget", a))
        if t is not None:
            pts.append(Point(model, "torch", "budget", t))
    return pts


def torch_offload_ctx(budget: float | None):
    import torch._functorch.config as fc
    if not hasattr(fc, "enable_activation_offloading"):
        raise RuntimeError("unavailable: this torch has no "
                           "torch._functorch.config.enable_activation_offloading")
    patch = {"enable_activation_offloading": True}
    if hasattr(fc, "activation_offload_separate_stream"):
        patch["activation_offload_separate_stream"] = True
    if budget is not None:
        patch["activation_memory_budget"] = budget
    return fc.patch(**patch)


def compile_point(p: Point, impls: dict, model, inputs, params, inductor, decomps, cuda) -> None:
    impl = impls[p.impl]
    if p.offload:
        ctx = torch_offload_ctx(p.budget)
    elif p.budget is None:
        ctx = contextlib.nullcontext()
    elif p.impl == "aotgrad":
        ctx = impl["peak"](p.budget)
    else:
        ctx = impl["budget"](p.budget)
    base_aot = impl["aot"]

    def aot(mod, example_inputs, fw_compiler, bw_compiler, **kw):
        def fw(gm, ex):   # the plan the planner chose rides on the forward graph
            p.graphs += 1
            plan = gm.meta.get("aotgrad_peak_plan")
            if plan is not None:
                p.est_peak, p.limit, p.plain_est = plan.chosen.peak, plan.limit, plan.plain_peak
                p.plan = plan.chosen.candidate.describe()
                p.offloaded_bytes = plan.chosen.offloaded_bytes
            return fw_compiler(gm, ex)

        def bw(gm, ex):
            p.graphs += 1
            return bw_compiler(gm, ex)
        return base_aot(mod, example_inputs, fw_compiler=fw, bw_compiler=bw, **kw)

    # memory.compile_variant applies no config itself here: ``ctx`` does, around it
    wrapped = {**impl, "aot": aot, "budget": lambda b: contextlib.nullcontext()}
    with ctx:
        compile_variant(p, wrapped, model, inputs, params, inductor, decomps, cuda)


@contextlib.contextmanager
def timing_turn(sync_dir: str | None, name: str, peers: int):
    """With children compiling side by side (``--parallel``): wait until all
    have compiled, then time alone (a lock), so that no compile competes."""
    if sync_dir is None:
        yield
        return
    open(os.path.join(sync_dir, f"{name}.compiled"), "w").close()
    while sum(f.endswith(".compiled") for f in os.listdir(sync_dir)) < peers:
        time.sleep(0.5)
    with open(os.path.join(sync_dir, "timing.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_child(name: str, device: str, small: bool, repeats: int, compile_limit: float,
              sync_dir: str | None = None, peers: int = 1) -> dict:
    cuda = device == "cuda"
    inductor = cuda
    model, inputs = build_model(name, device, small)
    params = list(model.parameters())
    decomps = inductor_decomps() if inductor else None
    impls = {"aotgrad": _aotgrad_impl(), "torch": _torch_impl()}
    pts = points_for(name)
    start = time.perf_counter()
    for p in pts:
        if p.impl == "eager":
            p.fn = model
            p.saved_bytes = eager_saved_bytes(model, inputs, params)
            continue
        if time.perf_counter() - start > compile_limit:
            p.error = f"skipped: past --compile-limit {compile_limit:g}s"
            continue
        t0 = time.perf_counter()
        try:
            compile_point(p, impls, model, inputs, params, inductor, decomps, cuda)
        except Exception as e:  # noqa: BLE001 - recorded on the point
            m = re.search(r"lowest estimated peak of this training step is [^(]*\((\d+) bytes", str(e))
            if isinstance(e, ValueError) and m:
                p.no_fit_peak = int(m.group(1))
                p.error = f"no fit (lowest estimate {p.no_fit_peak / MB:.1f} MB)"
                p.fn = None
            elif str(e).startswith("unavailable"):
                p.error, p.fn = str(e), None
            else:
                p.fail("compile", e)
                if not isinstance(e, (RuntimeError, AssertionError, NotImplementedError, TypeError)):
                    traceback.print_exc()
        p.compile_s = time.perf_counter() - t0
        print(f"  {name} {p.label}: {p.compile_s:.1f}s, {p.graphs} graphs"
              + (f"  [{p.error}]" if p.error else ""), file=sys.stderr, flush=True)
    compile_total = time.perf_counter() - start
    with timing_turn(sync_dir, name, peers):
        t0 = time.perf_counter()
        time_variants(pts, inputs, params, cuda, repeats)
        timing_s = time.perf_counter() - t0
    plain = next((p.plain_est for p in pts if p.plain_est is not None), None)
    for p in pts:
        if p.impl == "aotgrad" and p.budget is None:
            p.est_peak = plain   # the no-budget plan is the plain min-cut plan
    for p in pts:
        p.fn = None
    resident = resident_bytes(model, inputs)
    rows = []
    for p in pts:
        row = {k: getattr(p, k) for k in ("model", "impl", "budget", "offload", "est_peak", "limit",
                                           "plain_est", "plan", "offloaded_bytes", "no_fit_peak",
                                           "compile_s", "graphs", "saved_bytes", "error")}
        row["label"] = p.label
        row["step_ms"] = statistics.median(p.times) if p.times else None
        row["peak_bytes"] = p.peak_bytes
        row["step_peak_bytes"] = None if p.peak_bytes is None else p.peak_bytes + resident
        rows.append(row)
    return {"model": name, "resident_bytes": resident, "compile_s": compile_total,
            "timing_s": timing_s, "graphs": sum(p.graphs for p in pts), "rows": rows}


# ---------------------------------------------------------------- report

def peak_of(r: dict, cuda: bool) -> float | None:
    """The peak the front and the targets use: measured on CUDA, else aotgrad's estimate."""
    if r["step_ms"] is None:
        return None
    return r["peak_bytes"] if cuda else r["est_peak"]


def pareto(rows: list[dict], cuda: bool) -> set[str]:
    pts = [(peak_of(r, cuda), r["step_ms"], r["label"]) for r in rows]
    pts = [p for p in pts if p[0] is not None]
    return {lab for pk, t, lab in pts
            if not any(pk2 <= pk and t2 <= t and (pk2 < pk or t2 < t) for pk2, t2, _ in pts)}


def print_model(res: dict, cuda: bool) -> None:
    rows = res["rows"]
    front = pareto(rows, cuda)

    def mb(x):
        return "-" if x is None else f"{x / MB:.1f}"

    def key(r):
        pk = peak_of(r, cuda)
        return (pk is None, pk or 0, r["step_ms"] or 0)
    print(f"\n{res['model']} (done at {res.get('wall_s', 0):.0f}s): parameters+buffers+inputs "
          f"{mb(res['resident_bytes'])} MB; compile "
          f"{res['compile_s']:.0f}s ({res['graphs']} graphs), timing {res['timing_s']:.0f}s; "
          f"* = Pareto front ({'measured peak' if cuda else 'estimated peak'} vs step ms)")
    cols = (f"  {'point':<22} {'peak MB':>8} {'step pk MB':>10} {'est MB':>8} {'limit MB':>8} "
            f"{'meas/est':>8} {'step ms':>8} {'saved MB':>8}  plan")
    print(cols)
    print("  " + "-" * (len(cols) + 20))
    for r in sorted(rows, key=key):
        ratio = "" if r["step_peak_bytes"] is None or not r["est_peak"] else \
            f"{r['step_peak_bytes'] / r['est_peak']:.2f}"
        ms = "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        mark = "*" if r["label"] in front else " "
        tail = r["plan"] or ""
        if r["offloaded_bytes"]:
            tail += f" ({mb(r['offloaded_bytes'])} MB out)"
        if r["error"]:
            tail += f" [{r['error'][:90]}]"
        print(f"{mark} {r['label']:<22} {mb(r['peak_bytes']):>8} {mb(r['step_peak_bytes']):>10} "
              f"{mb(r['est_peak']):>8} {mb(r['limit']):>8} {ratio:>8} {ms:>8} "
              f"{mb(r['saved_bytes']):>8}  {tail}")


def targets(res: dict, cuda: bool) -> list[dict]:
    """T1-T4 of the module docstring: ``{"name", "status", "detail"}``."""
    rows = [r for r in res["rows"] if r["step_ms"] is not None]
    by = {r["label"]: r for r in rows}
    tb, ab = by.get("torch mincut"), by.get("aotgrad mincut")
    out = []

    def add(name, status, detail):
        out.append({"model": res["model"], "name": name, "status": status, "detail": detail})

    def mb(x):
        return f"{x / MB:.1f} MB"
    aot = [r for r in rows if r["impl"] == "aotgrad"]
    torch_pk = tb and peak_of(tb, cuda)
    for name, pool, tf, pf in (
            ("T1", aot, T1_TIME, T1_PEAK),
            ("T2", [r for r in aot if r["offloaded_bytes"]], T2_TIME, T2_PEAK)):
        if not ab or not torch_pk:
            add(name, "n/a", "needs measured peaks and both no-budget points")
            continue
        pool = [r for r in pool if peak_of(r, cuda) is not None]
        ok = [r for r in pool if r["step_ms"] <= tf * ab["step_ms"]]
        if not ok:
            near = min(pool, key=lambda r: r["step_ms"], default=None)
            add(name, "FAIL", f"no aotgrad point{' that offloads' if name == 'T2' else ''} at step "
                f"<= {tf:.2f} x {ab['step_ms']:.1f} ms" + ("" if near is None else
                f"; the fastest, {near['label']}: peak {mb(peak_of(near, cuda))} "
                f"({peak_of(near, cuda) / torch_pk:.2f} x torch), step {near['step_ms']:.1f} ms "
                f"({near['step_ms'] / ab['step_ms']:.2f} x)"))
            continue
        best = min(ok, key=lambda r: peak_of(r, cuda))
        goal = pf * torch_pk
        add(name, "PASS" if peak_of(best, cuda) <= goal else "FAIL",
            f"{best['label']}: peak {mb(peak_of(best, cuda))} "
            f"({peak_of(best, cuda) / torch_pk:.2f} x torch no-budget {mb(torch_pk)}; goal "
            f"<= {pf:.2f} x = {mb(goal)}), step {best['step_ms']:.1f} ms "
            f"({best['step_ms'] / ab['step_ms']:.2f} x aotgrad no-budget; allowed {tf:.2f} x)")
    if not cuda:
        add("T3", "n/a", "torch points have no peak on CPU")
        add("T4", "n/a", "no measured peak on CPU")
        return out
    misses, checked = [], 0
    for t in rows:
        if t["impl"] != "torch" or t["peak_bytes"] is None:
            continue
        checked += 1
        if not any(a["peak_bytes"] is not None and a["peak_bytes"] <= t["peak_bytes"]
                   and a["step_ms"] <= (1 + T3_NOISE) * t["step_ms"] for a in aot):
            misses.append(f"{t['label']} ({mb(t['peak_bytes'])}, {t['step_ms']:.1f} ms)")
    add("T3", "PASS" if checked and not misses else "FAIL" if misses else "n/a",
        f"{checked - len(misses)}/{checked} torch points dominated (time noise {T3_NOISE:.0%})"
        + (f"; not: {', '.join(misses)}" if misses else ""))
    cal = max(0, ab["step_peak_bytes"] - ab["est_peak"]) if ab and ab["est_peak"] and \
        ab["step_peak_bytes"] is not None else None
    lines, fail_cal, fail_fixed, n = [], 0, 0, 0
    for r in aot:
        if r["budget"] is None or r["limit"] is None or r["step_peak_bytes"] is None:
            continue
        n += 1
        fixed = T4_FIXED[0] * r["limit"] + T4_FIXED[1]
        over = r["step_peak_bytes"] - r["limit"]
        fail_fixed += over > fixed
        fail_cal += cal is not None and over > cal
        lines.append(f"{r['budget']:g}: {r['step_peak_bytes'] / r['limit']:.2f} "
                     f"({r['step_peak_bytes'] / r['est_peak']:.2f})")
    if not n:
        add("T4", "n/a", "no aotgrad budget point with a measured peak")
    else:
        add("T4", "PASS" if not fail_fixed else "FAIL",
            f"measured step peak / limit (/ estimate) per budget: {', '.join(lines)}; slack 5% + 64 MiB: "
            f"{n - fail_fixed}/{n} within; slack plain-plan error "
            + ("-" if cal is None else f"{mb(cal)}: {n - fail_cal}/{n} within"))
    return out


# ---------------------------------------------------------------- driver

def child_cmd(args, model: str, out: str, sync_dir: str | None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, "--out", out,
           "--device", args.device, "--sizes", args.sizes, "--repeats", str(args.repeats),
           "--compile-limit", str(args.compile_limit)]
    if sync_dir is not None:
        cmd += ["--sync-dir", sync_dir, "--peers", str(len(args.models))]
    return cmd


def run_children(args):
    """One child per model: one after another, or (``--parallel``) all at once,
    compiling side by side and then timing one at a time (``timing_turn``).
    Yields each model's result as its child ends."""
    with tempfile.TemporaryDirectory(prefix="peak-pareto-") as tmp:
        sync_dir = tmp if args.parallel else None
        env = dict(os.environ)
        if args.parallel:   # the children share the host's cores for Triton's compile workers
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS",
                           str(max(1, (os.cpu_count() or 1) // len(args.models))))
        start = time.perf_counter()
        pending = {}
        for m in args.models:
            out = os.path.join(tmp, f"{m}.json")
            pending[m] = (subprocess.Popen(child_cmd(args, m, out, sync_dir), env=env), out)
            if not args.parallel:
                pending[m][0].wait()
        while pending:
            time.sleep(0.2)
            for m, (proc, out) in list(pending.items()):
                if proc.poll() is None:
                    continue
                del pending[m]
                if sync_dir is not None:   # a dead child must not hold the others up
                    open(os.path.join(sync_dir, f"{m}.compiled"), "a").close()
                if proc.returncode != 0 or not os.path.exists(out):
                    print(f"{m}: child failed (exit {proc.returncode})", flush=True)
                    yield {"model": m, "error": f"child exit {proc.returncode}"}
                    continue
                with open(out) as f:
                    res = json.load(f)
                res["wall_s"] = time.perf_counter() - start
                yield res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--sizes", choices=("default", "small"), default="default")
    ap.add_argument("--repeats", type=int, help="timed steps per point (default 20 on CUDA, 5 on CPU)")
    ap.add_argument("--compile-limit", type=float, default=240.0,
                    help="seconds of compiling per model after which its remaining points are "
                         "skipped (default 240)")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the models' children side by side, then time them one at a "
                         "time (default: on CUDA)")
    ap.add_argument("--json", help="write the points and targets here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--sync-dir", help=argparse.SUPPRESS)
    ap.add_argument("--peers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    args.repeats = args.repeats or (20 if cuda else 5)
    if args.child:
        res = run_child(args.child, args.device, args.sizes == "small", args.repeats,
                        args.compile_limit, args.sync_dir, args.peers)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return
    args.parallel = cuda if args.parallel is None else args.parallel
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    results, checks = [], []
    for res in run_children(args):   # printed (and written) as each model ends
        results.append(res)
        if "rows" in res:
            print_model(res, cuda)
            new = targets(res, cuda)
            checks += new
            for c in new:
                print(f"  {c['name']} {c['status']:<4} {c['detail']}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": args.device, "device_name": device_name,
                           "torch_version": torch.__version__, "sizes": args.sizes,
                           "argv": sys.argv[1:], "date": datetime.datetime.now(
                               datetime.timezone.utc).isoformat(timespec="seconds"),
                           "models": results, "targets": checks}, f, indent=1)
    print(f"\n{args.device} ({device_name}), torch {torch.__version__}, sizes {args.sizes}, "
          f"median of {args.repeats} steps, children {'in parallel' if args.parallel else 'in turn'}; "
          "targets: " + ", ".join(f"{c['model']} {c['name']} {c['status']}" for c in checks))

if __name__ == "__main__":
    main()
