"""Token shards on disk: the file format, its writer, and the memory-mapped view the loader reads.

A prepared data folder holds `manifest.json` and, per split, shards named `<split>_NNNNNN.bin`.
Each shard is a 256-byte header followed by its token ids, little-endian:

    offset  size  field
         0     8  magic b"SLMTOKEN"
         8     4  format version (1)
        12     4  bytes per token: 2 (uint16, when the vocabulary fits) or 4 (uint32)
        16     8  number of tokens
        24     8  number of documents that start in this shard
        32     4  CRC-32 of the token bytes
        36     4  CRC-32 of bytes 0-35 (the header itself)
        40   216  zeros

A shard is written as `<name>.partial` and renamed when complete, so a file under a shard's name
is always whole; opening one checks the header against the file's size (a truncated or damaged
shard is refused, never read past). `TokenShards` joins a split's shards into one read-only,
memory-mapped token sequence: nothing is read until it is indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.fileio import fsync_dir

MAGIC = b"SLMTOKEN"
FORMAT_VERSION = 1
HEADER_BYTES = 256
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "small-lm token shards"
_HEAD = struct.Struct("<8sIIQQI")  # magic, version, itemsize, tokens, documents, data crc
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class DataError(ValueError):
    """Data is unavailable or unusable; the message is one line saying what to do."""


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32.

    Raises:
        DataError: `requested` is "uint16" but the vocabulary does not fit.
    """
    if requested == "uint32":
        return _DTYPES[4]
    fits = vocab_size <= 1 << 16
    if requested == "uint16" and not fits:
        raise DataError(f"the tokenizer has {vocab_size:,} tokens; uint16 holds ids below "
                        "65,536: use --dtype uint32 (or auto)")
    return _DTYPES[2] if fits else _DTYPES[4]


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _pack_header(itemsize: int, tokens: int, documents: int, crc: int) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, itemsize, tokens, documents, crc)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says."""

    itemsize: int
    num_tokens: int
    num_documents: int
    crc32: int

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.itemsize]


def read_header(path: Path) -> ShardHeader:
    """The header of shard `path`, checked against the file's size.

    Raises:
        DataError: not a shard, another format version, a damaged header, or a file whose size
            is not what its header says (truncated, or written past).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc.strerror or exc}") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise DataError(f"{path} is not a token shard (no shard header); prepare the folder "
                        "again with prepare_data.py")
    magic, version, itemsize, tokens, docs, crc = _HEAD.unpack_from(raw)
    (head_crc,) = struct.unpack_from("<I", raw, _HEAD.size)
    if head_crc != zlib.crc32(raw[:_HEAD.size]) or itemsize not in _DTYPES:
        raise DataError(f"{path}: the shard header is damaged; prepare the folder again")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} is shard format {version}; this version reads format "
                        f"{FORMAT_VERSION}: prepare the folder again")
    expected = HEADER_BYTES + tokens * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {what} ({size:,} bytes, its header says {expected:,}); "
                        "the shard is damaged: prepare the folder again")
    return ShardHeader(itemsize, tokens, docs, crc)


def file_crc32(path: Path, num_bytes: int | None = None, offset: int = HEADER_BYTES) -> int:
    """CRC-32 of `num_bytes` bytes of `path` from `offset` (all the rest when None)."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = num_bytes
        while left is None or left > 0:
            chunk = f.read(1 << 24 if left is None else min(1 << 24, left))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            if left is not None:
                left -= len(chunk)
    return crc


def open_shard(path: Path) -> np.ndarray:
    """The tokens of shard `path`, memory-mapped read-only (header checked first)."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES,
                     shape=(header.num_tokens,))


# -- writing ------------------------------------------------------------------------------------


