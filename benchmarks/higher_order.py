"""Higher-order autodiff through compiled functions: eager vs aotgrad (vs torch's own).

Note [Higher-order backward] (aotgrad/higher_order.py): the gradients a
compiled function returns under ``create_graph=True`` are differentiable.
Three cases, each timed against eager on the same weights and data:

* ``wgan``: a WGAN-GP critic step.  Critic: Conv2d(3, w, 4, 2, 1) ->
  LeakyReLU(0.2) -> Conv2d(w, 2w, 4, 2, 1) -> LeakyReLU(0.2) -> Flatten ->
  Linear(2w*8*8, 1) on 3x32x32 images.  Step: ``zero_grad``; ``loss =
  critic(fake).mean() - critic(real).mean() + 10 * (|grad_x critic(interp)|_2 -
  1)^2`` (the gradient by ``autograd.grad(create_graph=True)``, interp between
  real and fake); ``loss.backward()``; Adam step.
* ``hvp``: a Hessian-vector product by double backward, ``hvp(f, p, v) =
  grad(grad(f)(p) . v)``, of an MLP loss (3 tanh layers + a linear head, MSE)
  with respect to its parameters ``p``.
* ``overhead`` (always on CPU, tiny tensors, one thread, so the time is the
  framework's): a single-backward step (forward + ``backward()``) and a
  double-backward step (forward + ``autograd.grad(create_graph=True)`` w.r.t.
  the input + ``backward()`` of the squared gradient), for ``(a*b).sin().sum()``
  on 8 floats (``aot_function``; ``fn``: the gradient w.r.t. ``a`` only, as a
  gradient penalty takes it; ``fn-all``: w.r.t. ``a`` and ``b``, both
  penalised) and ``Linear(8, 8) -> Tanh`` on 4x8 (``aot_module``; ``module``:
  the gradient w.r.t. the input only), eager and aotgrad ``nop``.  overhead = aotgrad median -
  eager median for the same step; *ratio* = overhead(double) /
  overhead(single) (issue 19's target: <= 2).  A reference row, ``fn, floor``,
  runs ``fn`` with two hand-written autograd.Functions in aotgrad's place (the
  first's create_graph backward calls the second, the same ops as aotgrad's
  graphs, no checks): the overhead of that structure itself.

Variants of ``wgan`` and ``hvp`` (``--variants`` picks a subset):

* ``eager``;
* ``aotgrad`` -- ``aot_module(critic, nop)`` / ``aot_function(loss, nop)``;
* ``aotgrad-aot_eager`` -- ``torch.compile(.., backend=aotgrad.backends.aot_eager)``;
* ``aotgrad-inductor`` -- ``torch.compile(.., backend=aotgrad.backends.inductor)``;
* ``aotgrad-inductor-cudagraphs`` -- the same with ``mode="reduce-overhead"``
  (inductor's CUDA graph trees: each compiled graph replayed as one CUDA graph;
  CUDA only);
* ``aotgrad-module-inductor`` -- ``aot_module`` / ``aot_function`` with
  inductor's graph compiler for every graph (as the backend: inductor's
  decompositions, min-cut partitioner after its joint passes; uses aotgrad's
  private ``_torch`` helpers, so it reports "unavailable" if they moved);
* ``torch-aot_eager`` / ``torch-inductor`` -- ``torch.compile`` with torch's
  own AOTAutograd, a reference: it raises on double backward ("torch.compile
  with aot_autograd does not currently support double backward"), shown as
  ``unsupported``.

Values are checked twice against eager: at the first call (from the same
initial weights; its wall time is *first call*, compiling included), and after
the warm-up steps with the weights copied from eager's (the warm, fast path).
Each is ``allclose(got, eager, rtol=tol, atol=tol * max|eager|)`` for the loss
and every parameter gradient (hvp: every component of H v); *err* is the
largest ``max|got - eager| / max|eager|``.  A variant failing either check is
not timed (``MISMATCH``).  A torch.compile variant whose backend was never
called (dynamo ran the code eagerly) is reported as such, not timed.

On CPU every case runs with one thread (``--threads``): on a small shared
machine two threads next to another busy process made steps up to 100x slower.

Step time: samples of ``--steps`` steps, the variants interleaved (round
robin, ``--rounds`` rounds), the median per step; with ``--device cuda``
``torch.cuda.synchronize()`` brackets each sample and the first call, and TF32
is off (so that the value check can be tight; ``--tf32`` turns it on and
loosens the tolerance).  Inductor's FX graph cache is off, and each variant's
first call gets fresh, empty inductor and Triton cache folders and cleared
in-memory inductor caches (best effort: ``e2e.py``, one process per variant,
measures cold compiles properly).

    python benchmarks/higher_order.py [--device cpu|cuda] [--json PATH] [--rounds N]
        [--cases wgan,hvp,overhead] [--variants a,b] [--steps N] [--inner N]
        [--batch N] [--width N] [--threads N] [--tf32] [--tol X]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime
import functools
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# fresh inductor / Triton cache folders: first calls compile (set before torch imports inductor)
_CACHE = tempfile.mkdtemp(prefix="higher-order-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import aotgrad  # noqa: E402

VARIANTS = ("eager", "aotgrad", "aotgrad-aot_eager", "aotgrad-inductor",
            "aotgrad-inductor-cudagraphs",
            "aotgrad-module-inductor", "torch-aot_eager", "torch-inductor")
CASES = ("wgan", "hvp", "overhead")
LAMBDA = 10.0


class Unsupported(Exception):
    """The variant cannot run this case (the reason is the message)."""


# ---------------------------------------------------------------- compiling

class Counted:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self, backend: Callable):
        self.backend, self.graphs = backend, 0
        self.__name__ = getattr(backend, "__name__", "backend")

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs += 1
        return self.backend(gm, example_inputs, **kwargs)


def _dynamo_setup() -> None:
    """Room for every variant's entries on the shared code objects, and an error
    (not a silent eager fallback) if that is not enough."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                        ("accumulated_recompile_limit", 1024),
                        ("accumulated_cache_size_limit", 1024)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)
    try:
        import torch._inductor.config as icfg
        icfg.fx_graph_cache = False
        if hasattr(icfg, "fx_graph_remote_cache"):
            icfg.fx_graph_remote_cache = False
    except ImportError:
        pass


