"""Token splitting: training sequences with other segmentations of the same text.

A byte-level BPE builds every token but the 256 bytes (and special tokens) by one merge of two
tokens. Splitting a token into that merge's two tokens keeps the text the same and changes how it
is segmented. With `TokenSplitter(prob=p)` every training token is split with probability p, and
the two tokens a split makes are split again with probability p each (down to bytes at most), as
StochasTok (Sims et al., 2025) does; BPE-dropout (Provilkov et al., 2020) reaches similar
segmentations by skipping merges while encoding. On a small corpus trained for many epochs the
model then meets the same text in new token sequences instead of memorising one, while
validation and every other use of the model keep the canonical segmentation.

The draws come from a generator seeded by the run's seed and the batch's position, so a resumed
run sees exactly the sequences an uninterrupted one would (`corpus.batches.EpochBatches`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from corpus.encoders import EncoderError, gpt2_vocab_and_merges, load_encoder
from corpus.shards import DataError

__all__ = ["TokenSplitter", "has_merges", "merge_parents"]

MAX_DEPTH = 16  # split levels per batch (a level only splits the tokens the one before made)


def _parents_from(vocab: dict[str, int], merges: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    size = max(vocab.values()) + 1
    left = np.full(size, -1, dtype=np.int64)
    right = np.full(size, -1, dtype=np.int64)
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        child = vocab.get(a + b)
        if child is None or a not in vocab or b not in vocab:
            raise DataError(f"{where}: the merge {a!r} + {b!r} names a token missing from the "
                            "vocabulary; the tokenizer files are damaged")
        if left[child] < 0:  # the first merge that makes a token is the one that made it
            left[child], right[child] = vocab[a], vocab[b]
    return left, right


def merge_parents(tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    """For every token id, the two token ids whose merge made it (-1 for bytes, special tokens
    and ids no merge makes).

    Args:
        tokenizer: "gpt2" (the bundled files) or a tokenizer folder with a BPE `tokenizer.json`.

    Returns:
        (left, right): int64 arrays indexed by token id.

    Raises:
        DataError: the tokenizer is not a BPE with merges (one line, saying so).
    """
    if tokenizer == "gpt2":
        return _parents_from(*gpt2_vocab_and_merges(), "gpt2")
    try:
        enc = load_encoder(tokenizer)
    except EncoderError as exc:
        raise DataError(str(exc)) from None
    model = json.loads(enc._impl.to_str())["model"] if enc._kind == "tokenizers" else {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise DataError(f"--split_tokens needs a BPE tokenizer with merges; {tokenizer!r} is "
                        f"{model.get('type') or 'not one'} (use --split_tokens 0)")
    return _parents_from(model["vocab"], model["merges"], str(Path(tokenizer)))


def has_merges(tokenizer: str) -> bool:
    """Whether `merge_parents` can split this tokenizer's tokens (a BPE with merges)."""
    try:
        merge_parents(tokenizer)
    except DataError:
        return False
    return True


class TokenSplitter:
    """Splits tokens of training rows into the tokens of the merge that made them.

    Args:
        left, right: `merge_parents`' arrays.
        prob: the probability of splitting each token, and each token a split makes, in [0, 1).
    """

    def __init__(self, left: np.ndarray, right: np.ndarray, prob: float) -> None:
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"the split probability must be in [0, 1), got {prob}")
        self.left, self.right, self.prob = left, right, prob

    @classmethod
    def for_tokenizer(cls, tokenizer: str, prob: float) -> TokenSplitter:
        """The splitter of a tokenizer ("gpt2" or a folder); see `merge_parents`."""
        return cls(*merge_parents(tokenizer), prob)

    def reachable(self, seen: np.ndarray) -> np.ndarray:
        """`seen` (a (V,) bool mask of token ids) with every id a split can make from them."""
        out = np.array(seen, dtype=bool)
        n = min(len(out), len(self.left))
        while True:
            ids = np.flatnonzero(out[:n] & (self.left[:n] >= 0))
            parts = np.concatenate([self.left[ids], self.right[ids]])
            parts = parts[parts < len(out)]
            if out[parts].all():
                return out
            out[parts] = True

    def describe(self) -> str:
        """What the splitter does, in words (the run's opening lines and `--explain`)."""
        return (f"each token split into the two tokens of its BPE merge with probability "
                f"{self.prob}, each part again (--split_tokens)")

    def split_row(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`row` (1-D token ids) with tokens split, cut back to its length: the same text from
        its start, in as many tokens, so it ends earlier in the text."""
        length = len(row)
        tokens = np.asarray(row, dtype=np.int64)
        eligible = tokens < len(self.left)  # ids beyond the merges' vocabulary never split
        for _ in range(MAX_DEPTH):
            ids = np.where(eligible, tokens, 0)
            hit = eligible & (self.left[ids] >= 0) & (rng.random(len(tokens)) < self.prob)
            if not hit.any():
                break
            counts = 1 + hit
            out = np.repeat(tokens, counts)
            first = np.cumsum(counts) - counts  # where each token (or its left half) lands
            at = first[hit]
            out[at], out[at + 1] = self.left[tokens[hit]], self.right[tokens[hit]]
            eligible = np.zeros(len(out), dtype=bool)
            eligible[at] = eligible[at + 1] = True
            tokens, eligible = out[:length], eligible[:length]
        return tokens

    def split_rows(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Every row of a (B, L) array split (`split_row`), as a new (B, L) int64 array."""
        if self.prob == 0.0:
            return np.asarray(rows, dtype=np.int64)
        return np.stack([self.split_row(r, rng) for r in rows])
