"""Generation speed: our KV-cached decoder vs Hugging Face GPT2LMHeadModel.generate, same weights.

Run: python bench/generation.py            (CPU: the figures in docs/benchmarks.md)
     python bench/generation.py --cases smollm2-135M --skip_window --skip_quality --dtype bfloat16
     python bench/generation.py --quality_run lm_shakespeare   (reuse a trained run for quality)
     python bench/generation.py --device cuda --dtype bfloat16 --compile   (a GPU)

Cases: our default config and GPT-2 124M's shape (Hugging Face's GPT2LMHeadModel), and
SmolLM2-135M's shape (random weights: 30 layers of 576, 9 query heads sharing 3 key/value heads,
RoPE, RMSNorm, SwiGLU, a 49,152-token vocabulary; Hugging Face's LlamaForCausalLM, context cut
to 2,048 positions for both), whose KV cache is also measured next to what full multi-head
attention would hold. For each case both models get the same random weights, the same prompt
and the same sampling settings (top-p 0.9, temperature 1.0, no end token), and produce the same
number of tokens. On CPU our model runs once per weight format (`--quantize`: float32, bf16,
int8), each next to HF in float32 in the same rounds. Also prints a nanoGPT-style uncached
sampler (full forward per token, same weights, float32) and our speed beyond the context window
(sliding window) next to the speed inside it.

Quality of the formats, on a trained model (the demo preset, trained here in ~3 minutes on 2
cores unless `--quality_run` names a run or checkpoint): validation perplexity with
`evaluate_lm.py --quantize` and its change against float32, and greedy agreement with float32:
the share of positions where the format's top choice is float32's, on float32's greedy
continuations (`--agree_tokens` in all, teacher-forced so that one early difference does not
decide the rest), and how many of the format's own greedy continuations are identical.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate_lm  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.config import architecture_fields  # noqa: E402
from model.hf_interop import config_to_hf, state_dict_to_hf  # noqa: E402
from model.lm import LanguageModel, LMConfig  # noqa: E402
from model.quant import FORMATS, check_format  # noqa: E402
from model.sampling import sample  # noqa: E402

CASES = {
    "default": (LMConfig(dropout=0.0), [1, 8]),
    "gpt2-124M": (LMConfig(d_model=768, num_heads=12, num_layers=12, d_ff=3072,
                           max_seq_len=1024, dropout=0.0), [1]),
    # SmolLM2-135M's config.json, context cut to 2,048 (its KV cache at 8,192 is 4x as large)
    "smollm2-135M": (LMConfig(vocab_size=49152, d_model=576, num_heads=9, num_layers=30,
                              d_ff=1536, max_seq_len=2048, dropout=0.0, rope_base=100000.0,
                              **architecture_fields("llama", num_kv_heads=3)), [1, 8]),
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
    """Our model with random weights, and Hugging Face's own class for it with the same weights."""
    torch.manual_seed(0)
    ours = LanguageModel.from_config(cfg).eval()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(config_to_hf(cfg)).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg),
                                             strict=False)
    # only GPT-2's attention-mask buffers may be absent from our weights
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing,
                                                                               unexpected)
    return ours.to(device, dtype), hf.to(device, dtype)


def kv_cache_line(model: LanguageModel, B: int) -> str:
    """Bytes of our KV cache for B rows at the full context, next to full multi-head
    attention's (every query head with its own keys and values)."""
    cfg = model.config
    model.setup_cache(batch_size=B)
    held = sum(b.numel() * b.element_size() for blk in model.transformer.h
               for b in (blk.attn.kv_cache.k, blk.attn.kv_cache.v))
    model.clear_cache()
    full = held * cfg.num_heads // cfg.num_kv_heads
    return (f"KV cache, batch {B}, {cfg.max_seq_len} positions: {held / 2**20:.0f} MiB with "
            f"{cfg.num_kv_heads} key/value heads; full multi-head attention ({cfg.num_heads}): "
            f"{full / 2**20:.0f} MiB ({held / full:.2f} of it)")


@torch.no_grad()
def nanogpt_style(model: LanguageModel, prompt: torch.Tensor, n: int, gen) -> torch.Tensor:
    """The uncached reference: crop to the context, full forward, LM head on the last position."""
    idx = prompt
    for _ in range(n):
        logits = model.forward_cached(idx[:, -model.max_seq_len:], last_only=True)[:, -1].float()
        idx = torch.cat([idx, sample(logits, 1.0, None, 0.9, gen)[:, None]], dim=1)
    return idx


