"""Paths of files bundled with the repository (no heavy imports: corpus/ and model/ share them)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# OpenAI's GPT-2 byte-level BPE (vocab.json, merges.txt), byte-identical to the released files:
# `model.tokenizer.load_tokenizer("gpt2")` and `corpus.encoders.load_encoder("gpt2")` read it.
BUNDLED_GPT2_DIR = REPO_ROOT / "model" / "assets" / "gpt2"
