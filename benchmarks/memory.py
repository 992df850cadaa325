"""Saved activations and step time: aotgrad vs PyTorch's own AOTAutograd vs eager.

Three training programs (a pre-LN transformer, an MLP, a small ResNet-style
CNN; each module returns ``(loss,)`` with ``loss = output.float().pow(2).mean()``
computed inside the graph), each compiled through ``aot_module_simplified`` by
both implementations with the same compilers and partitioners:

* ``default``  — ``default_partition``;
* ``mincut``   — ``min_cut_rematerialization_partition``;
* ``budget``   — min-cut under ``activation_memory_budget`` = 0.5, 0.2, 0.0
  (``torch._functorch.config.patch`` for torch, ``aotgrad.config.patch`` for
  aotgrad, active around compilation and the first forward+backward).

Compilers: on CPU a recorder that runs the graph as Python (nop); on CUDA
inductor's ``compile_fx_inner`` for both, with inductor's decompositions and
``layout_optimization`` off (see run_model).

Per row: ``saved_bytes`` — bytes of the backward graph's tensor placeholders
that are neither ``primals_*`` nor ``tangents_*`` nor views of them, each
storage counted once (the memory the backward keeps alive beyond the inputs;
``saved_bytes_all`` adds the primals and their views; ``saved_view_bytes``,
column "views MB", is the views of primals, e.g. ``t(weight)``, which hold no
memory of their own); for eager, the distinct storages that autograd saves
which are not parameters/inputs (saved_tensors_hooks).
``step_ms`` — median forward+backward wall time, the variants timed round-robin
after 2 warm-up steps.  ``peak_bytes`` (CUDA only) — max_memory_allocated during
one step minus what was allocated before it.  The ratio columns are
aotgrad/torch on the matching row.

    python benchmarks/memory.py [--device cpu|cuda] [--json PATH] [--models transformer mlp cnn] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import aotgrad

MODELS = ("transformer", "mlp", "cnn")
BUDGETS = (0.5, 0.2, 0.0)


# ---------------------------------------------------------------- models

class Block(nn.Module):
    """Pre-LN transformer block; attention from plain ops (q@k^T, softmax, @v)."""

    def __init__(self, d: int, heads: int, p: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class Transformer(nn.Module):
    def __init__(self, layers: int, d: int, heads: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(self.blocks(x))


def mlp(width: int, layers: int = 6) -> nn.Module:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class CNN(nn.Module):
    def __init__(self, channels=(32, 64, 128), blocks_per_stage: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        layers = []
        cin = channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        y = self.stages(self.stem(x))
        return self.fc(y.mean(dim=(2, 3)))


class WithLoss(nn.Module):
    """Returns ``(loss,)``: aot_module_simplified wants tuple outputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return (self.net(x).float().pow(2).mean(),)


