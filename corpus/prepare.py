"""Data preparation: documents from a source, tokenized on all cores, written as token shards.

`prepare(config)` is the one path from text to training tokens: `prepare_data.py` calls it,
and so does the trainer for its built-in datasets (Tiny Shakespeare, WikiText, `--train_file`).

How it runs. The source is cut into units of about `unit_bytes` of text (`corpus.sources`).
Worker processes (`num_proc`, one per core by default) read and tokenize units; the main process
takes their results in source order, decides each document's split, inserts the separator and
appends the tokens to the split's `ShardWriter`. At most `2 x num_proc` units are in flight, so
memory is bounded by the workers' units, never by the corpus: about 150 MB per worker at the
default 8 MiB units, plus ~100 MB for the main process (`bench/data.py` measures it).

What it writes. Per split, shards of `shard_tokens` tokens; the documents of a split in source
order, with one `<|endoftext|>` between consecutive documents (before every document but the
first): each boundary is marked once, a window that starts at a separator starts at a
document's beginning (the context GPT-2 samples from), and a one-document text (Tiny
Shakespeare) is exactly the tokens of its text. The output depends only on the source and the
settings recorded in the manifest, not on `num_proc` or `unit_bytes`.

Validation is chosen by documents: document `i` (its index in the source) is held out when a
seeded 64-bit hash of `i` falls below a threshold: `val_fraction` of the range, or, for
`val_docs = N`, the N-th smallest hash of the source's documents. So the held-out documents are
spread over the whole source, the same whatever the chunking, and never the tail of a stream.
A separate validation source, or the old rule of the last 10% of characters of one text, are
the other options (the trainer's `--val_file` and `--train_file`).

Resuming. Every few seconds (and at each finished shard) the partial shards are flushed and
`progress.json` records how many units are done; after a crash or kill -9 the same command keeps
the complete shards, cuts the partial ones back to the record, and continues from there: the
result is byte-identical to an uninterrupted run. A folder prepared (or being prepared) from
another source, tokenizer or settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.fileio import atomic_write
from corpus.encoders import Encoder, EncoderError, load_encoder
from corpus.shards import (
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_FORMAT,
    DataError,
    ShardWriter,
    dtype_for_vocab,
)
from corpus.sources import HubDataset, LocalFiles, ReadOptions, Unit, read_unit

PROGRESS = "progress.json"
SEPARATOR_RULE = "between documents: one before every document of a split except its first"
CHECKPOINT_SECONDS = 2.0
_MASK = (1 << 64) - 1

Source = LocalFiles | HubDataset


@dataclass
class Stream:
    """One source and where its documents go.

    Attributes:
        split: the split its documents go to ("train", "val" or "test").
        source: where the documents come from.
        hold_out: send the documents the validation rule picks to "val" instead.
    """

    split: str
    source: Source
    hold_out: bool = False


@dataclass
class PrepareConfig:
    """Everything a preparation depends on, and how to run it.

    Attributes:
        out: the folder to write (`manifest.json`, shards, `progress.json` while running).
        streams: the sources, in order.
        tokenizer: "gpt2" (bundled) or a tokenizer folder / hub name.
        shard_tokens: tokens per shard (the last shard of a split is shorter).
        dtype: "auto" (uint16 when the vocabulary fits, else uint32), "uint16" or "uint32".
        val_fraction, val_docs: the validation rule of streams with `hold_out` (one of them).
        seed: seeds the validation choice.
        utf8: "refuse" invalid UTF-8 (one line, exit 2) or "replace" it with U+FFFD (counted).
        num_proc: worker processes (1: tokenize in this process).
        unit_bytes: text per unit of work.
        command: the command line recorded in the manifest.
        validation: how validation was split, in words, when no rule here says it.
        progress: show a progress bar (stderr).
        log: prints a line per finished shard, and the summary (None: silent).
        replace_stale: a folder prepared with other settings is replaced instead of refused
            (the trainer's own cache of the built-in datasets).
    """

    out: Path
    streams: list[Stream]
    tokenizer: str = "gpt2"
    shard_tokens: int = 100_000_000
    dtype: str = "auto"
    val_fraction: float | None = None
    val_docs: int | None = None
    seed: int = 0
    utf8: str = "refuse"
    num_proc: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    unit_bytes: int = 8 << 20
    command: str = ""
    validation: str = ""
    progress: bool = True
    log: Callable[[str], None] | None = print
    replace_stale: bool = False


# -- which documents are held out ---------------------------------------------------------------


def doc_hash(indices: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash (splitmix64) of document indices: uniform, and a bijection."""
    z = np.asarray(indices, dtype=np.uint64) + np.uint64(
        (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fraction_threshold(fraction: float) -> int:
    """Documents whose hash is below this are held out: `fraction` of them on average."""
    return min(_MASK, int(fraction * 2**64))


def count_threshold(count: int, num_docs: int, seed: int) -> int:
    """The threshold that holds out exactly `count` of documents 0 .. num_docs-1."""
    best = np.zeros(0, dtype=np.uint64)
    for lo in range(0, num_docs, 1 << 22):
        h = doc_hash(np.arange(lo, min(num_docs, lo + (1 << 22)), dtype=np.uint64), seed)
        both = np.concatenate([best, h])
        best = np.partition(both, count - 1)[:count] if len(both) > count else both
    return int(best.max()) + 1


def is_held_out(indices: np.ndarray, seed: int, threshold: int) -> np.ndarray:
    """Which of these document indices the validation rule picks."""
    return doc_hash(indices, seed) < np.uint64(threshold)


# -- the workers ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_pool_worker(tokenizer: str, dtype: str) -> None:
    # One process per core already: a Hugging Face tokenizer's own threads would only compete.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(tokenizer, dtype)


def _init_worker(tokenizer: str, dtype: str) -> None:
    _WORKER.update(encoder=load_encoder(tokenizer), dtype=np.dtype(dtype))


@dataclass
class Encoded:
    """A unit's documents as tokens (no separators yet)."""

    tokens: np.ndarray  # all documents' tokens, concatenated
    lengths: np.ndarray  # tokens per document
    nbytes: np.ndarray  # UTF-8 bytes per document
    continues: bool  # the first document continues the previous unit's last one
    invalid: int  # invalid UTF-8 sequences replaced
    source_bytes: int


def encode_unit(unit: Unit, opts: ReadOptions) -> Encoded:
    """Read and tokenize one unit (in a worker, or in the main process with `num_proc` 1)."""
    enc: Encoder = _WORKER["encoder"]
    docs, invalid = read_unit(unit, opts)
    parts = enc.encode_many(docs) if docs else []
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    nbytes = np.fromiter((len(d.encode("utf-8")) for d in docs), dtype=np.int64, count=len(docs))
    dtype = _WORKER["dtype"]
    tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
    return Encoded(tokens, lengths, nbytes, unit.continues, invalid, unit.source_bytes)


# -- the folder's state ---------------------------------------------------------------------------


def identity_of(cfg: PrepareConfig, enc: Encoder, dtype: np.dtype) -> dict[str, Any]:
    """What the output depends on; a folder holds the output of one identity only."""
    return {
        "shard_format": FORMAT_VERSION,
        "tokenizer": {"name": enc.name, "files_sha256": enc.fingerprint},
        "dtype": dtype.name, "shard_tokens": cfg.shard_tokens, "utf8": cfg.utf8,
        "validation": {"fraction": cfg.val_fraction, "docs": cfg.val_docs, "seed": cfg.seed},
        "streams": [{"split": s.split, "hold_out": s.hold_out, "source": s.source.identity()}
                    for s in cfg.streams],
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _what_differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key, label in (("tokenizer", "tokenizer"), ("streams", "source"),
                       ("validation", "validation split"), ("shard_tokens", "shard size"),
                       ("dtype", "token type"), ("utf8", "--utf8 policy")):
        if old.get(key) != new.get(key):
            return label
    return "settings"


def _clear(out: Path) -> None:
    """Remove what a preparation writes in `out` (nothing else)."""
    for path in out.iterdir():
        name = path.name
        if name in (MANIFEST, PROGRESS) or (name.endswith((".bin", ".bin.partial")) and
                                            name.split("_")[0] in ("train", "val", "test")):
            path.unlink()
        elif name.startswith(f".{PROGRESS}.") or name.startswith(f".{MANIFEST}."):
            path.unlink()


def _check_folder(cfg: PrepareConfig, identity: dict[str, Any]) -> tuple[str, dict | None]:
    """("done", manifest) | ("resume", progress) | ("new", None) for the output folder."""
    out, digest = cfg.out, _digest(identity)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return "new", None
    manifest, progress = _read_json(out / MANIFEST), _read_json(out / PROGRESS)
    for kind, record in (("done", manifest), ("resume", progress)):
        if record is None:
            continue
        if record.get("identity_sha256") == digest:
            return kind, record
        if cfg.replace_stale:
            _clear(out)
            return "new", None
        what = _what_differs(record.get("identity") or {}, identity)
        raise DataError(f"--out {out} holds data prepared with another {what}; refusing to mix "
                        "them: pick a new --out, or delete that folder first")
    leftovers = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if leftovers and not cfg.replace_stale:
        raise DataError(f"--out {out} is not empty and not a prepared data folder (it holds "
                        f"{leftovers[0]}); pick an empty or new folder")
    if cfg.replace_stale:
        _clear(out)
    return "new", None


# -- the run --------------------------------------------------------------------------------------


@dataclass
class _State:
    """The main process's counters, saved in progress.json."""

    units_done: int = 0
    next_doc: list[int] = field(default_factory=list)  # per stream: index of the next document
    documents: int = 0
    empty: int = 0
    invalid: int = 0
    source_bytes: int = 0


class _Run:
    def __init__(self, cfg: PrepareConfig, enc: Encoder, dtype: np.dtype,
                 identity: dict[str, Any], threshold: int | None) -> None:
        self.cfg, self.enc, self.dtype, self.identity = cfg, enc, dtype, identity
        self.digest = _digest(identity)
        self.threshold = threshold
        self.state = _State(next_doc=[0] * len(cfg.streams))
        self.writers: dict[str, ShardWriter] = {}
        self.bar = None
        self.tokens_done = 0
        self.t0 = time.perf_counter()
        self.last_checkpoint = time.perf_counter()
        self.shard_finished = False

    def splits(self) -> list[str]:
        names = []
        for s in self.cfg.streams:
            for name in ([s.split, "val"] if s.hold_out else [s.split]):
                if name not in names:
                    names.append(name)
        return names

    def _on_shard(self, record: dict[str, Any]) -> None:
        self.shard_finished = True
        if self.cfg.log:
            line = (f"wrote {record['file']}: {record['tokens']:,} tokens, "
                    f"{record['documents']:,} documents")
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
                sys.stdout.flush()
            else:
                self.cfg.log(line)

    def open_writers(self, progress: dict[str, Any] | None) -> None:
        saved = (progress or {}).get("writers", {})
        for name in self.splits():
            self.writers[name] = ShardWriter(self.cfg.out, name, self.cfg.shard_tokens,
                                             self.dtype, state=saved.get(name),
                                             on_shard=self._on_shard)
        if progress:
            s = progress["state"]
            self.state = _State(**s)

    def checkpoint(self) -> None:
        writers = {name: w.checkpoint() for name, w in self.writers.items()}
        record = {"identity_sha256": self.digest, "identity": self.identity,
                  "unit_bytes": self.cfg.unit_bytes, "threshold": self.threshold,
                  "state": self.state.__dict__, "writers": writers}
        with atomic_write(self.cfg.out / PROGRESS, "w") as f:
            json.dump(record, f)
        self.last_checkpoint = time.perf_counter()
        self.shard_finished = False

    def take(self, stream_index: int, res: Encoded) -> None:
        """Append one unit's documents to their splits."""
        stream, st = self.cfg.streams[stream_index], self.state
        n = len(res.lengths)
        first = st.next_doc[stream_index] - (1 if res.continues else 0)
        index = np.arange(first, first + n, dtype=np.int64)
        st.next_doc[stream_index] = first + n
        new = np.ones(n, dtype=bool)
        if res.continues and n:
            new[0] = False
        keep = (res.lengths > 0) | ~new
        st.documents += int((keep & new).sum())
        st.empty += int((~keep).sum())
        st.invalid += res.invalid
        st.source_bytes += res.source_bytes
        target = np.zeros(n, dtype=np.int8)  # 0: the stream's split, 1: validation
        if stream.hold_out and n:
            target[is_held_out(index.astype(np.uint64), self.cfg.seed, self.threshold)] = 1
        offsets = np.concatenate([[0], np.cumsum(res.lengths)])
        for code, name in ((0, stream.split), (1, "val")):
            sel = np.flatnonzero(keep & (target == code))
            if len(sel):
                self._append(self.writers[name], res, sel, new[sel], offsets)
        self.tokens_done += len(res.tokens)

    def _append(self, writer: ShardWriter, res: Encoded, sel: np.ndarray, new: np.ndarray,
                offsets: np.ndarray) -> None:
        lengths = res.lengths[sel]
        sep = new.copy()
        if writer.num_tokens == 0 and len(sep):
            sep[0] = False  # the split's first document has nothing before it
        block = lengths + sep
        starts = np.cumsum(block) - block  # where each document's block (separator first) begins
        total = int(block.sum())
        if len(sel) == len(res.lengths) and not sep.any():
            out = res.tokens
        else:
            chosen = np.zeros(len(res.lengths), dtype=bool)
            chosen[sel] = True
            src = res.tokens[np.repeat(chosen, res.lengths)]
            out = np.empty(total, dtype=self.dtype)
            is_sep = np.zeros(total, dtype=bool)
            is_sep[starts[sep]] = True
            out[is_sep] = self.enc.eot_id
            out[~is_sep] = src
        writer.write(out, starts, res.nbytes[sel], new)

    def update_bar(self, res: Encoded) -> None:
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.state.documents:,} docs, "
                                 f"{self.tokens_done / elapsed / 1e6:.2f}M tokens/s",
                                 refresh=False)
        self.bar.update(res.source_bytes)


def _units(cfg: PrepareConfig) -> Iterator[tuple[int, Unit]]:
    for i, stream in enumerate(cfg.streams):
        for unit in stream.source.units(cfg.unit_bytes, cfg.utf8):
            yield i, unit


def _threshold(cfg: PrepareConfig) -> int | None:
    held = [s for s in cfg.streams if s.hold_out]
    if not held:
        return None
    if cfg.val_docs is not None:
        counts = [s.source.count_documents() for s in held]
        if any(c is None for c in counts):
            raise DataError("--val_docs needs the number of documents before reading them, "
                            "which this source does not tell (blank-line or WikiText documents, "
                            "or a stream of unknown length); use --val_fraction")
        total = sum(counts)
        if cfg.val_docs >= total:
            raise DataError(f"--val_docs {cfg.val_docs:,} is not fewer than the source's "
                            f"{total:,} documents")
        return count_threshold(cfg.val_docs, total, cfg.seed)
    return fraction_threshold(cfg.val_fraction or 0.0)


def _validation_record(cfg: PrepareConfig, threshold: int | None) -> dict[str, Any]:
    if cfg.val_docs is not None:
        how = (f"{cfg.val_docs:,} documents held out by a hash of their index seeded with "
               f"{cfg.seed} (spread over the whole source)")
        return {"method": "count", "docs": cfg.val_docs, "seed": cfg.seed,
                "threshold": threshold, "description": how}
    if any(s.hold_out for s in cfg.streams):
        how = (f"documents held out with probability {cfg.val_fraction:g} by a hash of their "
               f"index seeded with {cfg.seed} (spread over the whole source)")
        return {"method": "fraction", "fraction": cfg.val_fraction, "seed": cfg.seed,
                "threshold": threshold, "description": how}
    vals = [s.source.describe() for s in cfg.streams if s.split == "val"]
    if vals:
        return {"method": "source", "description": cfg.validation or f"from {vals[0]}"}
    return {"method": "none", "description": "no validation split"}


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare `cfg.out` (or finish an interrupted preparation); returns the manifest.

    Raises:
        DataError: bad input (one line): nothing is left half-written. An OSError (a full disk)
            leaves the complete shards and the progress record, so that the same command
            continues after space is freed.
    """
    if cfg.val_fraction is not None and cfg.val_docs is not None:
        raise DataError("give --val_fraction or --val_docs, not both")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise DataError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction:g}")
    if cfg.shard_tokens < 1:
        raise DataError("--shard_tokens must be positive")
    try:
        enc = load_encoder(cfg.tokenizer)
    except EncoderError as exc:
        raise DataError(str(exc)) from None
    dtype = dtype_for_vocab(enc.vocab_size, cfg.dtype)
    identity = identity_of(cfg, enc, dtype)
    kind, record = _check_folder(cfg, identity)
    if kind == "done":
        if cfg.log:
            cfg.log(f"{cfg.out} is already prepared from this source with these settings")
        return record
    created = not cfg.out.exists()
    for s in cfg.streams:
        s.source.check()
    threshold = record["threshold"] if record else _threshold(cfg)
    if record:
        cfg.unit_bytes = int(record["unit_bytes"])  # the units done were cut with this size
    cfg.out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, enc, dtype, identity, threshold)
    try:
        return _execute(run, record, created)
    except DataError:
        _abandon(cfg.out, created, run)
        raise


def _abandon(out: Path, created: bool, run: _Run) -> None:
    """After bad input: remove everything this preparation wrote."""
    for w in run.writers.values():
        w.close()
    if out.is_dir():
        _clear(out)
        if created and not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)


def _progress_bar(cfg: PrepareConfig, done: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    total = None
    try:
        sizes = [s.source.total_bytes for s in cfg.streams]
        total = sum(sizes) if all(v is not None for v in sizes) else None
    except OSError:
        pass
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="preparing",
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if tty else 30.0)


def _execute(run: _Run, progress: dict[str, Any] | None, created: bool) -> dict[str, Any]:
    cfg = run.cfg
    run.open_writers(progress)
    skip = run.state.units_done
    if progress and cfg.log:
        kept = sum(len(w.shards) for w in run.writers.values())
        cfg.log(f"resuming the preparation of {cfg.out}: {kept} complete shard(s) kept, "
                f"{skip:,} units of work done")
    run.bar = _progress_bar(cfg, run.state.source_bytes)
    stream_opts = [ReadOptions(s.source.docs, s.source.text_field, cfg.utf8)
                   for s in cfg.streams]
    pool = None
    units = _units(cfg)
    try:
        sizes = [s.source.total_bytes for s in cfg.streams]
        small = all(v is not None for v in sizes) and sum(sizes) <= cfg.unit_bytes
        if cfg.num_proc > 1 and not small:
            pool = _start_pool(cfg.num_proc, cfg.tokenizer, run.dtype.name)
        pending: deque = deque()
        for n, (stream_index, unit) in enumerate(units):
            if n < skip:
                continue
            if pool is None:
                if _WORKER.get("key") != (cfg.tokenizer, run.dtype.name):
                    _init_worker(cfg.tokenizer, run.dtype.name)
                    _WORKER["key"] = (cfg.tokenizer, run.dtype.name)
                _finish_unit(run, stream_index, encode_unit(unit, stream_opts[stream_index]))
                continue
            pending.append((stream_index, pool.apply_async(
                encode_unit, (unit, stream_opts[stream_index]))))
            while len(pending) >= 2 * cfg.num_proc:
                index, result = pending.popleft()
                _finish_unit(run, index, result.get())
        while pending:
            index, result = pending.popleft()
            _finish_unit(run, index, result.get())
        return _complete(run)
    except BaseException:
        for w in run.writers.values():
            w.close()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if run.bar is not None:
            run.bar.close()


def _start_pool(num_proc: int, tokenizer: str, dtype: str):
    """Worker processes that import only this module: they are spawned (fresh interpreters, no
    inherited threads or locks), and without the caller's `__main__`, which multiprocessing
    would otherwise import in each (the trainer's imports torch)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None:
        del main.__file__
    try:
        return mp.get_context("spawn").Pool(num_proc, _init_pool_worker, (tokenizer, dtype))
    finally:
        if path is not None:
            main.__file__ = path


def _finish_unit(run: _Run, stream_index: int, res: Encoded) -> None:
    run.take(stream_index, res)
    run.state.units_done += 1
    run.update_bar(res)
    if run.shard_finished or time.perf_counter() - run.last_checkpoint > CHECKPOINT_SECONDS:
        run.checkpoint()


def _complete(run: _Run) -> dict[str, Any]:
    cfg, st = run.cfg, run.state
    splits = {}
    for name, writer in run.writers.items():
        shards = writer.finish()
        splits[name] = {"tokens": sum(s["tokens"] for s in shards),
                        "documents": sum(s["documents"] for s in shards),
                        "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    described = "; ".join(f"{s.split}{' (and val)' if s.hold_out else ''}: "
                          f"{s.source.describe()}" for s in cfg.streams)
    main = cfg.streams[0]
    if not splits.get(main.split, {}).get("tokens"):
        first = main.source.describe()
        raise DataError(f"{first} holds no tokens (no documents, or only empty ones); give a "
                        "non-empty source" if not (main.hold_out and st.documents) else
                        f"{first}: every document went to validation; lower the validation "
                        "share")
    for name, info in splits.items():
        if not info["tokens"]:
            rule = ("raise --val_fraction or use --val_docs" if name == "val" else
                    "check that source")
            raise DataError(f"the {name} split came out empty ({described}); {rule}")
    manifest = {
        "format": MANIFEST_FORMAT, "shard_format": FORMAT_VERSION,
        "created": datetime.now().isoformat(timespec="seconds"), "command": cfg.command,
        "tokenizer": run.enc.describe(), "dtype": run.dtype.name,
        "separator": {"id": run.enc.eot_id, "text": run.enc.eot_text, "placement": SEPARATOR_RULE},
        "shard_tokens": cfg.shard_tokens,
        "source": [{"split": s.split, "hold_out": s.hold_out, "description": s.source.describe()}
                   for s in cfg.streams],
        "validation": _validation_record(cfg, run.threshold),
        "utf8": {"policy": cfg.utf8, "replaced": st.invalid},
        "documents": {"kept": st.documents, "empty_skipped": st.empty},
        "source_bytes": st.source_bytes,
        "splits": splits,
        "identity_sha256": run.digest, "identity": run.identity,
    }
    with atomic_write(cfg.out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    (cfg.out / PROGRESS).unlink(missing_ok=True)
    if cfg.log:
        seconds = time.perf_counter() - run.t0
        parts = ", ".join(f"{name} {info['tokens']:,} tokens in {len(info['shards'])} shard(s) "
                          f"({info['documents']:,} documents)" for name, info in splits.items())
        fixed = f"; {st.invalid:,} invalid UTF-8 sequences replaced" if st.invalid else ""
        cfg.log(f"prepared {cfg.out}: {parts}; {st.empty:,} empty documents skipped{fixed}; "
                f"{seconds:.1f} s ({run.tokens_done / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")
    return manifest
