"""How many bytes of text the scored tokens spell: the denominator of bits per byte.

Bits per byte is the scored tokens' summed negative log-likelihood / ln 2 / the UTF-8 bytes of
the text those tokens spell. Unlike the loss per token it does not depend on how a tokenizer cuts
the text, so runs with different tokenizers compare.

Not every token is scored: the first token of the text has no context, nor has the first of each
non-overlapping window (`model/windows.py`), and a quick validation scores a subset of windows.
So the bytes counted are those of the scored tokens only:

- a byte-level BPE tokenizer (GPT-2's, and any whose decoder is `tokenizers`' ByteLevel, as the
  ones trained for this repo) spells a fixed byte string with each id, so `byte_table` gives the
  bytes of every id and the evaluation sums them over the scored targets: exact. Special tokens
  (end of text) count 0 bytes: in prepared data they are the separators put between documents,
  not text. The table is used only when it spells the whole text's byte count exactly;
- other tokenizers (SentencePiece, WordPiece: a token's text depends on its neighbours) have no
  table, and the scored tokens count the text's average bytes per token (bytes x scored /
  tokens). The tokens left out sit at window boundaries, which have nothing to do with the text,
  so this is the same in expectation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 1 << 22  # tokens per pass when summing a memory-mapped split


def token_byte_lengths(tokenizer: Any, vocab_size: int = 0) -> np.ndarray | None:
    """UTF-8 bytes each token id spells, for a byte-level BPE tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        vocab_size: the model's vocabulary (ids past the tokenizer's count 0 bytes).

    Returns:
        An int64 array of max(len(tokenizer), vocab_size) entries (0 for special tokens), or
        None when the tokenizer is not byte-level.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())  # GPT-2's 256 printable stand-ins for bytes
    n = len(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    table = np.zeros(max(n, int(vocab_size)), dtype=np.int64)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        extra = added.get(i)
        if extra is not None:  # matched in the raw text: its own characters, or a separator
            table[i] = 0 if extra.special else len(str(extra.content).encode("utf-8"))
        elif token is None or any(c not in alphabet for c in token):
            return None  # not GPT-2's byte stand-ins: not a byte-level vocabulary after all
        else:
            table[i] = len(token)  # one stand-in character per byte
    return table


def byte_table(tokenizer: Any, tokens, num_bytes: int | None, vocab_size: int = 0
               ) -> np.ndarray | None:
    """`token_byte_lengths` when it spells exactly `num_bytes` over `tokens`, else None.

    Args:
        tokenizer: the tokenizer `tokens` were made with.
        tokens: 1-D token ids (a numpy array, memmap, `TokenShards` or LongTensor).
        num_bytes: the UTF-8 size of the text `tokens` encode (None: unknown, no table).
        vocab_size: the model's vocabulary size.

    Returns:
        The table, or None (not byte-level, the text's size unknown, or the table disagrees with
        it: e.g. a text file that contains a special token's text, or a normalizing tokenizer).
    """
    if num_bytes is None:
        return None
    table = token_byte_lengths(tokenizer, vocab_size)
    if table is None:
        return None
    total = 0
    for start in range(0, len(tokens), _CHUNK):
        ids = np.asarray(tokens[start:start + _CHUNK], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            return None
        total += int(table[ids].sum())
    return table if total == num_bytes else None