def _aotgrad_inductor_kwargs() -> dict:
    """aot_function keywords compiling every graph with inductor, as the backend does."""
    try:
        from aotgrad import _torch as private
        patches, device_index = private.inductor_mode_options(None, None)
        compile_graph = functools.partial(private.inductor_compile, config_patches=patches,
                                          device_index=device_index)
        decompositions = private.inductor_decompositions()
        partition = aotgrad.backends.JointPassesFirst(aotgrad.min_cut_rematerialization_partition)
    except (ImportError, AttributeError, TypeError) as e:
        raise Unsupported(f"unavailable ({type(e).__name__}: {e})") from e
    return {"fw_compiler": functools.partial(compile_graph, is_backward=False),
            "bw_compiler": functools.partial(compile_graph, is_backward=True),
            "inference_compiler": functools.partial(compile_graph, is_inference=True),
            "decompositions": decompositions, "partition_fn": partition}


def compiled(variant: str, fn: Callable, module: bool) -> tuple[Callable, Counted | None]:
    """``fn`` (a module if ``module``) compiled as ``variant``; the counting backend, if any."""
    if variant == "eager":
        return fn, None
    aot = aotgrad.aot_module if module else aotgrad.aot_function
    if variant == "aotgrad":
        return aot(fn, aotgrad.nop), None
    if variant == "aotgrad-module-inductor":
        return aot(fn, **_aotgrad_inductor_kwargs()), None
    if variant == "aotgrad-inductor-cudagraphs":
        counted = Counted(aotgrad.backends.inductor)
        return torch.compile(fn, backend=counted, mode="reduce-overhead"), counted
    if variant.startswith("aotgrad-"):
        backend = getattr(aotgrad.backends, variant.split("-", 1)[1])
    elif variant.startswith("torch-"):
        backend = torch._dynamo.lookup_backend(variant.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    counted = Counted(backend)
    return torch.compile(fn, backend=counted), counted


# ---------------------------------------------------------------- models and steps

class Critic(nn.Sequential):
    def __init__(self, width: int):
        super().__init__(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(2 * width * 8 * 8, 1))


def wgan_gp_loss(critic: Callable, real, fake, eps):
    interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(interp).sum(), interp, create_graph=True)
    penalty = ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    return critic(fake).mean() - critic(real).mean() + LAMBDA * penalty


def mlp_loss(x, y, *params):
    h = x
    for k in range(0, len(params) - 2, 2):
        h = torch.tanh(F.linear(h, params[k], params[k + 1]))
    return F.mse_loss(F.linear(h, params[-2], params[-1]), y)


