"""A tokenizer trained on the run's own training split: `train_lm.py --train_tokenizer N`.

When the built-in data or `--train_file` text has no tokenizer of its own (it is text, not a
`--data` folder of shards), a run can train a byte-level BPE of N tokens on its training split
(`corpus.tokenizer_training`, what `train_tokenizer.py` runs) and encode every split with it.
The folder is prepared once and cached beside the token shards:
`<cache_dir>/tokenizers/<label>.bpe<N>.<key>/`, the key a hash of the training split's identity
(its file, size, modification time and character range) and N. Cached rather than trained per
run because the split's shards are cached by tokenizer: a rerun, a resume or `evaluate_lm.py`
then finds the same tokenizer and the same shards. Training is deterministic (the same text
gives byte-identical files), so a cache deleted or made on another machine is made again
identical; it takes about a second for Tiny Shakespeare. The run's snapshots store the
tokenizer's files, so generation, serving and evaluation need no flag.

Only the training split is read: the validation text never shapes the vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from corpus.datasets import DataArgs, default_cache_dir, split_source
from corpus.shards import DataError
from corpus.sources import HubDataset, LocalFiles

__all__ = ["with_split_tokenizer", "split_tokenizer_folder"]


def split_tokenizer_folder(data: DataArgs, vocab_size: int) -> Path:
    """Where the BPE of `vocab_size` tokens trained on `data`'s training split is cached.

    Raises:
        DataError: the data has no training split here (one line, with how to get it).
    """
    return _folder(data, _train_source(data), vocab_size)


def _train_source(data: DataArgs) -> LocalFiles | HubDataset:
    """The text source of `data`'s training split (raises DataError when there is none)."""
    source = split_source(data, "train")
    if source is None:
        raise DataError(f"{data.label} has no training split to train a tokenizer on")
    return source


def _folder(data: DataArgs, source: LocalFiles | HubDataset, vocab_size: int) -> Path:
    identity = json.dumps({"source": source.identity(), "vocab_size": vocab_size},
                          sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return default_cache_dir(data) / "tokenizers" / f"{data.label}.bpe{vocab_size}.{key}"


def with_split_tokenizer(data: DataArgs, tokenizer_given: bool, train_given: bool,
                         say: Callable[[str], None]) -> DataArgs:
    """`data` encoded with a tokenizer trained on its training split, when it asks for one.

    Args:
        data: the run's data; `data.train_tokenizer` is N (0: none asked for).
        tokenizer_given: a tokenizer was named (`--tokenizer`, or `--init_from`'s model): it
            wins over a preset's `--train_tokenizer`.
        train_given: `--train_tokenizer` itself was given on the command line.
        say: prints a note.

    Returns:
        `data` with `tokenizer` set to the cached folder (trained now when absent); or with
        `train_tokenizer` 0 when the data or the command names a tokenizer instead.

    Raises:
        DataError: `--train_tokenizer` given with `--data` or `--tokenizer`, or the training
            failed (too little text for N tokens, no training split).
    """
    n = data.train_tokenizer
    if not n:
        return data
    named = "--data" if data.data else "--tokenizer" if tokenizer_given else None
    if named:
        if train_given:
            raise DataError(f"--train_tokenizer {n} trains a tokenizer for text data; {named} "
                            f"already names the tokenizer: drop one of them")
        return dataclasses.replace(data, train_tokenizer=0)  # the preset's, overridden
    source = _train_source(data)
    folder = _folder(data, source, n)
    if not (folder / "tokenizer.json").is_file():
        summary = _train(source, n, folder)
        say(f"trained a byte-level BPE of {n:,} tokens on the training split "
            f"({summary.train_bytes / 1e6:.2f} MB) in {summary.seconds:.1f} s: {folder}")
    return dataclasses.replace(data, tokenizer=str(folder))


def _train(source: LocalFiles | HubDataset, vocab_size: int, folder: Path):
    """Train into a private folder, then move it into place (another process training the same
    tokenizer at once, as DDP's ranks do, writes identical files: the first one stays)."""
    from corpus.tokenizer_training import TokenizerTrainConfig, train_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cfg = TokenizerTrainConfig(sources=[source], out=tmp / "tok",
                                   vocab_size=vocab_size, held_out=0.0, progress=False)
        try:
            summary = train_tokenizer(cfg)
        except DataError as exc:
            raise DataError(f"--train_tokenizer {vocab_size}: {exc} (or --tokenizer gpt2)"
                            ) from None
        try:
            os.replace(tmp / "tok", folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
