#!/usr/bin/env python
"""Generate text from a trained model in Python: the guide's "Full Example", runnable.

    python example_generate.py                      # newest lm_*/ run in this directory
    python example_generate.py lm_shakespeare       # a run directory
    python example_generate.py lm_wikitext/snapshots/latest.pt

It loads the model with the repo's one loader (`model.checkpoint.load_model`: safe
`weights_only` loading, eval mode, device picked automatically), then generates for a single
prompt and for a batch of prompts.
"""

from __future__ import annotations

import sys

import torch

from model.checkpoint import CheckpointError, find_default_checkpoint, load_model
from model.lm import LanguageModel
from model.tokenizer import load_tokenizer

TRAIN_COMMAND = "python training/train_lm.py"


def generate(model: LanguageModel, tokenizer, prompt: str, max_length: int = 100,
             temperature: float = 1.0, top_p: float | None = 0.9, seed: int | None = None) -> str:
    """Generate a continuation of one prompt and return prompt plus continuation as text."""
    prompt_ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long)
    with model:  # eval mode, no gradients, KV cache allocated for the block
        output_ids = model.generate(prompt_ids, max_length=max_length, temperature=temperature,
                                    top_p=top_p, seed=seed)
    return tokenizer.decode(output_ids[0].tolist(), skip_special_tokens=True)


def generate_batch(model: LanguageModel, tokenizer, prompts: list[str], max_length: int = 100,
                   temperature: float = 0.8, top_p: float | None = 0.9,
                   seed: int | None = None) -> list[str]:
    """Generate for several prompts at once; prompts of different lengths are fine."""
    prompt_ids = [tokenizer.encode(p) for p in prompts]  # ragged: padded inside generate
    with model:
        output = model.generate(prompt_ids, max_length=max_length, temperature=temperature,
                                top_p=top_p, seed=seed)
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in output]


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else find_default_checkpoint(".")
    if path is None:
        print(f"No trained model found (no lm_*/snapshots/ here). Train one first:\n"
              f"    {TRAIN_COMMAND}\n"
              f"then run: python example_generate.py", file=sys.stderr)
        return 2

    tokenizer = load_tokenizer("gpt2")  # bundled copy; pad_token = eos_token as in the guide
    try:
        model, checkpoint = load_model(path, device="auto", tokenizer=tokenizer)
    except CheckpointError as exc:  # one-line reason: missing, corrupt, unsafe, mismatched...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bpb = checkpoint.get("val_bpb")  # bits per byte: comparable across tokenizers
    print(f"Loaded {checkpoint['_path']} (step {checkpoint.get('step', '?')}, "
          f"val_loss {checkpoint.get('val_loss', '?')}"
          f"{'' if bpb is None else f', {bpb:.3f} bits/byte'}) on {model.device}")
    # The loader already set model.end_token = tokenizer.eos_token_id and model.tokenizer.

    budget = min(100, model.max_seq_len)  # max_length counts the prompt too
    print("\n== Single prompt ==")
    print(generate(model, tokenizer, "The future of technology", max_length=budget,
                   temperature=0.8, top_p=0.9, seed=0))

    prompts = ["The history of computers", "Once upon a time", "In the future, we will"]
    print("\n== Batch ==")
    for i, text in enumerate(generate_batch(model, tokenizer, prompts, max_length=budget,
                                            seed=0), start=1):
        print(f"\nPrompt {i}: {prompts[i - 1]}\nGenerated: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
