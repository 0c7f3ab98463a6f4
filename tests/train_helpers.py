"""Shared bits of the training tests (tiny text files, tiny-model flags).

Test files import this module as `train_helpers` (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_WORDS = ("the king queen lord lady sword crown night day love death honour sweet fair "
          "good noble heart blood tears fortune grace heaven earth thee thou art hath doth "
          "speak come go well now here there what why when shall will not").split()


def write_text(path: Path, words: int, seed: int = 0) -> Path:
    """A deterministic pseudo-Shakespeare text of about `words` words, in short lines."""
    rng = random.Random(seed)
    lines = []
    while words > 0:
        n = min(words, rng.randint(4, 10))
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_flags(tmp: Path, *extra: str, words: int = 3000) -> list[str]:
    """Flags for a seconds-long run on tiny text in `tmp` (files created once)."""
    train, val = tmp / "train.txt", tmp / "val.txt"
    if not train.exists():
        tmp.mkdir(parents=True, exist_ok=True)
        write_text(train, words, seed=1)
        write_text(val, 600, seed=2)
    return ["--train_file", str(train), "--val_file", str(val), "--out_dir", str(tmp / "run"),
            "--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
            "--max_seq_len", "32", "--batch_size", "4", "--eval_windows", "8",
            "--warmup_steps", "2", "--lr", "3e-3", "--dropout", "0", "--no_plot", *extra]