class ShardWriter:
    """Appends one split's tokens to shards of `shard_tokens` tokens (the last one shorter).

    The shard being filled is `<name>.partial`; `checkpoint()` flushes it to disk and returns the
    state that `ShardWriter(..., state=...)` resumes from after a crash.

    Args:
        directory: the prepared data folder.
        split: "train", "val" or "test".
        shard_tokens: tokens per shard.
        dtype: uint16 or uint32 (see `dtype_for_vocab`).
        state: a `checkpoint()` of an interrupted run to continue, or None to start.
        on_shard: called with each completed shard's record (for progress lines).
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype,
                 state: dict[str, Any] | None = None, on_shard=None) -> None:
        self.directory, self.split, self.shard_tokens = Path(directory), split, shard_tokens
        self.dtype = np.dtype(dtype)
        self.on_shard = on_shard or (lambda record: None)
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._tokens = self._docs = self._bytes = self._crc = 0
        if state:
            self._resume(state)

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._tokens

    def _path(self, index: int, partial: bool = False) -> Path:
        return self.directory / (shard_name(self.split, index) + (".partial" if partial else ""))

    def _open(self) -> None:
        self._file = open(self._path(len(self.shards), partial=True), "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # the header is written when the shard is full
        self._tokens = self._docs = self._bytes = self._crc = 0

    def write(self, tokens: np.ndarray, starts: np.ndarray, nbytes: np.ndarray,
              new: np.ndarray) -> None:
        """Append `tokens`. `starts` are the positions in it where documents (or pieces of one)
        begin, `nbytes` their UTF-8 sizes and `new` whether each begins a document: a shard
        counts the documents, and the bytes of the text, that begin in it."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._tokens)
            data = tokens[pos:pos + take].tobytes()
            self._file.write(data)
            self._crc = zlib.crc32(data, self._crc)
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            self._docs += int(new[lo:hi].sum())
            self._bytes += int(nbytes[lo:hi].sum())
            self._tokens += take
            pos += take
            if self._tokens == self.shard_tokens:
                self._complete()

    def _complete(self) -> None:
        f, index = self._file, len(self.shards)
        f.seek(0)
        f.write(_pack_header(self.dtype.itemsize, self._tokens, self._docs, self._crc))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        os.replace(self._path(index, partial=True), self._path(index))
        fsync_dir(self.directory)
        record = {"file": shard_name(self.split, index), "tokens": self._tokens,
                  "documents": self._docs, "bytes": self._bytes, "crc32": self._crc}
        self.shards.append(record)
        self._tokens = self._docs = self._bytes = self._crc = 0
        self.on_shard(record)

    def checkpoint(self) -> dict[str, Any]:
        """Flush the partial shard to disk; the state to resume from."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": [dict(s) for s in self.shards],
                "partial": {"tokens": self._tokens, "documents": self._docs,
                            "bytes": self._bytes, "crc32": self._crc}}

    def finish(self) -> list[dict[str, Any]]:
        """Complete the last (shorter) shard; the records of all shards."""
        if self._file is not None and self._tokens:
            self._complete()
        elif self._file is not None:
            self._file.close()
            self._file = None
            self._path(len(self.shards), partial=True).unlink(missing_ok=True)
        return self.shards

    def close(self) -> None:
        """Close the partial file without completing it (an interrupted run)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _resume(self, state: dict[str, Any]) -> None:
        """Keep the shards `state` lists (checked), cut the partial one back to what it says."""
        for record in state["shards"]:
            path = self.directory / record["file"]
            header = read_header(path)
            if (header.num_tokens, header.crc32) != (record["tokens"], record["crc32"]) or (
                    file_crc32(path) != record["crc32"]):
                raise DataError(f"{path} is not the shard the interrupted preparation wrote; "
                                "delete the folder and prepare it again")
            self.shards.append(dict(record))
        index = len(self.shards)
        partial, final = self._path(index, partial=True), self._path(index)
        if final.exists() and not partial.exists():
            os.replace(final, partial)  # completed after the last checkpoint: fill it again
        for path in self.directory.glob(f"{self.split}_*.bin*"):
            stem = path.name.split(".")[0]
            if int(stem.rsplit("_", 1)[1]) > index or (
                    int(stem.rsplit("_", 1)[1]) == index and path != partial):
                path.unlink()  # written after the last checkpoint; made again below
        want = state["partial"]
        size = HEADER_BYTES + want["tokens"] * self.dtype.itemsize
        if not partial.exists():
            if want["tokens"]:
                raise DataError(f"{partial} is missing; delete the folder and prepare it again")
            return
        with open(partial, "r+b") as f:
            f.truncate(size)
        if partial.stat().st_size != size or file_crc32(partial) != want["crc32"]:
            raise DataError(f"{partial} does not match the preparation's progress record; delete "
                            "the folder and prepare it again")
        self._file = open(partial, "r+b")  # not "ab": the header is written at offset 0 later
        self._file.seek(size)
        self._tokens, self._docs = want["tokens"], want["documents"]
        self._bytes, self._crc = want["bytes"], want["crc32"]


# -- reading ------------------------------------------------------------------------------------


