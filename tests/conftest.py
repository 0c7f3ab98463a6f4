"""Fixtures of tests/: a tiny random-weight checkpoint and an offline Hugging Face cache.

The tiny model's config (`tiny_config`) is in the repo root's conftest.py, shared with test_lm.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model.lm import LanguageModel
from model.tokenizer import BUNDLED_GPT2_DIR

REPO = Path(__file__).resolve().parent.parent

def save_tiny_checkpoint(path: Path, config: dict, **overrides) -> Path:
    """Write a checkpoint in the trainer's format holding a random-weight tiny model (seeded);
    `overrides` change entries of `config`."""
    torch.manual_seed(1234)
    model = LanguageModel(**{**config, **overrides})
    torch.save({
        "model_config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
        "step": 10, "epoch": 0, "val_loss": 10.5, "val_ppl": 36315.5, "best_val_loss": 10.5,
        "tokenizer": "gpt2",
    }, path)
    return path


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tiny_config):
    """`save_tiny_checkpoint(path, **overrides)` of the tiny config, for fixtures that need a
    variant of the tiny checkpoint."""
    return lambda path, **overrides: save_tiny_checkpoint(path, tiny_config, **overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, make_tiny_checkpoint) -> Path:
    """A checkpoint file in the trainer's format holding a random-weight tiny model."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """An HF_HOME holding only the 'gpt2' tokenizer, built from the bundled files.

    Point HF_HOME at it (with HF_HUB_OFFLINE=1) so `GPT2Tokenizer.from_pretrained("gpt2")` works
    offline; nothing is set globally.
    """
    home = tmp_path_factory.mktemp("hf-home")
    commit = "0" * 40
    repo = home / "hub" / "models--gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(BUNDLED_GPT2_DIR / name, snap / name)
    (snap / "config.json").write_text(
        '{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, '
        '"n_layer": 12, "n_head": 12, "eos_token_id": 50256, "bos_token_id": 50256}'
    )
    return home


@pytest.fixture(scope="session")
def endless_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny model that never samples end-of-text: its final hidden state is constant (ones)
    and the end-of-text embedding points away from it, so generation always runs to the limit."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    sd = dict(ckpt["model_state_dict"])
    sd["transformer.ln_f.weight"] = torch.zeros_like(sd["transformer.ln_f.weight"])
    sd["transformer.ln_f.bias"] = torch.ones_like(sd["transformer.ln_f.bias"])
    wte = sd["transformer.wte.weight"].clone()
    wte[50256] = -1.0
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = wte
    path = tmp_path_factory.mktemp("endless") / "endless.pt"
    torch.save({**ckpt, "model_state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread: tiny models gain nothing from threads, and on
    a busy machine OpenMP's spinning threads multiply the CPU time (0.9 s vs 11.6 s of CPU
    measured for a tiny training fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
