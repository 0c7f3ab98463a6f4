"""Training a byte-level BPE tokenizer on a corpus: what `train_tokenizer.py` runs.

The tokenizer is GPT-2's kind, with its own vocabulary: text is split into words by GPT-2's
pre-tokenizer (the `tokenizers` library's `ByteLevel`, whose regex llama.cpp knows as "gpt-2", so
GGUF exports tokenize the same there), and BPE merges the bytes of each word. All 256 bytes are
tokens, so any text encodes and decodes back byte for byte; `<|endoftext|>` (id 0, then any
other special tokens) separates documents, as GPT-2's does.

How it runs. The sources are read in order, in units of `UNIT_BYTES` (`corpus.sources`, the
readers `prepare_data.py` uses), and their text is cut into pieces of about `PIECE_CHARS`
characters (fewer for a text under 800 KB: 200 pieces at least), only where GPT-2's
pre-tokenizer splits anyway (so the word counts are those of the whole text). The pieces stream
into the `tokenizers` BPE trainer (`train_from_iterator`), which splits and counts words on every
core while this process reads on; then it computes the merges. Memory holds a unit, a few
hundred pieces and the trainer's word counts (which grow with the number of distinct words, not
with the text), never the corpus. The same sources and settings give byte-identical files.

The held-out sample: every k-th piece (k about 1 / `held_out`, spread over the whole source, at
most `held_out_max_bytes` of text) is kept out of training; after training it is encoded with
the new tokenizer and with GPT-2's, and the summary compares their bytes per token.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.fileio import write_folder
from corpus.shards import DataError
from corpus.sources import RECORD_EXTS, HubDataset, LocalFiles, ReadOptions, read_unit

Source = LocalFiles | HubDataset

EOT = "<|endoftext|>"  # GPT-2's end-of-text token, the separator of documents
BYTE_TOKENS = 256  # byte-level: every byte is a token before any merge
UNIT_BYTES = 8 << 20  # text read at once from a source
PIECE_CHARS = 4096  # text per piece: what the trainer gets at once, and held out at once


@dataclass
class TokenizerTrainConfig:
    """What to train on and what to write.

    Attributes:
        sources: the sources, read in order (`prepare_data.open_source` makes them).
        out: the tokenizer folder to write.
        vocab_size: tokens in all: the 256 bytes, the special tokens and the merges.
        special_tokens: special tokens after `<|endoftext|>` (e.g. chat markers).
        held_out: the share of the text kept out of training for the summary (0: none).
        held_out_max_bytes: at most this much text is held out.
        max_bytes: read at most about this much text (None: all of it).
        utf8: invalid UTF-8: "refuse" or "replace".
        progress: print progress on stderr.
    """

    sources: list[Source]
    out: Path
    vocab_size: int
    special_tokens: tuple[str, ...] = ()
    held_out: float = 0.05
    held_out_max_bytes: int = 8 << 20
    max_bytes: int | None = None
    utf8: str = "refuse"
    progress: bool = True

    @property
    def specials(self) -> list[str]:
        """Every special token, `<|endoftext|>` first (its id is 0)."""
        return [EOT, *self.special_tokens]


@dataclass
class TrainSummary:
    """What training did (`lines()` prints it)."""

    out: Path
    vocab_size: int
    specials: int
    train_bytes: int
    pieces: int
    seconds: float
    read_seconds: float
    peak_rss_bytes: int
    held_out_bytes: int = 0
    held_out_tokens: int = 0
    gpt2_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary, a few lines for people."""
        merges = self.vocab_size - BYTE_TOKENS - self.specials
        out = [f"trained a byte-level BPE of {self.vocab_size:,} tokens ({BYTE_TOKENS} bytes, "
               f"{self.specials} special, {merges:,} merges) on {_size(self.train_bytes)} of text "
               f"in {self.seconds:.1f} s (reading and counting {self.read_seconds:.1f} s); peak "
               f"memory {_size(self.peak_rss_bytes)}"]
        if self.held_out_tokens:
            ours = self.held_out_bytes / self.held_out_tokens
            theirs = self.held_out_bytes / self.gpt2_tokens
            out.append(f"held-out sample ({_size(self.held_out_bytes)}, not trained on): "
                       f"{ours:.3f} bytes per token, GPT-2's 50,257 tokens {theirs:.3f} "
                       f"({self.held_out_tokens:,} tokens against {self.gpt2_tokens:,}, "
                       f"{self.held_out_tokens / self.gpt2_tokens - 1:+.1%})")
        out.extend(self.notes)
        out.append(f"wrote {self.out}: pass it as --tokenizer {self.out} to prepare_data.py "
                   "(and to the other scripts)")
        return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def min_vocab_size(num_special: int) -> int:
    """The smallest vocabulary: the 256 byte tokens and the special tokens."""
    return BYTE_TOKENS + num_special


