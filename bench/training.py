#!/usr/bin/env python
"""Training-step throughput: our step vs a plain fp32 eager step of the same network, same run.

The reference is what a straightforward PyTorch loop does (nanoGPT's loop on a CPU): fp32, eager,
`loss = model(x, y)[1]` over the full logits, `loss.backward()`, gradient clipping, AdamW with
PyTorch's default implementation. Ours is `training.step.train_step` exactly as `train_lm.py`
runs it: bf16 autocast where the hardware has it, the fused chunked LM-head + cross-entropy, fused
AdamW (and `torch.compile` with --compile). Both start from the same weights and see the same
batches; steps are timed alternately so that a change in machine load hits both.

    python bench/training.py                  # CPU default: nanoGPT's Shakespeare config
    python bench/training.py --iters 20       # steadier figures (run on a quiet machine)
    python bench/training.py --device cuda    # GPU default: GPT-2 124M, plus --compile

MFU = model FLOPs per second / peak: 6 x parameters (without position embeddings; the tied LM
head counts) + 12 x layers x d_model x context per token, as in nanoGPT and PaLM. The peak is the
card's bf16 dense datasheet figure on known GPUs, else a large bf16 matrix product measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.record import machine  # noqa: E402
from model.lm import LanguageModel  # noqa: E402
from training.fused_loss import TrainingModule  # noqa: E402
from training.mfu import GPU_PEAKS, flops_per_token  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.options import DTYPE_NAMES, resolve_dtype  # noqa: E402
from training.step import autocast_context, train_step  # noqa: E402

CONFIGS = {
    # nanoGPT's train_shakespeare setup at 4 layers (the figures in docs/benchmarks.md).
    "nanogpt": dict(model=dict(d_model=256, num_heads=4, num_layers=4, d_ff=1024,
                               max_seq_len=256, dropout=0.0), batch_size=8),
    "gpt2-124m": dict(model=dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072,
                                 max_seq_len=1024, dropout=0.0), batch_size=16),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given with --peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS:
            if key in name:
                return value, f"{name} bf16 dense datasheet peak"
    value = measured_matmul_tflops(device, torch.bfloat16)
    return value, "a bf16 2048^3 matrix product measured here (practical peak)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{machine()}, {torch.get_num_threads()} threads"


def reference_step(model, optimizer, x, y, device):
    if device.type == "cuda":  # plain fp32: no TF32 tensor cores either
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="default: nanogpt on CPU, gpt2-124m on CUDA")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--iters", type=int, default=5, help="timed steps of each (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="our step's autocast dtype (auto: as train_lm.py picks)")
    p.add_argument("--compile", action="store_true",
                   help="also time our step with torch.compile (default on CUDA)")
    p.add_argument("--no_compile", action="store_true", help="never time a compiled step")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for MFU (TFLOP/s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    config_name = args.config or ("gpt2-124m" if device.type == "cuda" else "nanogpt")
    spec = CONFIGS[config_name]
    batch = args.batch_size or spec["batch_size"]
    seq = spec["model"]["max_seq_len"]
    amp = resolve_dtype(args.dtype, device)
    do_compile = (args.compile or device.type == "cuda") and not args.no_compile

    torch.manual_seed(0)
    ref_model = LanguageModel(**spec["model"]).to(device)
    fpt = flops_per_token(ref_model)
    tokens = batch * seq
    data = [(torch.randint(0, 50257, (batch, seq), device=device),
             torch.randint(0, 50257, (batch, seq), device=device)) for _ in range(4)]
    ref_opt = torch.optim.AdamW(
        [{"params": [q for q in ref_model.parameters() if q.dim() >= 2], "weight_decay": 0.1},
         {"params": [q for q in ref_model.parameters() if q.dim() < 2], "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95))

    variants = {"reference: fp32 eager, full logits, AdamW": None}

    def make_ours(compiled: bool):
        model = LanguageModel(**spec["model"]).to(device)
        model.load_state_dict(ref_model.state_dict())
        module = TrainingModule(model, fused_head=True, compile_trunk=compiled)
        opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        autocast = autocast_context(device.type, amp)
        params = list(model.parameters())

        def step(x, y):
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True  # as train_lm.py sets it
                torch.backends.cudnn.allow_tf32 = True
            return train_step(module, opt, scaler, [(x, y)], 1, autocast, params, 1.0)
        return step

    ours_name = f"ours: {DTYPE_NAMES[amp]} autocast, fused LM-head loss, fused AdamW"
    variants[ours_name] = make_ours(False)
    if do_compile:
        variants[ours_name + ", torch.compile"] = make_ours(True)
    variants[next(iter(variants))] = lambda x, y: reference_step(ref_model, ref_opt, x, y, device)

    print(f"device: {device_name(device)} | torch {torch.__version__}", flush=True)
    m = spec["model"]
    print(f"config: {config_name} ({m['num_layers']} layers, {m['num_heads']} heads, d_model "
          f"{m['d_model']}, d_ff {m['d_ff']}, context {seq}, vocab 50257), batch {batch} = "
          f"{tokens:,} tokens/step, {ref_model.num_params(non_embedding=False) / 1e6:.1f}M "
          f"parameters, {fpt / 1e6:.0f} MFLOP/token", flush=True)

    first_losses = {}
    for name, step in variants.items():  # warm-up (and compilation), and a same-math check
        for i in range(args.warmup):
            loss = step(*data[i % len(data)])
            if i == 0:
                first_losses[name] = float(loss)
        sync(device)
    times = {name: [] for name in variants}
    for i in range(args.iters):
        for name, step in variants.items():  # alternate, so load changes hit every variant
            sync(device)
            t = time.perf_counter()
            step(*data[i % len(data)])
            sync(device)
            times[name].append(time.perf_counter() - t)

    peak, peak_note = peak_tflops(device, args.peak_tflops)
    ref_time = statistics.median(next(iter(times.values())))
    rows = []
    print(f"\n{'step':<72} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'speedup':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        tflops = fpt * tokens / med / 1e12
        row = dict(step=name, seconds_per_step=med, tokens_per_s=tokens / med, tflops=tflops,
                   mfu=tflops / peak, speedup=ref_time / med, first_loss=first_losses[name],
                   times=ts)
        rows.append(row)
        print(f"{name:<72} {med:8.3f} {row['tokens_per_s']:10,.0f} {tflops:8.2f} "
              f"{row['mfu']:6.1%} {row['speedup']:7.2f}x")
    print(f"\nMFU peak: {peak:.1f} TFLOP/s ({peak_note}). Median of {args.iters} alternating "
          f"steps each after {args.warmup} warm-up steps.")
    print("first-step loss (same weights, same batch): " + ", ".join(
        f"{v:.4f}" for v in first_losses.values()) + " - the same network and loss up to "
        "rounding")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            device=device_name(device), torch=torch.__version__, config=config_name,
            batch_size=batch, tokens_per_step=tokens, flops_per_token=fpt, peak_tflops=peak,
            peak_note=peak_note, iters=args.iters, results=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
