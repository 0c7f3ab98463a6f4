"""Generation speed: our KV-cached decoder vs Hugging Face GPT2LMHeadModel.generate, same weights.

Run: python bench/generation.py            (CPU, fp32: the figures in README.md)
     python bench/generation.py --device cuda --dtype bfloat16 --compile   (a GPU)

For each case both models get the same random weights, the same prompt and the same sampling
settings (top-p 0.9, temperature 1.0, no end token), and produce the same number of tokens. Also
prints a nanoGPT-style uncached sampler (full forward per token, same weights) and our speed
beyond the context window (sliding window) next to the speed inside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.generation import sample  # noqa: E402
from model.hf_interop import config_to_hf, state_dict_to_hf  # noqa: E402
from model.lm import LanguageModel, LMConfig  # noqa: E402

CASES = {
    "default": (LMConfig(dropout=0.0), [1, 8]),
    "gpt2-124M": (LMConfig(d_model=768, num_heads=12, num_layers=12, d_ff=3072,
                           max_seq_len=1024, dropout=0.0), [1]),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device: torch.device, repeats: int) -> list[float]:
    """Best wall time of each function over `repeats` rounds, after one warm-up call each.

    The functions alternate within a round, so a slow spell of a shared machine hits them alike.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def build(cfg: LMConfig, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    ours = LanguageModel.from_config(cfg).eval()
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(config_to_hf(cfg)).eval()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
    return ours.to(device, dtype), hf.to(device, dtype)


@torch.no_grad()
def nanogpt_style(model: LanguageModel, prompt: torch.Tensor, n: int, gen) -> torch.Tensor:
    """The uncached reference: crop to the context, full forward, LM head on the last position."""
    idx = prompt
    for _ in range(n):
        logits = model.forward_cached(idx[:, -model.max_seq_len:], last_only=True)[:, -1].float()
        idx = torch.cat([idx, sample(logits, 1.0, None, 0.9, gen)[:, None]], dim=1)
    return idx


def bench_case(ours, hf, B: int, n: int, args, device: torch.device) -> str:
    """One table row after the case name and batch: ours, HF, ratio, nanoGPT-style (tok/s)."""
    prompt = torch.randint(0, ours.config.vocab_size, (B, args.prompt_len), device=device)
    mask = torch.ones_like(prompt)

    def run_ours():
        ours.generate(prompt, max_new_tokens=n, top_p=0.9, seed=0, compile=args.compile)

    def run_hf():
        hf.generate(prompt, attention_mask=mask, do_sample=True, top_p=0.9, top_k=0,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    t_ours, t_hf = timed([run_ours, run_hf], device, args.repeats)
    nano = ""
    if not args.skip_nanogpt:
        gen = torch.Generator(device=device).manual_seed(0)
        (t_nano,) = timed([lambda: nanogpt_style(ours, prompt, n, gen)], device, 1)
        nano = f"{B * n / t_nano:.0f}"
    return f"{B * n / t_ours:>12.0f}{B * n / t_hf:>10.0f}{t_hf / t_ours:>7.2f}x{nano:>15}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--new_tokens", type=int, default=200)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="our compiled static decode step")
    ap.add_argument("--cases", default="default,gpt2-124M")
    ap.add_argument("--skip_nanogpt", action="store_true")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; dtype {args.dtype}; "
          f"{args.new_tokens} new tokens, prompt {args.prompt_len}, top-p 0.9; best of "
          f"{args.repeats}{'; compiled decode' if args.compile else ''}")
    print(f"{'case':<12}{'batch':>6}{'ours tok/s':>12}{'HF tok/s':>10}{'ratio':>8}"
          f"{'nanoGPT-style':>15}")
    n = args.new_tokens
    for case in args.cases.split(","):
        cfg, batches = CASES[case]
        ours, hf = build(cfg, device, dtype)
        for B in batches:
            print(f"{case:<12}{B:>6}" + bench_case(ours, hf, B, n, args, device), flush=True)
        del ours, hf

    # Sliding window: tokens/s for the steps inside the context vs the steps beyond it.
    cfg = CASES["default"][0]
    ours, _ = build(cfg, device, dtype)
    W, total = cfg.max_seq_len, 3 * cfg.max_seq_len
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    stamps = []
    for tok in ours.stream(prompt, max_new_tokens=total, top_p=0.9, seed=0):
        tok.tolist()
        stamps.append(time.perf_counter())
    inside = W - args.prompt_len
    rate_in = (inside - 10) / (stamps[inside - 1] - stamps[9])
    rate_out = (total - inside - 1) / (stamps[-1] - stamps[inside])
    print(f"sliding window (default config, batch 1, streamed): {rate_in:.0f} tok/s inside the "
          f"{W}-token context, {rate_out:.0f} tok/s beyond it ({rate_in / rate_out:.2f}x slower)")


if __name__ == "__main__":
    main()