def build(name: str, device: str, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor]]:
    cuda = device == "cuda"
    torch.manual_seed(0)
    if name == "transformer":
        d, heads, seq, batch = (1024, 16, 512, 8) if cuda else (256, 4, 128, 8)
        net, shape = Transformer(8, d, heads), (batch, seq, d)
    elif name == "mlp":
        width, batch = (4096, 1024) if cuda else (1024, 256)
        net, shape = mlp(width), (batch, width)
    elif name == "cnn":
        batch, hw = (64, 128) if cuda else (16, 64)
        net, shape = CNN(), (batch, 3, hw, hw)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model = WithLoss(net).to(device=device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return model, [x]


# ---------------------------------------------------------------- implementations

def _torch_impl() -> dict[str, Any]:
    # PyTorch's own AOTAutograd: the baseline (aotgrad itself never imports these)
    import torch._functorch.config as functorch_config
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import (
        default_partition,
        min_cut_rematerialization_partition,
    )
    return {"aot": aot_module_simplified, "default": default_partition,
            "mincut": min_cut_rematerialization_partition, "boxed": make_boxed_func,
            "budget": lambda b: functorch_config.patch(activation_memory_budget=b)}


#: aotgrad's recompute cost for budgets: "roofline" (the default estimate) or
#: "profiled" (aotgrad.partition.profiled_cost: the ops timed on the device)
RECOMPUTE_COST = "roofline"


def _aotgrad_impl() -> dict[str, Any]:
    mincut = aotgrad.min_cut_rematerialization_partition
    if RECOMPUTE_COST == "profiled":
        import functools

        from aotgrad.partition import profiled_cost
        mincut = functools.partial(mincut, recompute_cost=profiled_cost())
    return {"aot": aotgrad.aot_module_simplified, "default": aotgrad.default_partition,
            "mincut": mincut, "boxed": aotgrad.make_boxed_func,
            "budget": lambda b: aotgrad.config.patch(activation_memory_budget=b),
            "peak": lambda b: aotgrad.config.patch(memory_budget=b)}


def primal_views(fw_gm: torch.fx.GraphModule) -> set:
    """Storages of the forward graph's primals (inputs, parameters): a saved
    value on one of them (a primal, or a view such as ``t(weight)``) holds no
    memory of its own."""
    return {StorageWeakRef(n.meta["val"].untyped_storage())
            for n in fw_gm.graph.find_nodes(op="placeholder")
            if isinstance(n.meta.get("val"), torch.Tensor)}


def saved_bytes_of(bw_gm: torch.fx.GraphModule, primal_storages: set) -> tuple[int, int, int]:
    """(saved activations, + primals, saved views of primals) of a backward
    graph, in bytes.  Saved activations count each storage once (a view saved
    beside its base costs nothing more), as the eager row does."""
    storages: dict = {}
    primals = views = 0
    for n in bw_gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or n.name.startswith("tangents"):
            continue
        nbytes = val.numel() * val.element_size()
        key = StorageWeakRef(val.untyped_storage())
        if n.name.startswith("primals"):
            primals += nbytes
        elif key in primal_storages:
            views += nbytes
        else:
            storages[key] = max(storages.get(key, 0), val.untyped_storage().nbytes())
    saved = sum(storages.values())
    return saved, saved + primals + views, views


class Recorder:
    """Forward/backward compilers that remember what they were given."""

    def __init__(self, boxed: Callable, inductor: bool):
        self.boxed = boxed
        self.inductor = inductor
        self.saved: tuple[int, int, int] | None = None
        self.views: set[str] = set()

    def _compile(self, gm, example_inputs, is_backward: bool):
        # measured before a compiler may rewrite the graph
        if is_backward:
            self.saved = saved_bytes_of(gm, self.views)
        else:
            self.views = primal_views(gm)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx_inner
            return compile_fx_inner(gm, example_inputs, is_backward=is_backward)
        return self.boxed(gm.forward)

    def fw(self, gm, example_inputs):
        return self._compile(gm, example_inputs, False)

    def bw(self, gm, example_inputs):
        return self._compile(gm, example_inputs, True)


@dataclass
class Variant:
    model: str
    impl: str
    partitioner: str
    budget: float | None
    fn: Callable | None = None
    saved_bytes: int | None = None
    saved_bytes_all: int | None = None
    saved_view_bytes: int | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None

    def fail(self, where: str, exc: BaseException) -> None:
        self.error = f"{where}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.fn = None


def make_step(fn: Callable, inputs: list, params: list, cuda: bool) -> Callable[[], None]:
    def step():
        out = fn(*inputs)
        out[0].backward()
        if cuda:
            torch.cuda.synchronize()
    return step


def clear_grads(params: list) -> None:
    for p in params:
        p.grad = None


def eager_saved_bytes(model: nn.Module, inputs: list, params: list) -> int:
    """Distinct storages autograd saves during one step, parameters and inputs excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*params, *model.buffers(), *inputs]}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    clear_grads(params)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    out[0].backward()
    clear_grads(params)
    return sum(seen.values())


def compile_variant(v: Variant, impl: dict, model: nn.Module, inputs: list, params: list,
                    inductor: bool, decomps, cuda: bool) -> None:
    rec = Recorder(impl["boxed"], inductor)
    partition_fn = impl["default"] if v.partitioner == "default" else impl["mincut"]
    ctx = impl["budget"](v.budget) if v.budget is not None else contextlib.nullcontext()
    with ctx:
        fn = impl["aot"](model, inputs, fw_compiler=rec.fw, bw_compiler=rec.bw,
                         partition_fn=partition_fn, decompositions=decomps)
        clear_grads(params)
        make_step(fn, inputs, params, cuda)()  # the backward may compile lazily
    if rec.saved is None:
        raise RuntimeError("no backward graph was compiled")
    v.fn = fn
    v.saved_bytes, v.saved_bytes_all, v.saved_view_bytes = rec.saved


def measure_peak(step: Callable, params: list) -> int:
    clear_grads(params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - before


def inductor_decomps():
    """Inductor's decompositions, with ``layout_optimization`` off."""
    import torch._inductor.config as inductor_config
    from torch._inductor.decomposition import select_decomp_table
    # Inductor's channels-last layout choice for convolutions changes the
    # strides of saved tensors; outside torch.compile (no TracingContext) no
    # one tells the backward, which then fails its stride asserts.
    inductor_config.layout_optimization = False
    return select_decomp_table()


def time_variants(variants: list[Variant], inputs: list, params: list, cuda: bool,
                  repeats: int) -> None:
    """Two warm-up steps each, then ``repeats`` steps round-robin (rotating who
    goes first) into ``v.times``; on CUDA then ``v.peak_bytes``.  A variant
    that fails is marked (``v.error``) and left out from then on."""
    steps = {id(v): make_step(v.fn, inputs, params, cuda) for v in variants if v.fn is not None}

    def guarded(v: Variant, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as e:  # noqa: BLE001
            v.fail(what, e)
            return None

    for v in variants:  # warm-up
        for _ in range(2):
            if v.fn is not None:
                clear_grads(params)
                guarded(v, "warm-up", steps[id(v)])
    for r in range(repeats):  # round-robin, rotating who goes first
        live = [v for v in variants if v.fn is not None]
        for v in live[r % max(len(live), 1):] + live[:r % max(len(live), 1)]:
            if v.fn is None:
                continue
            clear_grads(params)
            step = steps[id(v)]
            t0 = time.perf_counter()
            ok = guarded(v, "step", lambda step=step: step() or True)
            if ok:
                v.times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        for v in variants:
            if v.fn is not None:
                v.peak_bytes = guarded(v, "peak", lambda v=v: measure_peak(steps[id(v)], params))


def run_model(name: str, device: str, dtype: torch.dtype, repeats: int, inductor: bool) -> list[Variant]:
    cuda = device == "cuda"
    model, inputs = build(name, device, dtype)
    params = list(model.parameters())
    decomps = inductor_decomps() if inductor else None

    impls: dict[str, dict | None] = {"torch": None, "aotgrad": _aotgrad_impl()}
    try:
        impls["torch"] = _torch_impl()
    except Exception as e:  # noqa: BLE001 - a torch without functorch internals
        torch_error = e
    variants = [Variant(name, "eager", "default", None, fn=model)]
    for impl_name in ("torch", "aotgrad"):
        for part, budget in [("default", None), ("mincut", None), *[("budget", b) for b in BUDGETS]]:
            variants.append(Variant(name, impl_name, part, budget))

    # compile every variant first
    for v in variants:
        try:
            if v.impl == "eager":
                v.saved_bytes = eager_saved_bytes(model, inputs, params)
                v.saved_bytes_all = v.saved_bytes
                v.saved_view_bytes = 0
                continue
            impl = impls[v.impl]
            if impl is None:
                raise torch_error
            t0 = time.perf_counter()
            compile_variant(v, impl, model, inputs, params, inductor, decomps, cuda)
            print(f"  compiled {name} {v.impl} {v.partitioner} {v.budget} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            v.fail("compile", e)
            print(f"  {name} {v.impl} {v.partitioner} {v.budget}: {v.error}", flush=True)
            if not isinstance(e, (RuntimeError, AssertionError, NotImplementedError, TypeError)):
                traceback.print_exc()

    time_variants(variants, inputs, params, cuda, repeats)
    clear_grads(params)
    for v in variants:
        v.fn = None  # let compiled graphs go before the next model
    return variants


# ---------------------------------------------------------------- report

def to_row(v: Variant) -> dict:
    row = {"model": v.model, "impl": v.impl, "partitioner": v.partitioner, "budget": v.budget,
           "saved_bytes": v.saved_bytes, "step_ms": statistics.median(v.times) if v.times else None,
           "peak_bytes": v.peak_bytes, "saved_bytes_all": v.saved_bytes_all,
           "saved_view_bytes": v.saved_view_bytes}
    if v.error is not None:
        row["error"] = v.error
    return row


def print_table(rows: list[dict], header: str) -> None:
    def mb(x):
        return "-" if x is None else f"{x / 1e6:.1f}"

    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    def ratio(a, b):
        return "" if a is None or not b else f"{a / b:.2f}"

    torch_rows = {(r["model"], r["partitioner"], r["budget"]): r for r in rows if r["impl"] == "torch"}
    print(header)
    cols = (f"{'model':<12} {'impl':<8} {'partitioner':<11} {'budget':>6} {'saved MB':>9} "
            f"{'all MB':>8} {'views MB':>8} {'step ms':>9} {'peak MB':>8} {'saved a/t':>9} {'step a/t':>8}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        sr = tr = ""
        if r["impl"] == "aotgrad":
            t = torch_rows.get((r["model"], r["partitioner"], r["budget"]))
            if t is not None:
                sr = ratio(r["saved_bytes"], t["saved_bytes"])
                tr = ratio(r["step_ms"], t["step_ms"])
        line = (f"{r['model']:<12} {r['impl']:<8} {r['partitioner']:<11} {budget:>6} "
                f"{mb(r['saved_bytes']):>9} {mb(r['saved_bytes_all']):>8} {mb(r['saved_view_bytes']):>8} {ms(r['step_ms']):>9} "
                f"{mb(r['peak_bytes']):>8} {sr:>9} {tr:>8}")
        if "error" in r:
            line += f"  ERROR {r['error']}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, help="timed steps per row (default 10 on CPU, 20 on CUDA)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameters and inputs (default float32)")
    ap.add_argument("--compiler", choices=("auto", "nop", "inductor"), default="auto",
                    help="auto: nop on CPU, inductor (compile_fx_inner) on CUDA")
    ap.add_argument("--recompute-cost", choices=("roofline", "profiled"), default="roofline",
                    help="how aotgrad prices recomputation under a budget (default: roofline)")
    args = ap.parse_args()
    global RECOMPUTE_COST
    RECOMPUTE_COST = args.recompute_cost
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    repeats = args.repeats or (20 if cuda else 10)
    inductor = args.compiler == "inductor" or (args.compiler == "auto" and cuda)
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())

    rows: list[dict] = []
    for name in args.models:
        print(f"{name}:", flush=True)
        try:
            variants = run_model(name, args.device, dtype, repeats, inductor)
        except Exception as e:  # noqa: BLE001 - building the model itself failed
            traceback.print_exc()
            variants = [Variant(name, "eager", "default", None)]
            variants[0].fail("build", e)
        rows.extend(to_row(v) for v in variants)

    compiler = "inductor" if inductor else "nop"
    print()
    print_table(rows, f"{args.device} ({device_name}), torch {torch.__version__}, {args.dtype}, "
                      f"compiler {compiler}, median of {repeats} steps; a/t = aotgrad/torch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name,
                       "torch_version": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
