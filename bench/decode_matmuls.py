"""Where a decode step's time goes, per weight format: the matrix products vs everything else.

Run: python bench/decode_matmuls.py          (CPU; about a minute)

Decoding one token multiplies a few rows by every weight matrix once (the blocks' four
projections per layer, then the LM head), so at batch 1 its matrix products are bounded by how
fast the weights stream from memory. For each case of `bench/generation.py` this prints, per
weight format of ours (`--quantize`: float32 oneDNN-packed copies, bf16, int8) and for Hugging
Face's GPT-2 modules on the same weights (float32 `Conv1D` + LM head, what its `generate` runs):

- matmul ms: one token's products alone (every `Linear` of the model on a (rows, in) input, in
  the order decoding runs them), averaged over --passes passes in a row: the first products
  after another format's run slower (by up to ~10 ms on the Xeon of the recorded run);
- GB/s: the weight bytes of one token over that time;
- step ms: one whole decode step of ours (`generate`, 200 tokens, top-p 0.9, per token), so
  step - matmul is everything else (attention, LayerNorms, per-op overhead, sampling).

The first line measures the memory read bandwidth this process gets (`sum` over 512 MiB), the
bound the products approach. All timings alternate in the same rounds (best of --repeats).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bandwidth import our_token_bytes, read_bandwidth  # noqa: E402
from generation import CASES, build, timed  # noqa: E402

from model.lm import Linear  # noqa: E402
from model.quant import FORMATS  # noqa: E402


def matmul_pass(modules: list[nn.Module], rows: int, times: int):
    """A function running every module `times` times over, each on a (rows, in_features)
    float32 input (many passes per call: the first products after another format's are slow)."""
    inputs = []
    for m in modules:
        n_in = m.in_features if hasattr(m, "in_features") else m.weight.size(0)  # Conv1D: (in, out)
        inputs.append(torch.randn(rows, n_in))

    def run() -> None:
        with torch.no_grad():
            for _ in range(times):
                for m, x in zip(modules, inputs, strict=True):
                    m(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="default,gpt2-124M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new_tokens", type=int, default=200)
    ap.add_argument("--passes", type=int, default=20, help="matmul passes per timed call")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    print(f"{torch.get_num_threads()} threads; torch {torch.__version__}; memory read bandwidth "
          f"{read_bandwidth(args.repeats):.1f} GB/s (sum over 512 MiB)")
    print(f"{'case':<11}{'batch':>6}{'weights':>9}{'MB/token':>10}{'matmul ms':>11}{'GB/s':>7}"
          f"{'step ms':>9}{'other ms':>10}")
    for case in args.cases.split(","):
        cfg, batches = CASES[case]
        ours, hf = build(cfg, cpu, torch.float32)
        models = {}
        for fmt in FORMATS:
            models[fmt] = ours if fmt == "none" else copy.deepcopy(ours)
            models[fmt].quantize(fmt)
            models[fmt].setup_cache(max(batches))  # the float32 decode copies, as generation
        hf_modules = [m for m in hf.modules() if isinstance(m, (Conv1D, nn.Linear))]
        hf_bytes = sum(m.weight.numel() * 4 for m in hf_modules)
        for B in batches:
            prompt = torch.randint(0, cfg.vocab_size, (B, 16))
            passes = [matmul_pass([m for m in model.modules() if isinstance(m, Linear)], B,
                                  args.passes) for model in models.values()]
            passes.append(matmul_pass(hf_modules, B, args.passes))
            steps = [lambda model=model, prompt=prompt: model.generate(
                         prompt, max_new_tokens=args.new_tokens, top_p=0.9, seed=0)
                     for model in models.values()]
            times = timed([*passes, *steps], cpu, args.repeats)
            t_mm = [t / args.passes for t in times[:len(passes)]]
            t_step = times[len(passes):]
            for i, fmt in enumerate([*models, "HF"]):
                nbytes = hf_bytes if fmt == "HF" else our_token_bytes(models[fmt], fmt)
                name = {"none": "float32", "HF": "HF fp32"}.get(fmt, fmt)
                step = t_step[i] / args.new_tokens * 1e3 if fmt != "HF" else None
                tail = f"{step:>9.2f}{step - t_mm[i] * 1e3:>10.2f}" if step else ""
                print(f"{case:<11}{B:>6}{name:>9}{nbytes / 1e6:>10.1f}{t_mm[i] * 1e3:>11.2f}"
                      f"{nbytes / t_mm[i] / 1e9:>7.1f}{tail}", flush=True)
        del ours, hf, models


if __name__ == "__main__":
    main()
