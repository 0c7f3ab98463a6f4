"""Fast tokenizers for preparing data (no torch import: preparation workers stay light).

`load_encoder("gpt2")` builds GPT-2's byte-level BPE in tiktoken from the bundled files
(`model/assets/gpt2/vocab.json` and `merges.txt`, byte-identical to OpenAI's `encoder.json` and
`vocab.bpe`), offline; its ids are GPT-2's (`tests/corpus/test_prepare.py` compares them with the
Hugging Face tokenizer). Any other name is loaded with `transformers.AutoTokenizer` and encoded
through its Rust backend.

Text is encoded as ordinary text: a literal `<|endoftext|>` inside a document becomes the tokens
of those characters, as OpenAI's GPT-2 encoder does, so only the separator the preparation
inserts is ever the end-of-text id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.paths import BUNDLED_GPT2_DIR  # the one path of the bundled GPT-2 files

# GPT-2's pre-tokenizer (the regex of OpenAI's encoder.py, written with possessive quantifiers
# and an end-of-text whitespace rule as tiktoken's r50k_base has it: the same splits, faster).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                r"""|\s+(?!\S)|\s""")
GPT2_EOT = "<|endoftext|>"
BATCH_CHARS = 1 << 20  # text per `encode_batch` call of a Hugging Face tokenizer


class EncoderError(ValueError):
    """A tokenizer cannot be used for preparation; the message is one line."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from its printable stand-in characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def files_sha256(*paths: Path) -> str:
    """One sha256 over the contents of `paths`, in order (names the tokenizer's files)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Encoder:
    """A tokenizer as preparation uses it.

    Attributes:
        name: what `load_encoder` was given ("gpt2", a folder or a hub name).
        vocab_size: ids are in [0, vocab_size).
        eot_id: the end-of-text id, the separator between documents.
        eot_text: its text form.
        fingerprint: sha256 of the tokenizer's files (or of its serialized form).
        library: what encodes ("tiktoken 0.x" or "tokenizers 0.x").
    """

    name: str
    vocab_size: int
    eot_id: int
    eot_text: str
    fingerprint: str
    library: str
    _impl: Any = None
    _kind: str = "tiktoken"

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` (ordinary text: no special tokens), as a uint32 array."""
        if self._kind == "tiktoken":
            return self._impl.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return np.asarray(self._impl.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text (a Hugging Face tokenizer: in batches of about
        `BATCH_CHARS` characters, since its per-token records take ~100 bytes a token)."""
        if self._kind == "tiktoken":
            return [self.encode(t) for t in texts]
        out: list[np.ndarray] = []
        start, chars = 0, 0
        for end, text in enumerate(texts, 1):
            chars += len(text)
            if chars >= BATCH_CHARS or end == len(texts):
                batch = self._impl.encode_batch(texts[start:end], add_special_tokens=False)
                out.extend(np.asarray(e.ids, dtype=np.uint32) for e in batch)
                start, chars = end, 0
        return out

    def decode(self, ids) -> str:
        """Text of `ids` (for checks and tests)."""
        ids = [int(i) for i in ids]
        if self._kind == "tiktoken":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this tokenizer."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot_text": self.eot_text, "files_sha256": self.fingerprint,
                "library": self.library}


@lru_cache(maxsize=4)
def load_encoder(name: str = "gpt2") -> Encoder:
    """The encoder for tokenizer `name` (cached per process).

    Raises:
        EncoderError: the tokenizer cannot be loaded or has no end-of-text token.
    """
    if name == "gpt2":
        return _gpt2()
    return _hugging_face(name)


def gpt2_fingerprint() -> str:
    """sha256 of the bundled GPT-2 files, without building the encoder."""
    return files_sha256(BUNDLED_GPT2_DIR / "vocab.json", BUNDLED_GPT2_DIR / "merges.txt")


def tokenizer_fingerprint(name: str) -> str:
    """What `load_encoder(name).fingerprint` is, cheaply for the bundled GPT-2."""
    return gpt2_fingerprint() if name == "gpt2" else load_encoder(name).fingerprint


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The bundled GPT-2 files: vocab.json's token -> id, and merges.txt's "a b" lines in order
    (its header and empty lines left out)."""
    vocab = json.loads((BUNDLED_GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (BUNDLED_GPT2_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    return vocab, [m for m in lines if m]


def _gpt2() -> Encoder:
    try:
        import tiktoken
    except ImportError:
        raise EncoderError("preparing data needs tiktoken: pip install tiktoken") from None
    vocab_path, merges_path = BUNDLED_GPT2_DIR / "vocab.json", BUNDLED_GPT2_DIR / "merges.txt"
    vocab, merges = gpt2_vocab_and_merges()
    to_byte = _byte_decoder()
    ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items() if token != GPT2_EOT}
    # tiktoken merges by rank, GPT-2 by the order of merges.txt: they agree when each merged
    # token's id is 256 + its line in merges.txt. Check it, so that a changed file fails here.
    for i, line in enumerate(merges):
        a, b = line.split(" ")
        if vocab.get(a + b) != 256 + i:
            raise EncoderError(f"{merges_path}: merge {i} ({line!r}) is not token {256 + i} of "
                               f"{vocab_path}; the GPT-2 files are damaged")
    eot = vocab[GPT2_EOT]
    enc = tiktoken.Encoding("gpt2-bundled", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={GPT2_EOT: eot}, explicit_n_vocab=len(vocab))
    return Encoder(name="gpt2", vocab_size=len(vocab), eot_id=eot, eot_text=GPT2_EOT,
                   fingerprint=files_sha256(vocab_path, merges_path),
                   library=f"tiktoken {tiktoken.__version__}", _impl=enc, _kind="tiktoken")


def _hugging_face(name: str) -> Encoder:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EncoderError(f"could not load tokenizer {name!r} ({first}); use gpt2 (bundled) or "
                           "a local folder holding tokenizer files") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise EncoderError(f"tokenizer {name!r} has no fast (Rust) version; preparation needs "
                           "one (a folder with tokenizer.json)")
    eot = tok.eos_token_id
    if eot is None:
        raise EncoderError(f"tokenizer {name!r} has no end-of-text token to separate documents")
    import tokenizers

    serialized = backend.to_str()
    # Ordinary text, as tiktoken's path: a literal "<|endoftext|>" (or this tokenizer's end
    # token) inside a document is encoded as characters, never as the separator's id.
    backend.encode_special_tokens = True
    return Encoder(name=name, vocab_size=len(tok), eot_id=int(eot), eot_text=str(tok.eos_token),
                   fingerprint=hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
                   library=f"tokenizers {tokenizers.__version__}", _impl=backend,
                   _kind="tokenizers")
