"""The sliding windows that score a text longer than the model's context.

One windowing rule for the whole repo: `evaluate_lm.py` (through `training.evaluation`) and
`model.scoring` both walk these windows. It is Hugging Face's "perplexity of fixed-length
models" loop: windows of up to `seq_len` tokens start every `stride` tokens; each window scores
only the targets that no earlier window scored, so every token is scored once, with up to
`seq_len - stride` tokens of context:

    window k covers tokens [k*stride, min(k*stride + seq_len, N)) and scores the targets
    t with prev_end <= t < end and t > begin (a token needs at least one token of context).

With `stride == seq_len` the windows do not overlap and the first token of each window goes
unscored, exactly as in Hugging Face's loop. The last window ends at the end of the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator


def count_windows(num_tokens: int, seq_len: int, stride: int) -> int:
    """Number of windows Hugging Face's loop visits over `num_tokens` tokens."""
    if num_tokens <= seq_len:
        return 1
    return 1 + math.ceil((num_tokens - seq_len) / stride)


def window_bounds(k: int, num_tokens: int, seq_len: int, stride: int) -> tuple[int, int, int]:
    """Return (begin, end, first_scored) of window `k`: it scores targets first_scored..end-1."""
    begin = k * stride
    end = min(begin + seq_len, num_tokens)
    prev_end = 0 if k == 0 else min(begin - stride + seq_len, num_tokens)
    return begin, end, max(prev_end, begin + 1)


def iter_windows(num_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Every window's `window_bounds`, in order."""
    for k in range(count_windows(num_tokens, seq_len, stride)):
        yield window_bounds(k, num_tokens, seq_len, stride)


def resolve_window(seq_len: int | None, stride: int | None, max_len: int) -> tuple[int, int]:
    """Fill in the defaults (seq_len = the model's `max_len`, stride = seq_len) and check them.

    Raises:
        ValueError: seq_len outside [2, max_len] or stride outside [1, seq_len].
    """
    seq_len = max_len if seq_len is None else int(seq_len)
    if not 2 <= seq_len <= max_len:
        raise ValueError(
            f"seq_len must be between 2 and the model's max_seq_len {max_len}, got {seq_len}"
        )
    stride = seq_len if stride is None else int(stride)
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    return seq_len, stride
