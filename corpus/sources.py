"""Where documents come from: one reader per source format, cut into units of work.

A source is local files (a path, a glob or a folder of `.txt`, `.jsonl`, `.jsonl.gz`,
`.jsonl.zst`, `.parquet`, `.arrow`) or a Hugging Face dataset read with `streaming=True`. It is
cut into `Unit`s of about `unit_bytes` of text, in source order, at places where cutting cannot
change the tokens:

- plain `.jsonl`, `.parquet`, `.arrow` (one document per record) and `.txt` files are cut into
  byte ranges, row groups or record batches that the worker processes read themselves, so the
  main process only collects tokens;
- compressed JSONL and hub datasets are read in order by the main process, which hands the
  workers the raw records.

How text becomes documents (`docs`): `record` (each record; the default for records), `file`
(each `.txt` file; the default for text), `blank_lines` (paragraphs separated by blank lines) or
`wikitext` (WikiText articles, which start at a ` = Title = ` line). A document longer than a
unit (one huge `.txt` file) is cut where GPT-2's pre-tokenizer always splits: after a newline
between two non-blank ASCII characters, else before a space that precedes an ASCII letter; the
pieces encode to exactly the tokens of the whole.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.shards import DataError

TEXT_EXTS = (".txt",)
RECORD_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
DOC_MODES = ("record", "file", "blank_lines", "wikitext")
UTF8_POLICIES = ("refuse", "replace")

_WIKITEXT_ARTICLE = re.compile(r"^ = (?!=)[^\n]* = *$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
# Where a document may be cut without changing its tokens (see the module docstring).
_SAFE_NEWLINE = re.compile(rb"(?<=[\x21-\x7e])\n(?=[\x21-\x7e])")
_SAFE_SPACE = re.compile(rb" (?=[A-Za-z])")
_BYTE_BLANK_RUN = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+(?=[^\s])")
_BYTE_ARTICLE = re.compile(rb"\n(?= = (?!=)[^\n]* = *\n)")
_WINDOW = 1 << 20  # how far past a nominal cut to look for a safe one


def _file_kind(path: Path) -> str:
    """The format of a file of a `LocalFiles` source: its extension, text when it has none that
    is known (the built-in data's `wiki.train.tokens`; `resolve_local` refuses such names from
    users)."""
    return _ext(path) or ".txt"


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in (*RECORD_EXTS, *TEXT_EXTS):
        if name.endswith(ext):
            return ext
    return ""


@dataclass
class Unit:
    """A piece of work for one worker, in source order.

    Attributes:
        fmt: "text", "jsonl", "parquet", "arrow" (the worker reads `path`), or "texts" / "lines"
            (the main process read them: `payload` holds texts, or JSONL bytes).
        path, start, end: the file, and the byte range / row group / record batches it covers.
        continues: its first document continues the previous unit's last one.
        open_end: its last document continues in the next unit.
        payload: texts or raw JSONL bytes read by the main process.
        joined: concatenate `payload` texts and split them by the document mode.
        source_bytes: input bytes it covers (for the progress bar).
        where: first record's location, for messages.
        invalid: invalid UTF-8 sequences the main process already replaced in `payload`.
    """

    fmt: str
    path: str = ""
    start: int = 0
    end: int = 0
    continues: bool = False
    open_end: bool = False
    payload: Any = None
    joined: bool = False
    source_bytes: int = 0
    where: str = ""
    invalid: int = 0


@dataclass
class ReadOptions:
    """How a worker turns a unit into documents."""

    docs: str = "record"
    text_field: str = "text"
    utf8: str = "refuse"


# -- reading a unit (in a worker) ---------------------------------------------------------------


def _decode(raw: bytes, where: str, utf8: str) -> tuple[str, int]:
    """UTF-8 text of `raw` and how many invalid sequences were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as exc:
        if utf8 == "refuse":
            raise DataError(f"{where}: not UTF-8 (invalid byte at offset {exc.start:,} of this "
                            "part); fix the file, or pass --utf8 replace to replace invalid "
                            "bytes with U+FFFD (they are counted)") from None
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _clean(text: str, where: str, utf8: str) -> tuple[str, int]:
    """`text` made encodable as UTF-8 (lone surrogates, e.g. from JSON escapes)."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        if utf8 == "refuse":
            raise DataError(f"{where}: holds a lone surrogate (\\ud800-\\udfff), which is not "
                            "UTF-8 text; pass --utf8 replace to replace it with U+FFFD") from None
    fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return fixed, fixed.count("\ufffd") - text.count("\ufffd")


def split_documents(text: str, mode: str, open_end: bool = False) -> list[str]:
    """The documents of one text under `mode` (file/record: the text itself).

    blank_lines: the text between runs of blank lines (lines of only spaces and tabs), without
    the line break that ends its last line. wikitext: from one ` = Title = ` line to the next.
    Documents of only whitespace are dropped. `open_end`: the text stops inside a document
    (a unit's end), so its last document is kept as it is.
    """
    if mode == "blank_lines":
        docs = _BLANK_RUN.split(text)
        if docs and docs[-1].endswith("\n") and not open_end:
            docs[-1] = docs[-1][:-1]
        return [d for i, d in enumerate(docs) if d.strip() or (open_end and i == len(docs) - 1)]
    if mode == "wikitext":
        starts = [m.start() for m in _WIKITEXT_ARTICLE.finditer(text)]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        docs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]
        return [d for d in docs if d.strip()]
    return [text]


def _field(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON {type(record).__name__}, not an object; "
                        "each line must be an object such as {\"text\": \"...\"}")
    if name not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise DataError(f"{where}: a record has no {name!r} field (its fields: {fields}); "
                        "name the text field with --text_field")
    return record[name]


def _text_value(value: Any, name: str, where: str, utf8: str) -> tuple[str, int]:
    if isinstance(value, (bytes, bytearray)):
        return _decode(bytes(value), where, utf8)
    if not isinstance(value, str):
        what = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field {name!r} holds {what}, not text; name the text field "
                        "with --text_field")
    return _clean(value, where, utf8)


def _jsonl_texts(raw: bytes, opts: ReadOptions, where: str) -> tuple[list[str], int]:
    texts, bad = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            if opts.utf8 == "refuse":
                _decode(line, where, "refuse")
            text, n = _decode(line, where, "replace")
            bad += n
            record = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{where}: a line is not valid JSON ({str(exc)[:80]})") from None
        text, n = _text_value(_field(record, opts.text_field, where), opts.text_field, where,
                              opts.utf8)
        texts.append(text)
        bad += n
    return texts, bad


def _column_texts(table, opts: ReadOptions, where: str) -> tuple[list[str], int]:
    if opts.text_field not in table.column_names:
        raise DataError(f"{where}: no {opts.text_field!r} column (columns: "
                        f"{', '.join(table.column_names[:8])}); name it with --text_field")
    texts, bad = [], 0
    for value in table.column(opts.text_field).to_pylist():
        text, n = _text_value(value, opts.text_field, where, opts.utf8)
        texts.append(text)
        bad += n
    return texts, bad


def _arrow_reader(path: str):
    import pyarrow as pa

    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_file(source), True
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source), False


def _arrow_batches(path: str, first: int = 0, stop: int | None = None):
    """Record batches `first` .. `stop - 1` of an Arrow IPC file or stream (all by default)."""
    reader, random_access = _arrow_reader(path)
    if random_access:
        last = reader.num_record_batches if stop is None else min(stop, reader.num_record_batches)
        for i in range(first, last):
            yield reader.get_batch(i)
        return
    for i, batch in enumerate(reader):
        if stop is not None and i >= stop:
            break
        if i >= first:
            yield batch


def read_unit(unit: Unit, opts: ReadOptions) -> tuple[list[str], int]:
    """The documents of `unit` (in order) and how many invalid UTF-8 sequences were replaced.

    A unit with `continues` set has as its first document the rest of the previous unit's last.
    """
    where = unit.where or unit.path
    if unit.fmt == "text":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            raw = f.read(unit.end - unit.start)
        text, bad = _decode(raw, where, opts.utf8)
        mode = "file" if opts.docs == "record" else opts.docs
        return split_documents(text, mode, unit.open_end), bad
    if unit.fmt == "jsonl":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            raw = f.read(unit.end - unit.start)
        return _jsonl_texts(raw, opts, where)
    if unit.fmt == "lines":
        return _jsonl_texts(unit.payload, opts, where)
    if unit.fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(unit.path).read_row_group(unit.start, columns=[opts.text_field])
        return _column_texts(table, opts, where)
    if unit.fmt == "arrow":
        import pyarrow as pa

        batches = list(_arrow_batches(unit.path, unit.start, unit.end))
        if not batches:
            return [], 0
        return _column_texts(pa.Table.from_batches(batches), opts, where)
    if unit.fmt == "texts":
        texts, bad = [], unit.invalid
        for value in unit.payload:
            text, n = _text_value(value, opts.text_field, where, opts.utf8)
            texts.append(text)
            bad += n
        if unit.joined:
            return split_documents("".join(texts), opts.docs), bad
        return texts, bad
    raise ValueError(f"unknown unit format {unit.fmt!r}")


# -- sources ------------------------------------------------------------------------------------


@dataclass
class LocalFiles:
    """Local files of the supported formats, in sorted path order.

    Attributes:
        spec: what was given (a path, glob or folder), for messages.
        files: the files, in order.
        docs: the document mode.
        text_field: the field or column holding text (records).
        char_range: (first, stop) character fractions of the concatenated text, for the old
            `--train_file` rule (first 90% / last 10% of characters); None: all of it.
        title: how messages name it (default: its path).
    """

    spec: str
    files: list[Path]
    docs: str
    text_field: str = "text"
    char_range: tuple[float, float] | None = None
    title: str | None = None
    _byte_range: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        lo, hi = self.byte_range()
        return hi - lo if self.char_range else sum(p.stat().st_size for p in self.files)

    def identity(self) -> dict[str, Any]:
        """What makes this source this source: its files' paths, sizes and times."""
        files = []
        for p in self.files:
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return {"kind": "files", "files": files, "docs": self.docs, "text_field": self.text_field,
                "char_range": list(self.char_range) if self.char_range else None}

    def describe(self) -> str:
        n = len(self.files)
        what = self.title or (str(self.files[0]) if n == 1 else f"{self.spec} ({n:,} files)")
        if self.char_range:
            lo, hi = self.char_range
            what += (f", first {hi:.0%} of characters" if lo == 0 else
                     f", last {1 - lo:.0%} of characters")
        return what

    def byte_range(self) -> tuple[int, int]:
        """The byte range `char_range` selects (one text file)."""
        if self.char_range is None:
            return 0, self.files[0].stat().st_size
        if self._byte_range is None:
            self._byte_range = _char_fraction_bytes(self.files[0], self.char_range)
        return self._byte_range

    def check(self) -> None:
        """Fail early: records without the text field, columns that are missing."""
        for p in self.files:
            ext = _file_kind(p)
            if ext == ".jsonl":
                with open(p, "rb") as f:
                    first = next((ln for ln in f if ln.strip()), None)
                if first is not None:
                    _jsonl_texts(first, ReadOptions(self.docs, self.text_field, "replace"),
                                 f"{p}, line 1")
            elif ext in (".parquet", ".arrow"):
                names = (_parquet_columns(p) if ext == ".parquet" else
                         _arrow_reader(str(p))[0].schema.names)
                if self.text_field not in names:
                    raise DataError(f"{p}: no {self.text_field!r} column (columns: "
                                    f"{', '.join(names[:8])}); name it with --text_field")

    def count_documents(self) -> int | None:
        """The number of records, when it is known without reading the text (for --val_docs)."""
        total = 0
        for p in self.files:
            ext = _file_kind(p)
            if ext == ".txt":
                if self.docs != "file":
                    return None
                total += 1
            elif ext == ".parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(p).metadata.num_rows
            elif ext == ".arrow":
                total += sum(b.num_rows for b in _arrow_batches(str(p)))
            else:
                total += _count_jsonl_records(p)
        return total

    def units(self, unit_bytes: int, utf8: str = "refuse") -> Iterator[Unit]:
        """The units of this source, in order."""
        joined_records = self.docs in ("blank_lines", "wikitext")
        for p in self.files:
            ext = _file_kind(p)
            if ext == ".txt":
                lo, hi = self.byte_range() if self.char_range else (0, p.stat().st_size)
                yield from _text_units(p, lo, hi, self.docs, unit_bytes)
            elif ext == ".jsonl" and not joined_records:
                yield from _jsonl_units(p, unit_bytes)
            elif ext == ".parquet" and not joined_records:
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(p).metadata
                for g in range(meta.num_row_groups):
                    yield Unit("parquet", str(p), g, g + 1,
                           source_bytes=p.stat().st_size // meta.num_row_groups,
                           where=f"{p}, row group {g}")
            elif ext == ".arrow" and not joined_records:
                yield from _arrow_units(p, unit_bytes)
            else:  # compressed JSONL, or records joined into documents: read here, in order
                yield from _grouped(_record_texts(p, self.text_field),
                                    ReadOptions(self.docs, self.text_field, utf8), unit_bytes,
                                    str(p), raw_jsonl=ext.startswith(".jsonl") and
                                    not joined_records)


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).schema_arrow.names