def bench_case(models: dict, hf, B: int, n: int, args, device: torch.device) -> list[str]:
    """Table rows after the case name and batch, one per weight format: ours, HF, ratio and
    (float32 only) nanoGPT-style, in tok/s. All run alternately in the same rounds."""
    ours = models["none"]
    prompt = torch.randint(0, ours.config.vocab_size, (B, args.prompt_len), device=device)
    mask = torch.ones_like(prompt)

    def run_ours(model):
        return lambda: model.generate(prompt, max_new_tokens=n, top_p=0.9, seed=0,
                                      compile=args.compile)

    def run_hf():
        hf.generate(prompt, attention_mask=mask, do_sample=True, top_p=0.9, top_k=0,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    *t_ours, t_hf = timed([*(run_ours(m) for m in models.values()), run_hf], device,
                          args.repeats)
    nano = ""
    if not args.skip_nanogpt:
        gen = torch.Generator(device=device).manual_seed(0)
        (t_nano,) = timed([lambda: nanogpt_style(ours, prompt, n, gen)], device, 1)
        nano = f"{B * n / t_nano:.0f}"
    rows = []
    for (fmt, _), t in zip(models.items(), t_ours, strict=True):
        name = args.dtype if fmt == "none" else fmt
        rows.append(f"{name:>9}{B * n / t:>12.0f}{B * n / t_hf:>10.0f}{t_hf / t:>7.2f}x"
                    f"{nano if fmt == 'none' else '':>15}")
    return rows


def quality(run: str | None, agree_tokens: int) -> None:
    """Perplexity and greedy agreement of each weight format against float32 (see the top)."""
    with tempfile.TemporaryDirectory() as tmp:
        if run is None:
            run = os.path.join(tmp, "lm_demo")
            print("training the demo preset for the quality rows (about 3 minutes on 2 cores; "
                  "--quality_run PATH reuses a run) ...", flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "training", "train_lm.py"),
                            "--preset", "demo", "--out_dir", run], check=True,
                           stdout=subprocess.DEVNULL)
        ppl = {}
        for fmt in FORMATS:
            args = evaluate_lm.build_parser().parse_args(
                ["--checkpoint", run, "--device", "cpu", "--quantize", fmt,
                 "--cache_dir", os.path.join(tmp, "cache")])
            report = evaluate_lm.run(args)
            ppl[fmt] = report["perplexity"]
        models = {fmt: load_model(run, device="cpu", quantize=fmt)[0] for fmt in FORMATS}
    print(f"quality: {report['checkpoint']}, {report['data']}; greedy agreement with float32 "
          f"over {agree_tokens} tokens")
    ref = models["none"]
    W = ref.max_seq_len
    n_prompts = 3
    per = max(1, min(agree_tokens // n_prompts, W - 8))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, ref.config.vocab_size, (8,), generator=g).tolist()
               for _ in range(n_prompts)]
    seqs = [ref.generate(p, max_new_tokens=per, temperature=0)[0] for p in prompts]
    print(f"{'weights':>8}{'perplexity':>12}{'change':>9}{'agreement':>11}{'identical':>11}")
    for fmt, model in models.items():
        agree, same = 0, 0
        with torch.no_grad():
            for p, seq in zip(prompts, seqs, strict=True):
                want = ref(seq[None, :-1])[0, len(p) - 1:].argmax(-1)  # (per,)
                got = model(seq[None, :-1])[0, len(p) - 1:].argmax(-1)
                agree += int((got == want).sum())
                own = model.generate(p, max_new_tokens=per, temperature=0)[0]
                same += int(torch.equal(own, seq))
        name = "float32" if fmt == "none" else fmt
        change = f"{100 * (ppl[fmt] / ppl['none'] - 1):+.2f}%"
        print(f"{name:>8}{ppl[fmt]:>12.3f}{change:>9}{100 * agree / (per * n_prompts):>10.1f}%"
              f"{f'{same}/{n_prompts}':>11}")


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
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="our weight formats (--quantize) on CPU in float32 (default: all)")
    ap.add_argument("--quality_run", metavar="PATH",
                    help="trained run directory or checkpoint for the quality rows (default: "
                         "train the demo preset in a temporary folder)")
    ap.add_argument("--agree_tokens", type=int, default=300,
                    help="greedy tokens compared with float32 (default: 300)")
    ap.add_argument("--skip_quality", action="store_true")
    ap.add_argument("--skip_window", action="store_true", help="skip the sliding-window line")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    formats = [f.strip() for f in args.formats.split(",")]
    for fmt in formats:
        check_format(fmt)
    if device.type != "cpu" or args.dtype != "float32":
        formats = ["none"]  # the formats are CPU weight copies made from float32 weights
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; dtype {args.dtype}; "
          f"{args.new_tokens} new tokens, prompt {args.prompt_len}, top-p 0.9; best of "
          f"{args.repeats}{'; compiled decode' if args.compile else ''}")
    print(f"{'case':<12}{'batch':>6}{'weights':>9}{'ours tok/s':>12}{'HF tok/s':>10}"
          f"{'ratio':>8}{'nanoGPT-style':>15}   (HF: {args.dtype} weights)")
    n = args.new_tokens
    for case in args.cases.split(","):
        cfg, batches = CASES[case]
        ours, hf = build(cfg, device, dtype)
        models = {"none": ours}
        for fmt in formats:
            if fmt != "none":
                models[fmt] = copy.deepcopy(ours)
                models[fmt].quantize(fmt)
        for B in batches:
            for row in bench_case(models, hf, B, n, args, device):
                print(f"{case:<12}{B:>6}" + row, flush=True)
        if ours.config.num_kv_heads != ours.config.num_heads:
            print(f"{case}: " + kv_cache_line(ours, max(batches)), flush=True)
        del ours, hf, models

    if not args.skip_window:
        sliding_window(args, device, dtype)
    if not args.skip_quality and device.type == "cpu":
        quality(args.quality_run, args.agree_tokens)


def sliding_window(args, device: torch.device, dtype: torch.dtype) -> None:
    """Tokens/s for the steps inside the context vs the steps beyond it (default config)."""
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
