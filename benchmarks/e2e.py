"""Training Hugging Face models end to end: eager vs torch.compile vs aotgrad's inductor backend.

Two decoder-only models built from ``transformers`` configs with random
weights: a Llama-shaped one (grouped-query attention, RMSNorm, SwiGLU, RoPE)
and a GPT-2-shaped one (LayerNorm, GELU, dropout 0.1 everywhere, learned
positions), by default 8 layers, d=1024, 16 heads (Llama: 4 KV heads), seq 1024,
batch 8, bf16, on CUDA.  One training step is ``zero_grad(set_to_none=True)``,
forward with labels (the loss is the model's own cross entropy) and
``loss.backward()``; no optimizer (it would add the same time to every column).

Variants, each timed on the same model weights:

* ``eager``;
* ``torch``   — ``torch.compile(model)`` (torch's inductor stack);
* ``aotgrad`` — ``torch.compile(model, backend=aotgrad.backends.inductor)``;
* with ``--reduce-overhead`` also ``torch-ro`` / ``aotgrad-ro``: the same with
  ``mode="reduce-overhead"`` (CUDA graph trees).

Figures: ``first_s`` — wall seconds of the first step (tracing and compiling
included); ``step_ms`` — median of ``--steps`` steps after ``--warmup`` more;
``peak_mib`` — ``torch.cuda.max_memory_allocated`` over the timed steps (weights,
gradients and activations).  The ratio columns are against ``torch`` (or
``torch-ro``) for the same model.

Every variant runs in its own child process with fresh, empty inductor and
Triton cache directories: a compiled variant would otherwise reuse the kernels
(and FX graph cache entries) another variant compiled, and its first step
would be warm.  The parent prints the table and, with ``--json PATH``, writes
the rows.

    python benchmarks/e2e.py [--models llama gpt2] [--variants eager torch aotgrad]
        [--reduce-overhead] [--layers 8] [--dim 1024] [--seq 1024] [--batch 8]
        [--steps 20] [--json PATH] [--device cuda|cpu] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("eager", "torch", "aotgrad")
RO_VARIANTS = ("torch-ro", "aotgrad-ro")


def build(name: str, args):
    import torch
    import transformers
    heads = max(1, args.dim // 64)
    if name == "llama":
        config = transformers.LlamaConfig(
            hidden_size=args.dim, intermediate_size=args.dim * 11 // 4,
            num_hidden_layers=args.layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
            max_position_embeddings=args.seq, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    elif name == "gpt2":
        config = transformers.GPT2Config(
            n_embd=args.dim, n_layer=args.layers, n_head=heads, n_positions=args.seq,
            vocab_size=args.vocab, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise SystemExit(f"unknown model {name!r}: choose llama or gpt2")
    dtype = getattr(torch, args.dtype)
    return model.to(device=args.device, dtype=dtype).train()


def run_variant(args) -> dict:
    """One variant of one model (in a child process): its figures."""
    import torch
    import aotgrad

    device = args.device
    torch.manual_seed(0)
    model = build(args.model, args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    variant = args.variant
    mode = "reduce-overhead" if variant.endswith("-ro") else None
    if variant == "eager":
        run = model
    elif variant.startswith("torch"):
        run = torch.compile(model, mode=mode)
    else:
        run = torch.compile(model, backend=aotgrad.backends.inductor, mode=mode)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        if mode is not None:
            torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float().item()

    sync()
    start = time.perf_counter()
    first_loss = step()
    sync()
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"model": args.model, "variant": variant, "first_s": round(first_s, 2),
            "step_ms": round(statistics.median(times), 2), "peak_mib": peak and round(peak),
            "first_loss": round(first_loss, 4)}


def child(args) -> dict:
    """Run one variant in a fresh process with empty compile caches."""
    with tempfile.TemporaryDirectory(prefix="e2e-cache-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        cmd = [sys.executable, __file__, "--child", "--model", args.model,
               "--variant", args.variant, *_shape_flags(args)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"--- {args.model} {args.variant} failed:\n{tail}", file=sys.stderr)
        return {"model": args.model, "variant": args.variant, "error": tail.splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shape_flags(args) -> list[str]:
    return ["--layers", str(args.layers), "--dim", str(args.dim), "--seq", str(args.seq),
            "--batch", str(args.batch), "--vocab", str(args.vocab), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]


def table(rows: list[dict]) -> str:
    by = {(r["model"], r["variant"]): r for r in rows}
    lines = ["| model | variant | first step s | step ms | peak MiB | first / torch | step / torch "
             "| peak / torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        ref = by.get((r["model"], "torch-ro" if r["variant"].endswith("-ro") else "torch"), {})

        def ratio(key):
            if r["variant"] == "eager" and key == "first_s":
                return ""
            a, b = r.get(key), ref.get(key)
            return f"{a / b:.2f}" if a and b else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['first_s']} | {r['step_ms']} | "
                     f"{r['peak_mib']} | {ratio('first_s')} | {ratio('step_ms')} | "
                     f"{ratio('peak_mib')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--reduce-overhead", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_variant(args)))
        return
    variants = list(args.variants) + (list(RO_VARIANTS) if args.reduce_overhead else [])
    rows = []
    for model in args.models:
        for variant in variants:
            args.model, args.variant = model, variant
            rows.append(child(args))
            print(rows[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        import torch
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else
                platform.processor(), "argv": sys.argv[1:]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