def check_config(cfg: TokenizerTrainConfig) -> None:
    """Refuse settings that cannot work, before reading anything.

    Raises:
        DataError: one line.
    """
    specials = cfg.specials
    if any(not t or t.isspace() for t in specials):
        raise DataError("--special_tokens: a special token cannot be empty or only whitespace")
    if len(set(specials)) != len(specials):
        raise DataError(f"--special_tokens: each special token must be given once, and not {EOT} "
                        "(it is always there, id 0)")
    low = min_vocab_size(len(specials))
    if cfg.vocab_size < low:
        raise DataError(f"--vocab_size {cfg.vocab_size} is below the byte alphabet: at least "
                        f"{low} (256 byte tokens + {len(specials)} special), and a useful "
                        "vocabulary has thousands (e.g. 4096)")
    if not 0 <= cfg.held_out < 1:
        raise DataError(f"--held_out must be in [0, 1), got {cfg.held_out}")


def split_text(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut only where GPT-2's pre-tokenizer splits
    anyway (a piece runs on, up to the whole text, where there is no such place)."""
    start, n = 0, len(text)
    while n - start > size:
        lo = start + size
        cut = _safe_cut(text, lo, min(n, lo + 3 * size)) or _safe_cut(text, lo, n)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The first place in [lo, hi) to cut `text` without changing GPT-2's words: before a space
    that precedes an ASCII letter, else after a newline between two non-blank ASCII characters
    (found with `str.find`, much faster here than a regex with look-arounds)."""
    i = text.find(" ", lo, hi)
    while i != -1 and i + 1 < len(text):
        if text[i + 1].isascii() and text[i + 1].isalpha():
            return i
        i = text.find(" ", i + 1, hi)
    i = text.find("\n", max(lo, 1), hi)
    while i != -1 and i + 1 < len(text):
        if "!" <= text[i - 1] <= "~" and "!" <= text[i + 1] <= "~":
            return i + 1
        i = text.find("\n", i + 1, hi)
    return None


class _Reader:
    """The training pieces of the sources, in order (an iterator for `train_from_iterator`);
    it keeps the held-out pieces, counts, and shows progress."""

    def __init__(self, cfg: TokenizerTrainConfig) -> None:
        self.cfg = cfg
        self.train_bytes = self.seen_bytes = self.pieces = self.index = 0
        self.held_out: list[str] = []
        self.held_out_bytes = 0
        self.done_at: float | None = None
        total = _total_bytes(cfg.sources)
        if cfg.max_bytes is not None:
            total = cfg.max_bytes if total is None else min(total, cfg.max_bytes)
        self.total = total
        # Small texts get smaller pieces, so that a held-out sample exists (200 pieces at least).
        self.piece_chars = PIECE_CHARS if not total else max(256, min(PIECE_CHARS, total // 200))
        # Hold out about `held_out` of the text, less when that passes the cap on a known size.
        share = cfg.held_out
        if total and share:
            share = min(share, cfg.held_out_max_bytes / total)
        self.share = share
        # The bar counts text bytes: its total is known for text files (else it shows the rate).
        plain = all(isinstance(src, LocalFiles) and not any(
            f.name.lower().endswith(RECORD_EXTS) for f in src.files) for src in cfg.sources)
        self.bar = _bar(total if plain or cfg.max_bytes else None) if cfg.progress else None

    def _held(self, i: int) -> bool:
        """Piece i is held out: spread evenly (every 1/share-th piece), none while at the cap."""
        return (int((i + 1) * self.share) > int(i * self.share)
                and self.held_out_bytes < self.cfg.held_out_max_bytes)

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._texts():
                for piece in split_text(text, self.piece_chars):
                    size = len(piece) if piece.isascii() else len(piece.encode("utf-8"))
                    self.seen_bytes += size
                    if self.bar is not None:
                        self.bar.update(size)
                    if self._held(self.index):
                        self.held_out.append(piece)
                        self.held_out_bytes += size
                    else:
                        self.train_bytes += size
                        self.pieces += 1
                        yield piece
                    self.index += 1
                    if self.cfg.max_bytes is not None and self.seen_bytes >= self.cfg.max_bytes:
                        return
        finally:
            self.done_at = time.perf_counter()
            if self.bar is not None:
                self.bar.close()
                if getattr(self.bar, "shown", True):  # a bar or lines were shown: say what next
                    print(f"read {_size(self.seen_bytes)} of text; computing the merges",
                          file=sys.stderr, flush=True)

    def _texts(self) -> Iterator[str]:
        for source in self.cfg.sources:
            opts = ReadOptions(source.docs, source.text_field, self.cfg.utf8)
            for unit in source.units(UNIT_BYTES, self.cfg.utf8):
                docs, _ = read_unit(unit, opts)
                yield from docs


def _total_bytes(sources: list[Source]) -> int | None:
    try:
        sizes = [getattr(s, "total_bytes", None) for s in sources]
    except OSError:
        return None
    return sum(sizes) if all(v is not None for v in sizes) else None


def _bar(total: int | None):
    """A progress bar on a terminal; elsewhere (a log file) a line every 30 seconds."""
    if not sys.stderr.isatty():
        return _LogLines(total)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="reading and counting words",
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)


class _LogLines:
    """`update` / `close` as tqdm's, printing a line every `every` seconds."""

    def __init__(self, total: int | None, every: float = 30.0) -> None:
        self.total, self.every, self.done, self.shown = total, every, 0, False
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last, self.shown = now, True
            of = f" of {_size(self.total)} ({self.done / self.total:.0%})" if self.total else ""
            rate = self.done / (now - self.start) / 1e6
            print(f"reading and counting words: {_size(self.done)}{of}, {rate:.1f} MB/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def new_tokenizer() -> Any:
    """An untrained byte-level BPE with GPT-2's pre-tokenizer and decoder (`tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    # GPT-2's regex, no space added before a text: llama.cpp's "gpt-2" pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(cfg: TokenizerTrainConfig,
                    log: Callable[[str], None] | None = None) -> TrainSummary:
    """Train a byte-level BPE on `cfg.sources` and write it to `cfg.out` (see the module
    docstring): a folder `AutoTokenizer.from_pretrained` loads and every script accepts as
    `--tokenizer`.

    Args:
        cfg: what to train on and what to write.
        log: where progress lines go (default: stderr when `cfg.progress`).

    Returns:
        The summary (sizes, times, peak memory, bytes per token on the held-out sample).

    Raises:
        DataError: bad settings, no text, or less text than the vocabulary needs (one line;
            nothing is written).
    """
    from tokenizers import pre_tokenizers, trainers

    if log is None:
        def log(line: str) -> None:
            if cfg.progress:
                print(line, file=sys.stderr, flush=True)
    check_config(cfg)
    for source in cfg.sources:
        source.check()
    start = time.perf_counter()
    tok = new_tokenizer()
    specials = cfg.specials
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # its bars would fight ours
    reader = _Reader(cfg)
    tok.train_from_iterator(reader, trainer, length=None)
    if reader.train_bytes == 0:
        what = ", ".join(s.describe() for s in cfg.sources)
        raise DataError(f"{what}: no text to train on (the source is empty)")
    got = tok.get_vocab_size()
    if got < cfg.vocab_size:
        raise DataError(
            f"the text supports only {got:,} tokens, not --vocab_size {cfg.vocab_size:,} (BPE "
            f"ran out of pairs to merge in {_size(reader.train_bytes)}): ask for at most {got:,}"
            ", or train on more text")
    log(f"trained {got:,} tokens; measuring the held-out sample and writing {cfg.out}")
    summary = TrainSummary(out=cfg.out, vocab_size=got, specials=len(specials),
                           train_bytes=reader.train_bytes, pieces=reader.pieces, seconds=0.0,
                           read_seconds=(reader.done_at or start) - start, peak_rss_bytes=0)
    if reader.held_out:
        summary.held_out_bytes = reader.held_out_bytes
        summary.held_out_tokens, summary.gpt2_tokens = _count_tokens(tok, reader.held_out)
    elif cfg.held_out:
        summary.notes.append("no held-out sample: the text is too short to hold a piece out")
    write_folder(cfg.out, lambda folder: save_tokenizer(tok, folder))
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _count_tokens(tok: Any, texts: list[str]) -> tuple[int, int]:
    """Tokens of `texts` with `tok` and with GPT-2's tokenizer (special tokens read as text)."""
    from tokenizers import Tokenizer

    from corpus.encoders import load_encoder

    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True  # a literal <|endoftext|> in the text is text
    ours = sum(len(e.ids) for e in plain.encode_batch(texts, add_special_tokens=False))
    gpt2 = load_encoder("gpt2")
    return ours, sum(len(gpt2.encode(t)) for t in texts)


def save_tokenizer(tok: Any, folder: Path) -> None:
    """Write `tok` as transformers' `PreTrainedTokenizerFast.save_pretrained` does, with
    `<|endoftext|>` as its beginning- and end-of-text token (as GPT-2's) and decoding that gives
    back the exact text (no clean-up of spaces)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
    # Name the class as transformers 4 does (PreTrainedTokenizerFast; 5 loads that name too and
    # writes its own, TokenizersBackend, which 4 does not know), so the folder loads with both.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