class TokenShards:
    """A split's shards as one read-only token sequence (memory-mapped, never read whole).

    Supports `len`, integer and slice indexing (a slice across shards is joined), and integer
    arrays of any shape (as `EpochBatches` gathers its windows).

    Args:
        arrays: the shards' token arrays, in order.
        files: their paths (for messages and `--explain`).
        num_bytes: the UTF-8 size of the text they encode (None: the manifest does not say).
        data_id: a hash of the shards' sizes and checksums (a resumed run checks that its data is
            the same).
    """

    def __init__(self, arrays: list[np.ndarray], files: list[Path] | None = None,
                 num_bytes: int | None = None, data_id: str | None = None) -> None:
        # Plain ndarray views of the memory maps (no copy; the map stays open through `.base`):
        # indexing them skips np.memmap's per-call wrapping.
        self.arrays = [np.asarray(a) for a in arrays if len(a)]
        self.files = list(files or [])
        self.num_bytes = num_bytes
        self.data_id = data_id
        self.description = ""  # where the tokens come from, for messages and --explain
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype("<u2")
        self.offsets = np.zeros(len(self.arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in self.arrays], out=self.offsets[1:])

    ndim = 1

    @property
    def num_shards(self) -> int:
        return len(self.files) or len(self.arrays)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._slice(key)
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"token {key} outside {n:,} tokens")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.arrays[s][i - self.offsets[s]]
        return self._gather(np.asarray(key))

    def _slice(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self._gather(np.arange(start, stop, step))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
        if first == last:
            base = self.offsets[first]
            return np.asarray(self.arrays[first][start - base:stop - base])
        pieces = []
        for s in range(first, last + 1):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            pieces.append(self.arrays[s][lo - self.offsets[s]:hi - self.offsets[s]])
        return np.concatenate(pieces)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if len(self.arrays) == 1:
            return np.asarray(self.arrays[0][index])
        flat = index.reshape(-1).astype(np.int64, copy=False)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index outside {len(self):,} tokens")
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self.arrays[s][flat[where] - self.offsets[s]]
        return out.reshape(index.shape)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows `self[s:s + length]` for each of `starts`: (B,) -> (B, length).

        What the loader reads per micro-batch: rows inside one shard are gathered from it in one
        indexing (the common case), a row across a shard boundary is joined from both.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"a window outside {len(self):,} tokens")
        span = np.arange(length, dtype=np.int64)
        if len(self.arrays) == 1:
            return self.arrays[0][starts[:, None] + span]
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, starts + (length - 1), side="right") - 1
        if len(starts) and first[0] == first.min() == first.max() == last.max():  # one shard
            return self.arrays[first[0]][(starts - self.offsets[first[0]])[:, None] + span]
        out = np.empty((len(starts), length), dtype=self.dtype)
        for s in np.unique(first):
            rows = np.flatnonzero((first == s) & (last == s))
            if len(rows):
                out[rows] = self.arrays[s][(starts[rows] - self.offsets[s])[:, None] + span]
        for r in np.flatnonzero(first != last):
            out[r] = self._slice(slice(int(starts[r]), int(starts[r]) + length))
        return out

    def tolist(self) -> list[int]:
        return self[:].tolist()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder.

    Raises:
        DataError: the folder does not exist, is not prepared (or not finished), or its
            manifest is unreadable.
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"--data {d}: no such folder; make it with: python prepare_data.py "
                        f"SOURCE --out {d}")
    path = d / MANIFEST
    if not path.is_file():
        unfinished = (d / "progress.json").is_file()
        raise DataError(f"--data {d}: " + (
            "its preparation has not finished; run the same prepare_data.py command again to "
            "complete it" if unfinished else
            f"not a prepared data folder (no {MANIFEST}); make one with: python prepare_data.py "
            f"SOURCE --out {d}"))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); prepare the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a small-lm data manifest; prepare the folder again")
    return manifest


def open_split(directory: str | Path, split: str, manifest: dict[str, Any] | None = None
               ) -> TokenShards:
    """The tokens of `split` in a prepared folder, every shard's header checked.

    Raises:
        DataError: the split is missing or empty, or a shard does not match the manifest.
    """
    d = Path(directory)
    manifest = manifest or read_manifest(d)
    info = (manifest.get("splits") or {}).get(split)
    if not info or not info.get("shards"):
        have = ", ".join(sorted(manifest.get("splits") or {})) or "none"
        how = {"val": "--val_fraction, --val_docs or --val_source", "test": "--test_source"}.get(
            split, "a non-empty source")
        raise DataError(f"{d} has no {split} split (it has: {have}); prepare one with {how}")
    arrays, files = [], []
    for record in info["shards"]:
        path = d / record["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing (listed in {d / MANIFEST}); prepare the folder "
                            "again")
        header = read_header(path)
        if header.num_tokens != record["tokens"] or header.crc32 != record["crc32"]:
            raise DataError(f"{path} does not match {d / MANIFEST} (tokens or checksum); "
                            "prepare the folder again")
        arrays.append(open_shard(path))
        files.append(path)
    content = json.dumps([[r["tokens"], r["crc32"]] for r in info["shards"]])
    recorded = info.get("bytes")  # a hand-made manifest may lack it: no bits per byte then
    num_bytes = int(recorded) if isinstance(recorded, int) and recorded > 0 else None
    return TokenShards(arrays, files, num_bytes=num_bytes,
                       data_id=hashlib.sha256(content.encode()).hexdigest()[:16])