def hvp(f: Callable, params: list, v: list, *args) -> list:
    """H v by double backward: grad(grad(f)(params) . v)."""
    grads = torch.autograd.grad(f(*args, *params), params, create_graph=True)
    dot = sum((g * u).sum() for g, u in zip(grads, v))
    return list(torch.autograd.grad(dot, params))


class Run:
    """One variant of a case: ``values()`` (checked), ``step()`` (timed), ``load(eager)``."""

    def __init__(self, name: str, values: Callable, step: Callable, params: list,
                 counted: Counted | None):
        self.name, self.values, self.step, self.params, self.counted = \
            name, values, step, params, counted

    def load(self, eager: "Run") -> None:
        with torch.no_grad():
            for p, q in zip(self.params, eager.params):
                p.copy_(q)


def wgan_runs(variants, args) -> list:
    torch.manual_seed(0)
    base = Critic(args.width).to(args.device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    real = torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device)
    fake = torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device)
    eps = torch.rand(args.batch, 1, 1, 1, generator=gen).to(args.device)
    runs = []
    for name in variants:
        critic = copy.deepcopy(base)
        params = list(critic.parameters())
        opt = torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.9))
        try:
            run, counted = compiled(name, critic, module=True)
        except Unsupported as e:
            runs.append((name, str(e)))
            continue

        def values(run=run, critic=critic, params=params):
            critic.zero_grad(set_to_none=True)
            loss = wgan_gp_loss(run, real, fake, eps)
            loss.backward()
            return [loss.detach().clone()] + [p.grad.clone() for p in params]

        def step(run=run, opt=opt):
            opt.zero_grad(set_to_none=True)
            wgan_gp_loss(run, real, fake, eps).backward()
            opt.step()

        runs.append(Run(name, values, step, params, counted))
    return runs


def hvp_runs(variants, args) -> list:
    gen = torch.Generator(device="cpu").manual_seed(2)
    d_in, width = 32, args.width * 4
    dims = [d_in, width, width, width, 1]
    params = []
    for a, b in zip(dims, dims[1:]):
        params += [torch.randn(b, a, generator=gen) / math.sqrt(a),
                   torch.randn(b, generator=gen) * 0.1]
    params = [p.to(args.device).requires_grad_(True) for p in params]
    v = [torch.randn(p.shape, generator=gen).to(args.device) for p in params]
    x = torch.randn(args.batch * 4, d_in, generator=gen).to(args.device)
    y = torch.randn(args.batch * 4, 1, generator=gen).to(args.device)
    runs = []
    for name in variants:
        try:
            f, counted = compiled(name, mlp_loss, module=False)
        except Unsupported as e:
            runs.append((name, str(e)))
            continue

        def values(f=f):
            return [h.clone() for h in hvp(f, params, v, x, y)]

        def step(f=f):
            hvp(f, params, v, x, y)

        runs.append(Run(name, values, step, [], counted))
    return runs


# ---------------------------------------------------------------- checking and timing

def compare(got: list, want: list, tol: float) -> tuple[bool, float]:
    ok, worst = len(got) == len(want), 0.0
    for a, b in zip(got, want):
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        worst = max(worst, err) if not math.isnan(err) else math.inf
        ok = ok and torch.allclose(a, b, rtol=tol, atol=tol * scale)
    return ok, worst


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_caches(tag: str) -> None:
    """Best effort: inductor's and Triton's caches empty for the next first call."""
    for env, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ[env] = os.path.join(_CACHE, tag, sub)
    try:
        from torch._inductor.utils import clear_inductor_caches
        clear_inductor_caches()
    except (ImportError, AttributeError):
        pass


def timed_first(run: Run, device: str) -> tuple[list | None, float, str | None]:
    """The first call's values and wall seconds, or the reason it failed."""
    fresh_caches(run.name)
    sync(device)
    t0 = time.perf_counter()
    try:
        vals = run.values()
    except Exception as e:  # noqa: BLE001 -- any failure is a row of the table
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "double backward" in str(e):
            return None, time.perf_counter() - t0, f"unsupported ({msg[:90]})"
        if "appears to not have been used in the graph" in str(e):
            # torch's compiled backward under create_graph: gradients tied to a node that
            # raises when reached, but not connected to the inputs (grad w.r.t. them: unused)
            return None, time.perf_counter() - t0, \
                "unsupported (its gradients' gradient: 'Tensor ... not used in the graph')"
        return None, time.perf_counter() - t0, f"error: {type(e).__name__}: {msg[:200]}"
    sync(device)
    return vals, time.perf_counter() - t0, None


