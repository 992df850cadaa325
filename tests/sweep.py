"""Sweeps of OpInfos and ModuleInfos through ``aot_function`` / ``aot_module``
with the ``nop`` compiler, against eager, side by side with PyTorch's own
AOTAutograd (``functorch.compile``: the reference; tests may import it, the
package may not).

Per OpInfo of ``op_db`` (and ``hop_db``) and mode (static, ``dynamic=True``):
up to ``--samples`` float32 CPU samples; eager and each implementation run the
sample twice (the second call takes the compiled fast path); outputs, and the
gradients of ``sum(output * w)`` (``w`` fixed random tensors) with respect to
the inputs requiring grad, must match eager's (``torch.testing.assert_close``
defaults; ops whose eager outputs differ between two runs under the same seed
are compared by metadata only).  Per ModuleInfo of ``module_db``, train and
eval: outputs, gradients of parameters and inputs, and buffers after the call.

Each (entry, impl, mode) is ``pass``, ``fail`` (first error line or mismatch)
or ``skip`` (why).  Examples::

    python tests/sweep.py --ops --impl both --limit 40
    python tests/sweep.py --ops --modules --impl both --dynamic --json /tmp/s.json
    python tests/sweep.py --ops --filter '^linalg\\.' --impl aotgrad -v

Exit status 1 when an entry passes with torch and fails with aotgrad.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

IMPLS = ("aotgrad", "torch")


@dataclass
class Result:
    kind: str       # "op" or "module"
    name: str       # op name (with variant) or module name and train/eval
    impl: str
    mode: str       # "static" or "dynamic"
    status: str     # "pass", "fail", "skip"
    detail: str = ""
    seconds: float = 0.0
    samples: int = 0


@dataclass
class Entry:
    kind: str
    name: str
    samples: Callable[[], list]  # -> [(fn, inputs, meta)]; fn(*inputs) -> outputs
    nondeterministic: bool = False
    tags: dict = field(default_factory=dict)


class Timeout(Exception):
    pass


@contextlib.contextmanager
def hang_guard(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise Timeout(f"timed out after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- compilers

def compiler_for(impl: str, dynamic: bool) -> Callable[[Callable], Callable]:
    if impl == "aotgrad":
        import aotgrad
        return lambda fn, module=False: (aotgrad.aot_module if module else aotgrad.aot_function)(
            fn, aotgrad.nop, dynamic=dynamic)
    if impl == "torch":
        import functorch.compile as fc
        return lambda fn, module=False: (fc.aot_module if module else fc.aot_function)(
            fn, fc.nop, dynamic=dynamic)
    raise ValueError(impl)


# ---------------------------------------------------------------- comparing

def clone_inputs(values: list) -> list:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            c = v.detach().clone()
            c.requires_grad_(v.requires_grad)
            out.append(c)
        else:
            out.append(v)
    return out


def _weights(outs: list) -> list:
    g = torch.Generator().manual_seed(1234)
    ws = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.requires_grad and \
                (o.is_floating_point() or o.is_complex()) and o.layout == torch.strided:
            ws.append(torch.randn(o.shape, generator=g, dtype=o.dtype if o.is_floating_point()
                                  else torch.float32).to(o.dtype))
        else:
            ws.append(None)
    return ws


def run_once(fn: Callable, inputs: list, post: Callable | None) -> tuple[list, list]:
    """(flat outputs, grads of the inputs requiring grad) of one call."""
    torch.manual_seed(0)
    out = fn(*inputs)
    if post is not None:
        out = post(out)
    outs = pytree.tree_leaves(out)
    ws = _weights(outs)
    terms = [(o * w).sum() if not o.is_complex() else (o * w).sum().real
             for o, w in zip(outs, ws) if w is not None]
    diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads: list = []
    if terms and diff:
        loss = sum(terms)
        grads = list(torch.autograd.grad(loss, diff, allow_unused=True))
    return outs, grads


def compare(what: str, expected: list, actual: list, meta_only: bool = False) -> None:
    if len(expected) != len(actual):
        raise AssertionError(f"{what}: {len(actual)} values, eager has {len(expected)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        if isinstance(e, torch.Tensor) != isinstance(a, torch.Tensor):
            raise AssertionError(f"{what}[{i}]: {type(a).__name__}, eager has {type(e).__name__}")
        if not isinstance(e, torch.Tensor):
            if e != a and not (isinstance(e, float) and e != e and a != a):
                raise AssertionError(f"{what}[{i}]: {a!r}, eager has {e!r}")
            continue
        if (e.shape, e.dtype) != (a.shape, a.dtype):
            raise AssertionError(f"{what}[{i}]: {tuple(a.shape)} {a.dtype}, "
                                 f"eager has {tuple(e.shape)} {e.dtype}")
        if meta_only:
            continue
        e_, a_ = e.detach(), a.detach()
        if e_.layout != torch.strided:
            e_, a_ = e_.to_dense(), a_.to_dense()
        try:
            torch.testing.assert_close(a_, e_, equal_nan=True)
        except AssertionError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            raise AssertionError(f"{what}[{i}] differ: " + "; ".join(lines[:3])) from None


def check_sample(compile_fn: Callable, fn: Callable, inputs: list, post: Callable | None,
                 meta_only: bool, extra: Callable | None = None) -> None:
    e_in = clone_inputs(inputs)
    e_outs, e_grads = run_once(fn, e_in, post)
    e_extra = extra(None) if extra else None
    compiled = compile_fn(fn)
    for call in ("first call", "second call"):
        c_in = clone_inputs(inputs)
        c_outs, c_grads = run_once(compiled, c_in, post)
        compare(f"{call}: outputs", e_outs, c_outs, meta_only)
        compare(f"{call}: grads", e_grads, c_grads, meta_only)
        compare(f"{call}: mutated inputs", [x for x in e_in if isinstance(x, torch.Tensor)],
                [x for x in c_in if isinstance(x, torch.Tensor)], meta_only)
        if extra:
            compare(f"{call}: buffers", e_extra, extra(compiled), meta_only)


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    if type(e).__name__ == "AssertionError" and len(msg) > 1 and len(text) < 40:
        text = " ".join(m.strip() for m in msg[:3])
    return f"{type(e).__name__}: {text}"[:300]


# ---------------------------------------------------------------- op entries

_RANDOM = re.compile(r"dropout|bernoulli|multinomial|normal|rand|uniform|poisson|"
                     r"exponential|geometric|cauchy|log_normal|randn|randint|rrelu|"
                     r"empty|new_empty|fractional_max_pool|gumbel|feature_alpha")


def op_entries(samples_per_op: int, include_hops: bool = True) -> list[Entry]:
    from torch.testing._internal.common_methods_invocations import op_db
    ops = list(op_db)
    if include_hops:
        try:
            from torch.testing._internal.hop_db import hop_db
            ops += list(hop_db)
        except Exception:  # noqa: BLE001 - a torch without hop_db
            pass
    entries, seen = [], {}
    for op in ops:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        entries.append(Entry("op", name, _op_samples(op, samples_per_op),
                             nondeterministic=bool(_RANDOM.search(op.name))))
    return entries


def _op_samples(op, cap: int) -> Callable[[], list]:
    def make():
        if torch.float32 not in op.supported_dtypes("cpu"):
            raise _Skip("float32 not supported on cpu")
        grad = bool(op.supports_autograd) and torch.float32 in op.supported_backward_dtypes("cpu")
        made = []
        for s in islice(op.sample_inputs("cpu", torch.float32, requires_grad=grad), cap):
            made.append(_op_sample(op, s))
        return made
    return make


def _op_sample(op, sample) -> tuple:
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    tensors = [leaves[i] for i in where]

    def fn(*ts):
        vals = list(leaves)
        for i, t in zip(where, ts):
            vals[i] = t
        inp, args, kwargs = pytree.tree_unflatten(vals, spec)
        return op(inp, *args, **kwargs)
    return fn, tensors, sample.output_process_fn_grad


class _Skip(Exception):
    pass


# ---------------------------------------------------------------- module entries

def module_entries(samples_per_module: int) -> list[Entry]:
    from torch.testing._internal.common_modules import module_db
    entries, seen = [], {}
    for mi in module_db:
        for training in (True, False):
            base = f"{mi.name}.{'train' if training else 'eval'}"
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}#{seen[base]}"
            entries.append(Entry("module", name, _module_samples(mi, training,
                                                                 samples_per_module)))
    return entries


def _module_samples(mi, training: bool, cap: int) -> Callable[[], list]:
    def make():
        if torch.float32 not in mi.dtypes:
            raise _Skip("float32 not among the module's dtypes")
        if mi.is_lazy:
            raise _Skip("lazy module (parameters made at the first call)")
        made = []
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=torch.float32,
                                       requires_grad=True, training=training)
        for mod_input in islice((m for m in inputs if m.forward_input is not None), cap):
            made.append(("module", mi, mod_input, training))
        return made
    return make


def check_module_sample(compile_fn: Callable, mi, mod_input, training: bool) -> None:
    c_in = mod_input.constructor_input
    torch.manual_seed(0)
    m_eager = mi.module_cls(*c_in.args, **c_in.kwargs).to(torch.float32)
    m_eager.train(training)
    state = copy.deepcopy(m_eager.state_dict())
    f_in = mod_input.forward_input
    leaves, spec = pytree.tree_flatten((f_in.args, f_in.kwargs))
    where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    tensors = [leaves[i] for i in where]

    def make_call(mod):
        def call(*ts):
            vals = list(leaves)
            for i, t in zip(where, ts):
                vals[i] = t
            args, kwargs = pytree.tree_unflatten(vals, spec)
            return mod(*args, **kwargs)
        return call

    # eager: outputs, grads of inputs and parameters, buffers after the call
    def full(mod, caller):
        inputs = clone_inputs(tensors)
        torch.manual_seed(0)
        out = caller(*inputs)
        outs = pytree.tree_leaves(out)
        ws = _weights(outs)
        terms = [(o * w).sum() for o, w in zip(outs, ws) if w is not None]
        diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + \
            [p for p in mod.parameters() if p.requires_grad]
        grads: list = []
        if terms and diff:
            grads = list(torch.autograd.grad(sum(terms), diff, allow_unused=True))
        bufs = [b.detach().clone() for b in mod.buffers()]
        return outs, grads, bufs

    e_outs, e_grads, e_bufs = full(m_eager, make_call(m_eager))
    m_c = mi.module_cls(*c_in.args, **c_in.kwargs).to(torch.float32)
    m_c.load_state_dict(state)
    m_c.train(training)
    compiled = compile_fn(m_c, module=True)
    for call in ("first call", "second call"):
        if call == "second call":  # buffers (running stats) from the same start again
            with torch.no_grad():
                for b, b0 in zip(m_c.buffers(), [state[k] for k, _ in m_c.named_buffers()]):
                    b.copy_(b0)
        c_outs, c_grads, c_bufs = full(m_c, make_call(compiled))
        compare(f"{call}: outputs", e_outs, c_outs)
        compare(f"{call}: grads", e_grads, c_grads)
        compare(f"{call}: buffers", e_bufs, c_bufs)


# ---------------------------------------------------------------- running

def run_entry(entry: Entry, impls: list[str], modes: list[str], timeout: int,
              verbose: bool) -> list[Result]:
    results = []
    try:
        with hang_guard(timeout):
            samples = entry.samples()
    except _Skip as e:
        return [Result(entry.kind, entry.name, i, m, "skip", str(e)) for i in impls for m in modes]
    except Exception as e:  # noqa: BLE001
        return [Result(entry.kind, entry.name, i, m, "skip", "samples: " + first_line(e))
                for i in impls for m in modes]
    if not samples:
        return [Result(entry.kind, entry.name, i, m, "skip", "no samples")
                for i in impls for m in modes]
    # eager itself: drop samples that raise; find nondeterministic outputs
    usable, meta_only = [], entry.nondeterministic
    eager_error = ""
    for s in samples:
        if s[0] == "module":
            usable.append(s)
            continue
        fn, inputs, post = s
        try:
            with hang_guard(timeout):
                a = run_once(fn, clone_inputs(inputs), post)
                b = run_once(fn, clone_inputs(inputs), post)
            try:
                compare("eager", a[0], b[0])
                compare("eager", a[1], b[1])
            except AssertionError:
                meta_only = True
            usable.append(s)
        except Exception as e:  # noqa: BLE001
            eager_error = eager_error or first_line(e)
    if not usable:
        return [Result(entry.kind, entry.name, i, m, "skip", "eager raises: " + eager_error)
                for i in impls for m in modes]
    for impl in impls:
        for mode in modes:
            compile_fn = compiler_for(impl, mode == "dynamic")
            start = time.perf_counter()
            status, detail, n = "pass", "", 0
            for k, s in enumerate(usable):
                try:
                    with hang_guard(timeout), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if s[0] == "module":
                            check_module_sample(compile_fn, *s[1:])
                        else:
                            check_sample(compile_fn, s[0], s[1], s[2], meta_only)
                    n += 1
                except Exception as e:  # noqa: BLE001
                    status, detail = "fail", f"sample {k}: {first_line(e)}"
                    if verbose:
                        traceback.print_exc()
                    break
            results.append(Result(entry.kind, entry.name, impl, mode, status, detail,
                                  round(time.perf_counter() - start, 3), n))
    if verbose:
        for r in results:
            print(f"  {r.name:40s} {r.impl:8s} {r.mode:8s} {r.status} {r.detail}", flush=True)
    return results


def select(entries: list[Entry], pattern: str | None, slice_: str | None,
           limit: int | None) -> list[Entry]:
    if pattern:
        rx = re.compile(pattern)
        entries = [e for e in entries if rx.search(e.name)]
    if slice_:
        k, n = (int(x) for x in slice_.split("/"))
        entries = entries[k::n]
    if limit:
        entries = entries[:limit]
    return entries


def table(results: list[Result], out=None) -> list[tuple]:
    """Print the counts and the differences; return [(kind, name, mode, cause)]
    of entries passing with torch and failing with aotgrad."""
    out = out or sys.stdout
    by = {}
    for r in results:
        by[(r.kind, r.name, r.mode, r.impl)] = r
    kinds = sorted({r.kind for r in results})
    modes = sorted({r.mode for r in results}, key=lambda m: m != "static")
    impls = [i for i in IMPLS if any(r.impl == i for r in results)]
    print("\ncounts (pass / fail / skip)", file=out)
    for kind in kinds:
        for mode in modes:
            cells = []
            for impl in impls:
                rs = [r for r in results if (r.kind, r.mode, r.impl) == (kind, mode, impl)]
                c = {s: sum(r.status == s for r in rs) for s in ("pass", "fail", "skip")}
                cells.append(f"{impl}: {c['pass']:4d} / {c['fail']:4d} / {c['skip']:4d}")
            print(f"  {kind + 's':8s} {mode:8s} " + "   ".join(cells), file=out)
    regressions = []
    if "aotgrad" in impls and "torch" in impls:
        for title, ours, theirs in (("pass with torch, fail with aotgrad", "aotgrad", "torch"),
                                    ("pass with aotgrad, fail with torch", "torch", "aotgrad")):
            rows = []
            for (kind, name, mode, impl), r in by.items():
                if impl != ours or r.status != "fail":
                    continue
                other = by.get((kind, name, mode, theirs))
                if other is not None and other.status == "pass":
                    rows.append((kind, name, mode, r.detail))
            print(f"\n{title}: {len(rows)}", file=out)
            for kind, name, mode, detail in sorted(rows):
                print(f"  {kind:6s} {name:42s} {mode:8s} {detail}", file=out)
            if ours == "aotgrad":
                regressions = rows
    elif impls:
        fails = [r for r in results if r.status == "fail"]
        print(f"\nfailures: {len(fails)}", file=out)
        for r in sorted(fails, key=lambda r: (r.kind, r.name, r.mode)):
            print(f"  {r.kind:6s} {r.name:42s} {r.mode:8s} {r.impl:8s} {r.detail}", file=out)
    return regressions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", action="store_true", help="OpInfos of op_db and hop_db")
    p.add_argument("--modules", action="store_true", help="ModuleInfos of module_db")
    p.add_argument("--impl", default="both", choices=["aotgrad", "torch", "both"])
    p.add_argument("--dynamic", action="store_true", help="also dynamic=True")
    p.add_argument("--dynamic-only", action="store_true", help="only dynamic=True")
    p.add_argument("--slice", help="K/N: every N-th entry from the K-th")
    p.add_argument("--limit", type=int)
    p.add_argument("--filter", help="regex on entry names")
    p.add_argument("--samples", type=int, default=3, help="samples per op or module")
    p.add_argument("--timeout", type=int, default=120, help="seconds per sample and impl")
    p.add_argument("--json", help="write all results here (rewritten as it goes)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if not (a.ops or a.modules):
        a.ops = True
    impls = list(IMPLS) if a.impl == "both" else [a.impl]
    modes = ["dynamic"] if a.dynamic_only else (["static", "dynamic"] if a.dynamic else ["static"])
    entries = []
    if a.ops:
        entries += op_entries(a.samples)
    if a.modules:
        entries += module_entries(a.samples)
    entries = select(entries, a.filter, a.slice, a.limit)
    results: list[Result] = []
    start = time.perf_counter()
    for i, e in enumerate(entries):
        rs = run_entry(e, impls, modes, a.timeout, a.verbose)
        results += rs
        line = " ".join(f"{r.impl[0]}{r.mode[0]}={r.status}" for r in rs)
        print(f"[{i + 1}/{len(entries)} {time.perf_counter() - start:7.1f}s] {e.kind} "
              f"{e.name}: {line}", flush=True)
        if a.json and (i % 20 == 19 or i == len(entries) - 1):
            with open(a.json, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=0)
    regressions = table(results)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
