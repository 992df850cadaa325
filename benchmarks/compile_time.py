"""First-call (compile) time: aotgrad vs PyTorch's own AOTAutograd, cold and warm.

Models: ``memory.py``'s CPU builders (each returns ``(loss,)``) — the 8-layer
pre-LN transformer (d=256, 4 heads, seq 128, batch 8), the MLP (6 x
Linear(1024), batch 256), the small ResNet-style CNN (batch 16, 64x64);
partitioners ``default`` and ``mincut`` (``min_cut_rematerialization_partition``).

Every sample is a *fresh process* (``--child``).  The child imports, builds the
model (seed 0) and its input, *then* starts ``perf_counter``: imports and model
construction are not counted.  ``PREIMPORT`` is imported first in every child:
``FakeTensorMode()`` imports all of ``torch._dynamo`` (~1 s; ``functorch.compile``
does at import) and torch's min-cut and cache import inductor lazily (~1.2 s);
else those imports land in one side's first call only.  The timed region is the
first call only: compile + one forward + ``backward()`` (real compute included).
The input is cut to one sample (the transformer's to 16 tokens) unless
``--full-inputs``: with static shapes tracing does not depend on sizes, so
the first call then measures the compile, not the step (one full-size
step on this CPU takes about 0.27 s for the transformer, 0.40 s for the CNN).

* ``cold``: ``aot_module(model, nop, partition_fn=...)`` called once (torch:
  ``functorch.compile``; aotgrad: ``aotgrad.aot_module``).  Neither
  ``aot_module`` consults a cache.
* ``warm``: a start from each implementation's on-disk AOTAutogradCache.  Both
  caches work only through ``aot_module_simplified`` on an ``fx.GraphModule``
  (the key hashes the graph), as under ``torch.compile``.  So the child (untimed)
  ``fx.symbolic_trace``s the model and gives nodes ``example_value`` meta as
  dynamo does (else torch bypasses on ``call_method`` nodes), fakes the input
  (``FakeTensorMode`` with a ``ShapeEnv``, static shapes); then (timed) calls
  ``aot_module_simplified`` inside a ``TracingContext`` of that mode (torch's
  caches bypass without one: "No shape env") and runs forward+backward on the
  real input.  One process per (model, partitioner, implementation) first fills
  a fresh folder (``*_populate_s``: the miss, one sample); timed processes load it.
  torch: ``torch._functorch.config`` ``enable_autograd_cache`` and
  ``bundled_autograd_cache``, ``TORCHINDUCTOR_CACHE_DIR`` = folder/torch,
  compilers ``SerializableAOTDispatchCompiler(OutputCode, boxed_nop)`` — its cache
  takes only serializable compilers (``aot_eager``'s nop returns a picklable
  ``AOTEagerOutputCode`` when bundling); a plain ``nop`` is never cached.  torch
  2.13 counts one ``autograd_cache_bypass`` after each hit (its time-saved
  bookkeeping fails on that output code) but does use the loaded graphs.
  aotgrad: ``aotgrad.config`` ``enable_autograd_cache``, ``cache_dir`` =
  folder/aotgrad, compilers ``aotgrad.nop``.  Hits are read from
  ``torch._dynamo.utils.counters["aot_autograd"]`` (both caches count there).

* ``floor`` (cold rows only, ``floor_s``; one per model, shown on both
  partitioners' rows): what any tracer over fake tensors pays on a first call
  at the least, in the same kind of fresh process: fake the parameters,
  buffers and input in a fresh ``FakeTensorMode`` (no ShapeEnv, as both
  implementations' static tracing), run the module forward and
  ``autograd.grad`` over the parameters under it with the Python dispatcher
  (recording nothing, partitioning nothing), then one real forward +
  ``backward()``.  Each op's first fake dispatch in a process runs its meta
  function in Python (a fake-tensor cache miss); both implementations pay
  that, so ``floor/torch`` bounds the best ``aotgrad/torch`` a fake-tensor
  tracer can reach.

Cells are medians of ``--runs`` samples; torch, aotgrad (and floor) samples alternate.

    python benchmarks/compile_time.py [--json PATH] [--runs 5] [--models ...] [--modes cold warm]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("transformer", "mlp", "cnn")
PARTITIONERS = ("default", "mincut")
IMPLS = ("torch", "aotgrad")
HERE = os.path.dirname(os.path.abspath(__file__))
#: imported before timing in every child (see the module docstring)
PREIMPORT = ("torch._dynamo", "torch._inductor.compile_fx")


# ---------------------------------------------------------------- child (one sample)

def _partition_fn(impl: str, name: str):
    if impl == "torch":
        from functorch.compile import (
            default_partition,
            min_cut_rematerialization_partition,
        )
    else:
        from aotgrad import default_partition, min_cut_rematerialization_partition
    return default_partition if name == "default" else min_cut_rematerialization_partition


def _cold(impl: str, partition_fn, model, x) -> tuple[float, dict]:
    if impl == "torch":
        from functorch.compile import aot_module, nop
    else:
        from aotgrad import aot_module, nop
    t0 = time.perf_counter()
    compiled = aot_module(model, nop, partition_fn=partition_fn)
    compiled(x)[0].backward()
    seconds = time.perf_counter() - t0
    report = getattr(getattr(compiled, "_compiled", None), "last_report", None)
    return seconds, {"stages": dict(report.stage_seconds)} if report is not None else {}


def _warm(impl: str, partition_fn, model, x, cache_dir: str) -> tuple[float, dict]:
    from torch import fx
    from torch._dynamo.utils import counters
    from torch._guards import TracingContext, tracing
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    for node in gm.graph.nodes:  # as dynamo leaves them
        if "val" in node.meta:
            node.meta["example_value"] = node.meta.pop("val")
    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    fake_x = mode.from_tensor(x)
    if impl == "torch":
        import torch._functorch.config as functorch_config
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._functorch.aot_autograd import (
            SerializableAOTDispatchCompiler,
            aot_module_simplified,
        )
        from torch._inductor.output_code import OutputCode
        compiler = SerializableAOTDispatchCompiler(OutputCode, boxed_nop)
        patch = functorch_config.patch(enable_autograd_cache=True, bundled_autograd_cache=True)
    else:
        import aotgrad
        from aotgrad import aot_module_simplified
        compiler = aotgrad.nop
        patch = aotgrad.config.patch(enable_autograd_cache=True,
                                     cache_dir=os.path.join(cache_dir, "aotgrad"))
    with patch:
        t0 = time.perf_counter()
        with tracing(TracingContext(mode)):
            compiled = aot_module_simplified(gm, [fake_x], fw_compiler=compiler,
                                             bw_compiler=compiler, partition_fn=partition_fn)
        compiled(x)[0].backward()
        seconds = time.perf_counter() - t0
    return seconds, {"counters": {k: v for k, v in counters["aot_autograd"].items()
                                  if k.startswith("autograd_cache")}}


def _floor(model, x) -> tuple[float, dict]:
    """One fake forward + backward, then one real step (module docstring)."""
    import torch
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses import FakeTensorMode
    t0 = time.perf_counter()
    mode = FakeTensorMode()
    params = {k: mode.from_tensor(v).requires_grad_(v.requires_grad)
              for k, v in model.named_parameters()}
    state = {**params, **{k: mode.from_tensor(v) for k, v in model.named_buffers()}}
    with mode, enable_python_dispatcher():
        loss = torch.func.functional_call(model, state, (mode.from_tensor(x),))[0]
        torch.autograd.grad(loss, [v for v in params.values() if v.requires_grad])
    model(x)[0].backward()
    return time.perf_counter() - t0, {}


def child(args: argparse.Namespace) -> None:
    # torch's FX graph / AOTAutograd cache folder (read when the cache is used)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(args.cache_dir, "torch")
    import warnings

    import torch
    warnings.filterwarnings("ignore")  # keep stdout to the one JSON line
    sys.path.insert(0, HERE)
    from memory import build

    for name in PREIMPORT:
        importlib.import_module(name)
    partition_fn = None if args.impl == "floor" else _partition_fn(args.impl, args.partitioner)
    torch.set_num_threads(1)
    model, (x,) = build(args.model, "cpu", torch.float32)
    if not args.full_inputs:  # one sample (transformer: 16 tokens); see the docstring
        x = (x[:1, :16] if args.model == "transformer" else x[:1]).contiguous()
    if args.impl == "floor":
        seconds, extra = _floor(model, x)
    elif args.mode == "cold":
        seconds, extra = _cold(args.impl, partition_fn, model, x)
    else:
        seconds, extra = _warm(args.impl, partition_fn, model, x, args.cache_dir)
    print(json.dumps({"seconds": seconds, **extra}))


# ---------------------------------------------------------------- parent

FULL_INPUTS: list[str] = []  # ["--full-inputs"] when asked for


def run_child(impl: str, model: str, partitioner: str, mode: str, cache_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--model", model,
           "--partitioner", partitioner, "--mode", mode, "--cache-dir", cache_dir, *FULL_INPUTS]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {model} {partitioner} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _sum_counters(samples: list[dict]) -> dict:
    return dict(sum((collections.Counter(s.get("counters", {})) for s in samples),
                    collections.Counter()))


def measure(models, partitioners, modes, runs: int, tmp: str) -> list[dict]:
    cells = [(m, p) for m in models for p in partitioners]
    samples = {(m, p, mode, impl): [] for m, p in cells for mode in modes for impl in IMPLS}
    populate = {}
    for m, p, impl in [(m, p, i) for m, p in cells for i in IMPLS] if "warm" in modes else []:
        s = populate[m, p, impl] = run_child(impl, m, p, "warm", os.path.join(tmp, f"{m}-{p}-{impl}"))
        print(f"  populated {m} {p} {impl}: {s['seconds']:.2f}s {s.get('counters')}", flush=True)
    floors = {m: [] for m in models}
    for r in range(runs):
        for mode in modes:
            for m, p in cells:
                if mode == "cold" and p == partitioners[0]:
                    s = run_child("floor", m, p, mode, os.path.join(tmp, f"cold-{r}"))
                    floors[m].append(s)
                    print(f"  run {r} {mode} {m} floor: {s['seconds']:.2f}s", flush=True)
                for impl in IMPLS:  # t, a, t, a, ...
                    folder = os.path.join(tmp, f"{m}-{p}-{impl}" if mode == "warm" else f"cold-{r}")
                    s = run_child(impl, m, p, mode, folder)
                    samples[m, p, mode, impl].append(s)
                    print(f"  run {r} {mode} {m} {p} {impl}: {s['seconds']:.2f}s", flush=True)
    rows = []
    for mode in modes:
        for m, p in cells:
            row = {"model": m, "partitioner": p, "mode": mode}
            for impl in IMPLS:
                got = samples[m, p, mode, impl]
                row[f"{impl}_s"] = statistics.median(s["seconds"] for s in got)
                row[f"{impl}_samples"] = [round(s["seconds"], 4) for s in got]
                if mode == "warm":
                    row[f"{impl}_cache"] = _sum_counters(got)
                    row[f"{impl}_populate_s"] = populate[m, p, impl]["seconds"]
                if mode == "cold" and impl == IMPLS[-1]:
                    row["floor_s"] = statistics.median(s["seconds"] for s in floors[m])
                    row["floor_samples"] = [round(s["seconds"], 4) for s in floors[m]]
                if "stages" in got[0]:  # aotgrad's CompileReport.stage_seconds
                    row[f"{impl}_stages_s"] = {k: statistics.median(s["stages"][k] for s in got)
                                               for k in got[0]["stages"]}
            rows.append(row)
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = (f"{'model':<12} {'partitioner':<11} {'mode':<5} {'torch s':>8} {'aotgrad s':>9} "
            f"{'a/t':>5} {'floor s':>8} {'f/t':>5}  notes")
    print(cols)
    print("-" * (len(cols) + 40))
    for r in rows:
        note = ""
        if r["mode"] == "warm":
            note = ", ".join(f"{i} hit {r[f'{i}_cache'].get('autograd_cache_hit', 0)}/"
                             f"{len(r[f'{i}_samples'])} (miss run {r[f'{i}_populate_s']:.2f}s)"
                             for i in IMPLS)
        floor = (f"{r['floor_s']:>8.3f} {r['floor_s'] / r['torch_s']:>5.2f}" if "floor_s" in r
                 else f"{'':>8} {'':>5}")
        print(f"{r['model']:<12} {r['partitioner']:<11} {r['mode']:<5} {r['torch_s']:>8.3f} "
              f"{r['aotgrad_s']:>9.3f} {r['aotgrad_s'] / r['torch_s']:>5.2f} {floor}  {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per cell (median; default 5)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--partitioners", nargs="+", choices=PARTITIONERS, default=list(PARTITIONERS))
    ap.add_argument("--modes", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    ap.add_argument("--full-inputs", action="store_true",
                    help="memory.py's full-size inputs (default: one sample)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one sample
    for flag, choices in (("--impl", (*IMPLS, "floor")), ("--model", MODELS),
                          ("--partitioner", PARTITIONERS), ("--mode", ("cold", "warm")),
                          ("--cache-dir", None)):
        ap.add_argument(flag, choices=choices, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.full_inputs:
        FULL_INPUTS.append("--full-inputs")
    where = machine()
    print(f"machine: {where}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aotgrad-compile-time-") as tmp:
        rows = measure(args.models, args.partitioners, args.modes, args.runs, tmp)
    print()
    print_table(rows, f"{where}\nfirst call (compile + forward + backward), median of {args.runs} "
                      "fresh processes; a/t = aotgrad/torch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, "runs": args.runs,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