def _count_jsonl_records(path: Path) -> int:
    n = 0
    with _open_maybe_compressed(path) as f:
        for line in f:
            n += bool(line.strip())
    return n


def _open_maybe_compressed(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard: pip install zstandard") \
                from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _char_fraction_bytes(path: Path, char_range: tuple[float, float]) -> tuple[int, int]:
    """Byte offsets of character fractions of a UTF-8 file (as Python's `text[:cut]`)."""
    import numpy as np

    size = path.stat().st_size
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            b = np.frombuffer(chunk, dtype=np.uint8)
            total += int(np.count_nonzero((b & 0xC0) != 0x80))  # bytes that start a character
    out = []
    for frac in char_range:
        cut = int(total * frac) if frac not in (0.0, 1.0) else (0 if frac == 0 else total)
        if cut >= total:
            out.append(size)
            continue
        seen = 0
        with open(path, "rb") as f:
            pos = 0
            while chunk := f.read(1 << 24):
                b = np.frombuffer(chunk, dtype=np.uint8)
                starts = np.flatnonzero((b & 0xC0) != 0x80)
                if seen + len(starts) > cut:
                    out.append(pos + int(starts[cut - seen]))
                    break
                seen += len(starts)
                pos += len(chunk)
    return out[0], out[1]


def _find_cut(f, offset: int, end: int, mode: str) -> tuple[int, bool]:
    """A byte offset at or after `offset` (before `end`) where the text may be cut, and whether
    the next unit continues the document there."""
    f.seek(offset)
    window = f.read(min(_WINDOW, end - offset))
    doc_re = {"blank_lines": _BYTE_BLANK_RUN, "wikitext": _BYTE_ARTICLE}.get(mode)
    if doc_re is not None:
        m = doc_re.search(window)
        if m and m.end() < len(window):
            return offset + m.end(), False
    for pattern in (_SAFE_NEWLINE, _SAFE_SPACE):
        m = pattern.search(window, 1)
        if m and m.end() < len(window):
            return offset + (m.end() if pattern is _SAFE_NEWLINE else m.start()), True
    return end, False  # nowhere to cut within the window: this unit runs on


def _text_units(path: Path, lo: int, hi: int, mode: str, unit_bytes: int) -> Iterator[Unit]:
    mode = "file" if mode == "record" else mode
    start, continues = lo, False
    with open(path, "rb") as f:
        while start < hi:
            stop, nxt = hi, False
            if hi - start > unit_bytes:
                stop, nxt = _find_cut(f, start + unit_bytes, hi, mode)
            yield Unit("text", str(path), start, stop, continues=continues, open_end=nxt,
                       source_bytes=stop - start, where=f"{path}, bytes {start:,}-{stop:,}")
            start, continues = stop, nxt
    if lo == hi:  # an empty file is still a (empty) document
        yield Unit("text", str(path), lo, hi, source_bytes=0, where=str(path))


def _jsonl_units(path: Path, unit_bytes: int) -> Iterator[Unit]:
    size = path.stat().st_size
    start = 0
    with open(path, "rb") as f:
        while start < size:
            stop = min(size, start + unit_bytes)
            if stop < size:
                f.seek(stop)
                rest = f.readline()  # to the end of the record the nominal cut falls in
                stop += len(rest)
            yield Unit("jsonl", str(path), start, stop, source_bytes=stop - start,
                       where=f"{path}, bytes {start:,}-{stop:,}")
            start = stop


def _arrow_units(path: Path, unit_bytes: int) -> Iterator[Unit]:
    first, size, i = 0, 0, -1
    for i, batch in enumerate(_arrow_batches(str(path))):
        size += batch.nbytes
        if size >= unit_bytes:
            yield Unit("arrow", str(path), first, i + 1, source_bytes=size,
                       where=f"{path}, record batches {first}-{i}")
            first, size = i + 1, 0
    if first <= i:
        yield Unit("arrow", str(path), first, i + 1, source_bytes=size,
                   where=f"{path}, record batches {first}-{i}")


def _record_texts(path: Path, text_field: str) -> Iterator[tuple[Any, int]]:
    """(record, its input bytes) of a record file, read in order (main process)."""
    ext = _ext(path)
    if ext.startswith(".jsonl"):
        with _open_maybe_compressed(path) as f:
            for line in f:
                yield line, len(line)
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield {text_field: value}, 0
    else:
        for batch in _arrow_batches(str(path)):
            for value in batch.column(text_field).to_pylist():
                yield {text_field: value}, 0


def _grouped(records: Iterator[tuple[Any, int]], opts: ReadOptions, unit_bytes: int,
             where: str, raw_jsonl: bool) -> Iterator[Unit]:
    """Units from records read in order by the main process: raw JSONL lines (the workers parse
    them), or text values, cut only where a document starts (joined modes: the records are
    lines of a text, as WikiText on the hub)."""
    batch: list[Any] = []
    size = consumed = invalid = 0
    joined = opts.docs in ("blank_lines", "wikitext")
    previous_blank = True
    for n, (record, nbytes) in enumerate(records):
        consumed += nbytes
        if raw_jsonl:
            batch.append(record)
            size += len(record)
            if size >= unit_bytes:
                yield Unit("lines", payload=b"".join(batch), source_bytes=consumed, where=where)
                batch, size, consumed = [], 0, 0
            continue
        here = f"{where}, record {n + 1:,}"
        if isinstance(record, (bytes, bytearray)):
            if not record.strip():
                continue
            texts, bad = _jsonl_texts(record, opts, here)
            value, invalid = texts[0], invalid + bad
        else:
            value = _field(record, opts.text_field, here)
        text = value if isinstance(value, str) else ""
        starts_doc = (not joined or (opts.docs == "wikitext" and _WIKITEXT_ARTICLE.match(text))
                      or (opts.docs == "blank_lines" and previous_blank))
        previous_blank = not text.strip()
        if starts_doc and size >= unit_bytes and batch:
            yield Unit("texts", payload=batch, joined=joined, source_bytes=consumed, where=where,
                       invalid=invalid)
            batch, size, consumed, invalid = [], 0, 0, 0
        batch.append(value)
        size += len(text)
    if batch:
        if raw_jsonl:
            yield Unit("lines", payload=b"".join(batch), source_bytes=consumed, where=where)
        else:
            yield Unit("texts", payload=batch, joined=joined, source_bytes=consumed, where=where,
                       invalid=invalid)


@dataclass
class HubDataset:
    """A Hugging Face dataset, streamed (`datasets.load_dataset(..., streaming=True)`).

    With `data_files`, `name` is a builder such as "json" or "parquet" reading local files:
    the same code as a hub name, minus the download.
    """

    name: str
    config: str | None
    split: str
    text_field: str = "text"
    docs: str = "record"
    data_files: list[str] | None = None
    revision: str | None = None
    total_bytes: int | None = None
    hint: str = ""  # appended to the errors of opening it (what to do instead)
    _dataset: Any = field(default=None, repr=False)

    def identity(self) -> dict[str, Any]:
        files = None
        if self.data_files:
            files = []
            for pattern in self.data_files:
                for p in sorted(globlib.glob(pattern, recursive=True)) or [pattern]:
                    st = os.stat(p) if os.path.exists(p) else None
                    files.append([str(Path(p).resolve()), st.st_size if st else None,
                                  st.st_mtime_ns if st else None])
        return {"kind": "hub", "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field, "docs": self.docs, "data_files": files,
                "revision": self.revision}

    def describe(self) -> str:
        cfg = f" ({self.config})" if self.config else ""
        files = f" from {', '.join(self.data_files)}" if self.data_files else ""
        return f"Hugging Face dataset {self.name}{cfg}, split {self.split}{files}"

    def dataset(self):
        """The streaming dataset (opened once)."""
        if self._dataset is None:
            self._dataset = _load_hub(self)
        return self._dataset

    def check(self) -> None:
        features = getattr(self.dataset(), "features", None)
        if features and self.text_field not in features:
            raise DataError(f"{self.describe()}: no {self.text_field!r} field (fields: "
                            f"{', '.join(list(features)[:8])}); name it with --text_field")

    def count_documents(self) -> int | None:
        info = getattr(self.dataset(), "info", None)
        splits = getattr(info, "splits", None) or {}
        split = splits.get(self.split) if hasattr(splits, "get") else None
        return int(split.num_examples) if split and split.num_examples else None

    def units(self, unit_bytes: int, utf8: str = "refuse") -> Iterator[Unit]:
        def records():
            for row in self.dataset():
                yield row, 0

        yield from _grouped(records(), ReadOptions(self.docs, self.text_field, utf8), unit_bytes,
                            self.describe(), raw_jsonl=False)


def _load_hub(src: HubDataset):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{src.describe()}: reading Hugging Face datasets needs `pip install "
                        f"datasets`{src.hint}") from None
    kwargs: dict[str, Any] = {"split": src.split, "streaming": True}
    if src.data_files:
        kwargs["data_files"] = src.data_files
    if src.revision:
        kwargs["revision"] = src.revision
    try:
        return datasets.load_dataset(src.name, src.config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to open becomes one actionable line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        todo = src.hint.lstrip("; ") or ("check the name, --config and --split, and that the "
                                         "hub is reachable (or pass local files)")
        raise DataError(f"could not open {src.describe()} ({first}); {todo}") from None


def local_files(spec: str) -> list[Path] | None:
    """The supported files `spec` names (a file, a folder, a glob), sorted; None if it names no
    existing path or glob match."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if q.is_file() and _ext(q))
        return found
    if any(c in spec for c in "*?["):
        matches = sorted(Path(m) for m in globlib.glob(spec, recursive=True))
        return [m for m in matches if m.is_file()]
    return None


def resolve_local(spec: str, docs: str | None, text_field: str,
                  char_range: tuple[float, float] | None = None) -> LocalFiles:
    """A `LocalFiles` source for `spec`.

    Raises:
        DataError: nothing there, unsupported files, or a document mode that does not fit.
    """
    files = local_files(spec)
    if files is None:
        raise DataError(f"{spec}: no such file, folder or glob")
    if not files:
        raise DataError(f"{spec}: holds no .txt, .jsonl(.gz/.zst), .parquet or .arrow files")
    unknown = [f for f in files if not _ext(f)]
    if unknown:
        raise DataError(f"{unknown[0]}: unsupported file type; use .txt, .jsonl, .jsonl.gz, "
                        ".jsonl.zst, .parquet or .arrow")
    texts = [f for f in files if _ext(f) == ".txt"]
    if docs is None:
        docs = "file" if len(texts) == len(files) else "record"
    if texts and len(texts) != len(files):
        raise DataError(f"{spec} mixes .txt and record files; prepare them separately")
    if docs == "file" and not texts:
        raise DataError(f"--docs file is for .txt files; {spec} holds records (use --docs record)")
    if docs == "record" and texts:
        raise DataError(f"--docs record is for record files; {spec} holds .txt files (use --docs "
                        "file, blank_lines or wikitext)")
    if char_range and (len(files) != 1 or _ext(files[0]) != ".txt"):
        raise DataError("a split by characters needs one .txt file")
    return LocalFiles(spec, files, docs, text_field, char_range)