def model_case(case: str, runs: list, args) -> list[dict]:
    rows: dict[str, dict] = {}
    live: list[Run] = []
    for run in runs:
        if isinstance(run, tuple):
            rows[run[0]] = {"case": case, "variant": run[0], "status": run[1]}
            continue
        vals, first_s, failure = timed_first(run, args.device)
        row = {"case": case, "variant": run.name, "first_s": round(first_s, 3)}
        rows[run.name] = row
        if run.name == "eager":
            if vals is None:
                raise SystemExit(f"{case}: eager failed: {failure}")
            eager, want = run, vals
        if failure is not None:
            row["status"] = failure
            print(f"{case} {run.name}: {failure}", file=sys.stderr, flush=True)
            continue
        if run.counted is not None and run.counted.graphs == 0:
            row["status"] = "not compiled (dynamo ran it eagerly)"
            continue
        ok, err = compare(vals, want, args.tol)
        row.update(err_first=err, status="ok" if ok else "MISMATCH (first call)")
        if ok:
            live.append(run)
        print(f"{case} {run.name}: first call {first_s:.2f} s, err {err:.2e}", file=sys.stderr,
              flush=True)

    for run in live:  # warm up (fast paths, recompiles), then check the warm call
        for _ in range(args.warmup):
            run.step()
    want = eager.values()
    for run in list(live):
        if run is eager:
            continue
        run.load(eager)
        ok, err = compare(run.values(), want, args.tol)
        rows[run.name]["err_warm"] = err
        if not ok:
            rows[run.name]["status"] = "MISMATCH (warm call)"
            live.remove(run)

    samples: dict[str, list[float]] = {run.name: [] for run in live}
    for _ in range(args.rounds):
        for run in live:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            sync(args.device)
            samples[run.name].append((time.perf_counter() - t0) / args.steps * 1e3)
    eager_ms = statistics.median(samples["eager"]) if "eager" in samples else None
    for name, s in samples.items():
        ms = statistics.median(s)
        rows[name]["step_ms"] = round(ms, 3)
        if eager_ms:
            rows[name]["step_over_eager"] = round(ms / eager_ms, 3)
    return list(rows.values())


# ---------------------------------------------------------------- overhead (CPU, tiny)

def tiny(a, b):
    return (a * b).sin().sum()


#: the reference row: ``fn`` with hand-written Functions in aotgrad's place
FLOOR = "fn, floor: hand-written Functions"


class _TinyVJP(torch.autograd.Function):
    """The floor's second program: ``tiny``'s gradient w.r.t. ``a`` as a
    function of (a, b, a*b, tangent), written by hand (the ops of aotgrad's
    second-program graphs for ``tiny``)."""

    @staticmethod
    def forward(ctx, a, b, m, t):
        e = t.expand(m.shape)
        dm = torch.mul(e, torch.cos(m))
        ctx.save_for_backward(a, b, m, e, dm)
        ctx.set_materialize_grads(False)
        return torch.mul(dm, b)

    @staticmethod
    def backward(ctx, t):
        a, b, m, e, dm = ctx.saved_tensors
        d = torch.mul(torch.mul(torch.mul(t, b), e), torch.neg(torch.sin(m)))
        return torch.mul(d, b), torch.add(torch.mul(t, dm), torch.mul(d, a)), None, None


class _TinyFloor(torch.autograd.Function):
    """``tiny`` as two hand-written autograd.Functions (the structure of a
    compiled double backward: a first program whose create_graph backward calls
    a second one), with none of aotgrad's checks -- the floor of that design."""

    @staticmethod
    def forward(ctx, a, b):
        m = torch.mul(a, b)
        ctx.save_for_backward(a, b, m)
        ctx.set_materialize_grads(False)
        return torch.sum(torch.sin(m))

    @staticmethod
    def backward(ctx, t):
        a, b, m = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: the second program
            return _TinyVJP.apply(a, b, m, t), None
        dm = torch.mul(t.expand(m.shape), torch.cos(m))
        return torch.mul(dm, b), torch.mul(dm, a)


def overhead_programs() -> dict[str, dict[str, Callable]]:
    """Per program, per (implementation, order): a no-argument function doing one step."""
    torch.manual_seed(3)
    out = {}

    a, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)

    def fn_steps(f):
        def single():
            f(a, b).backward()

        def double():
            (g,) = torch.autograd.grad(f(a, b), a, create_graph=True)
            g.square().sum().backward()
        return single, double

    def fn_all_steps(f):  # the gradient w.r.t. every input, all of it penalised
        def single():
            f(a, b).backward()

        def double():
            ga, gb = torch.autograd.grad(f(a, b), (a, b), create_graph=True)
            (ga.square().sum() + gb.square().sum()).backward()
        return single, double

    for program, steps, compiled in (
            ("fn", fn_steps, lambda: aotgrad.aot_function(tiny, aotgrad.nop)),
            ("fn-all", fn_all_steps, lambda: aotgrad.aot_function(tiny, aotgrad.nop)),
            (FLOOR, fn_steps, lambda: _TinyFloor.apply)):
        out[program] = {}
        for impl, make in (("eager", lambda: tiny), ("aotgrad", compiled)):
            single, _ = steps(make())   # separate compiled objects: each first call compiles
            _, double = steps(make())
            out[program][f"{impl} single"], out[program][f"{impl} double"] = single, double
        out[program]["params"] = [a, b]

    lin = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(4, 8, requires_grad=True)

    def module_steps(m):
        def single():
            m(x).sum().backward()

        def double():
            (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
            g.square().sum().backward()
        return single, double

    out["module"] = {}
    for impl, make in (("eager", lambda: lin),
                       ("aotgrad", lambda: aotgrad.aot_module(lin, aotgrad.nop))):
        single, _ = module_steps(make())
        _, double = module_steps(make())
        out["module"][f"{impl} single"], out["module"][f"{impl} double"] = single, double
    out["module"]["params"] = [x, *lin.parameters()]
    return out


def overhead_case(args) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for program, steps in overhead_programs().items():
            params = steps.pop("params")

            def grads_of(step):
                for p in params:
                    p.grad = None
                step()
                return [p.grad.clone() for p in params]

            first, vals, row = {}, {}, {"case": "overhead", "program": program}
            for name, step in steps.items():
                t0 = time.perf_counter()
                vals[name] = grads_of(step)
                first[name] = (time.perf_counter() - t0) * 1e3
            for order in ("single", "double"):
                ok, err = compare(vals[f"aotgrad {order}"], vals[f"eager {order}"], args.tol)
                row[f"err_{order}"] = err
                row[f"check_{order}"] = "ok" if ok else "MISMATCH"
                row[f"aotgrad_first_ms_{order}"] = round(first[f"aotgrad {order}"], 2)
            live = {name: step for name, step in steps.items()
                    if row[f"check_{name.split()[1]}"] == "ok"}
            for step in live.values():
                for _ in range(20):
                    step()
            samples: dict[str, list[float]] = {name: [] for name in live}
            for _ in range(args.rounds):
                for name, step in live.items():
                    t0 = time.perf_counter()
                    for _ in range(args.inner):
                        step()
                    samples[name].append((time.perf_counter() - t0) / args.inner * 1e6)
            med = {name: statistics.median(s) for name, s in samples.items()}
            for order in ("single", "double"):
                if f"aotgrad {order}" in med:
                    e, g = med[f"eager {order}"], med[f"aotgrad {order}"]
                    row.update({f"eager_us_{order}": round(e, 2),
                                f"aotgrad_us_{order}": round(g, 2),
                                f"overhead_us_{order}": round(g - e, 2)})
            if "overhead_us_double" in row and "overhead_us_single" in row:
                single = row["overhead_us_single"]
                row["ratio"] = round(row["overhead_us_double"] / single, 3) if single > 0 else None
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


# ---------------------------------------------------------------- output

def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return ""
    return format(value, spec) if spec else str(value)


def model_table(rows: list[dict]) -> str:
    lines = ["| case | variant | check | err first | err warm | first call s | step ms | "
             "step / eager |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['variant']} | {r['status']} | "
                     f"{fmt(r.get('err_first'), '.1e')} | {fmt(r.get('err_warm'), '.1e')} | "
                     f"{fmt(r.get('first_s') if r['status'] == 'ok' else None, '.2f')} | "
                     f"{fmt(r.get('step_ms'), '.2f')} | {fmt(r.get('step_over_eager'), '.2f')} |")
    return "\n".join(lines)


def overhead_table(rows: list[dict]) -> str:
    lines = ["| program | step | check | err | eager us | aotgrad us | overhead us | "
             "aotgrad first call ms |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for order in ("single", "double"):
            lines.append(f"| {r['program']} | {order} | {r[f'check_{order}']} | "
                         f"{fmt(r.get(f'err_{order}'), '.1e')} | "
                         f"{fmt(r.get(f'eager_us_{order}'), '.1f')} | "
                         f"{fmt(r.get(f'aotgrad_us_{order}'), '.1f')} | "
                         f"{fmt(r.get(f'overhead_us_{order}'), '.1f')} | "
                         f"{fmt(r.get(f'aotgrad_first_ms_{order}'), '.1f')} |")
    lines.append("")
    lines.append("| program | overhead(double) / overhead(single) | target |")
    lines.append("|---|---:|---|")
    for r in rows:
        ratio = r.get("ratio")
        verdict = "" if ratio is None else \
            ("holds" if ratio <= 2 else f"misses by {ratio / 2:.2f}x")
        if r["program"] == FLOOR:
            verdict += " (not aotgrad: the design's floor)"
        lines.append(f"| {r['program']} | {fmt(ratio, '.2f')} | <= 2: {verdict} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
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
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--rounds", type=int, default=15, help="samples per variant")
    ap.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--variants", help="comma-separated subset of " + ",".join(VARIANTS) +
                    " (eager is always run)")
    ap.add_argument("--steps", type=int, default=None, help="steps per sample (wgan, hvp)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the warm check (cuda: "
                    "2, see RESULTS.md: after 3 the critic sits where eager NCHW and "
                    "channels_last differ by 3e-3)")
    ap.add_argument("--inner", type=int, default=200, help="calls per sample (overhead)")
    ap.add_argument("--batch", type=int, help="images per step (default: cuda 64, cpu 16); "
                    "the hvp batch is 4x")
    ap.add_argument("--width", type=int, help="critic channels (default: cuda 64, cpu 16); "
                    "the MLP width is 4x")
    ap.add_argument("--tf32", action="store_true", help="leave TF32 on (cuda)")
    ap.add_argument("--threads", type=int, help="intra-op threads for wgan/hvp (default: cpu "
                    "1, cuda torch's default); the overhead case always uses 1")
    ap.add_argument("--tol", type=float, help="value check tolerance (default: cpu 1e-4, "
                    "cuda 1e-3, 2e-2 with --tf32)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    args.batch = args.batch or (64 if cuda else 16)
    args.width = args.width or (64 if cuda else 16)
    args.steps = args.steps or (5 if cuda else 2)
    if args.tol is None:
        args.tol = (2e-2 if args.tf32 else 1e-3) if cuda else 1e-4
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    _dynamo_setup()
    cases = args.cases.split(",") if args.cases else list(CASES)
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}: choose from {', '.join(CASES)}")
    default = [v for v in VARIANTS if cuda or not v.endswith("-cudagraphs")]
    variants = ["eager"] + [v for v in (args.variants.split(",") if args.variants else default)
                            if v != "eager"]

    model_rows: list[dict] = []
    for case in ("wgan", "hvp"):
        if case in cases:
            runs = (wgan_runs if case == "wgan" else hvp_runs)(variants, args)
            model_rows += model_case(case, runs, args)
            torch._dynamo.reset()
    over_rows = overhead_case(args) if "overhead" in cases else []

    where = machine(args.device)
    print(f"\ntorch {torch.__version__}, {args.device} ({where}), {torch.get_num_threads()} "
          f"threads; medians of {args.rounds} interleaved samples")
    if model_rows:
        print(f"wgan: critic width {args.width}, batch {args.batch}; hvp: MLP width "
              f"{args.width * 4}, batch {args.batch * 4}; {args.steps} steps per sample, "
              f"tol {args.tol:g}\n")
        print(model_table(model_rows))
    if over_rows:
        print(f"\noverhead: CPU, 1 thread, {args.inner} calls per sample (us per call)\n")
        print(overhead_table(over_rows))
    if args.json:
        import json
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "python": platform.python_version(), "device": args.device, "machine": where,
                "threads": torch.get_num_threads(), "argv": sys.argv[1:],
                "batch": args.batch, "width": args.width, "rounds": args.rounds,
                "steps": args.steps, "inner": args.inner, "tol": args.tol,
                "tf32": args.tf32 if cuda else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": model_rows + over_rows}, f, indent=1)


if __name__ == "__main__":
    main()
