"""prepare_data.py: every source format round-trips, output is deterministic, kill -9 resumes
to identical shards, bad input is one line and exit 2 (corpus/prepare.py, sources.py,
shards.py, encoders.py)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from corpus import shards as shards_mod
from corpus.encoders import load_encoder
from corpus.prepare import is_held_out
from corpus.shards import HEADER_BYTES, open_split, read_header, read_manifest

REPO = Path(__file__).resolve().parents[2]
# GPT-2 pre-tokenizer corner cases: contractions, number runs, whitespace runs and their ends,
# CRLF, tabs, non-ASCII letters and marks, emoji, CJK, a literal end-of-text marker.
TRICKY = [
    "I'm sure you'll see it's 'quoted' -- don't they've we'd?",
    "Numbers: 12345678 3.14159 1,000,000 and 2024-01-01T00:00:00Z",
    "  leading spaces, trailing spaces   \n\n\n   \t\ttabs\tand\r\nCRLF\r\n",
    "caf\u00e9 na\u0131ve \u00fcber e\u0301 \u00c5ngstr\u00f6m \u0391\u03b8\u03ae\u03bd\u03b1",
    "emoji \U0001F600\U0001F469\u200d\U0001F4BB and CJK \u6f22\u5b57\u304b\u306a "
    "\ud55c\uad6d\uc5b4",
    "a literal <|endoftext|> inside a document is ordinary text",
    "x" * 300 + " " * 40 + "end",
    "\u00a0non-breaking\u2003em space\u3000ideographic space",
]


@pytest.fixture(scope="module")
def enc():
    return load_encoder("gpt2")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Real text documents (speeches of Tiny Shakespeare) and the tricky ones, no blank lines
    inside (so the blank-line format can hold them too)."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if s.strip()][:120]
    tricky = [t.replace("\n\n\n", "\n") for t in TRICKY]
    out = speeches[:40] + tricky + speeches[40:]
    out.append("\n".join(speeches[:200]))  # a long document: cut across several units
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = prepare_data.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _prepare(src, out, capsys, *extra: str) -> dict:
    code, _, err = _run([str(src), "--out", str(out), "--no_progress", "--num_proc", "1",
                         "--unit_mb", "0.004", "--shard_tokens", "700", *extra], capsys)
    assert code == 0, err
    return read_manifest(out)


def _documents(out: Path, split: str, enc) -> list[list[int]]:
    """A split's tokens cut at the separators."""
    ids = open_split(out, split)[:].tolist()
    result, cur = [], []
    for t in ids:
        if t == enc.eot_id:
            result.append(cur)
            cur = []
        else:
            cur.append(t)
    return result + [cur]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


# -- the tokenizer ------------------------------------------------------------------------------


def test_gpt2_ids_equal_hugging_face_gpt2(enc, docs):
    """tiktoken built from the bundled files gives GPT-2's ids: the Hugging Face GPT-2 tokenizers
    (the Rust one, and the Python port of OpenAI's encoder.py) agree on every text. Documents
    are ordinary text, as in OpenAI's encoder: a literal `<|endoftext|>` is its characters'
    tokens (HF's `split_special_tokens=True`), so only the inserted separator is id 50256."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    from model.tokenizer import BUNDLED_GPT2_DIR

    fast = GPT2TokenizerFast.from_pretrained(str(BUNDLED_GPT2_DIR), split_special_tokens=True)
    slow = GPT2Tokenizer.from_pretrained(str(BUNDLED_GPT2_DIR), split_special_tokens=True)
    texts = [*TRICKY, *docs[:60], docs[-1][:20000], "", " ", "\n", "<|endoftext|>"]
    for text in texts:
        ours = enc.encode(text).tolist()
        assert ours == fast.encode(text) == slow.encode(text), text[:60]
        assert enc.decode(ours) == text
    assert enc.eot_id == fast.eos_token_id == 50256 and enc.vocab_size == 50257
    assert 50256 not in enc.encode(TRICKY[5]).tolist()


# -- every source format round-trips --------------------------------------------------------


def _write_records(path: Path, records: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    name = path.name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    elif name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [r["text"] for r in records]}), path, row_group_size=13)
    elif name.endswith(".arrow"):
        import pyarrow as pa

        table = pa.table({"text": [r["text"] for r in records]})
        stream = "stream" in name
        opener = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opener(str(path), table.schema) as w:
            for batch in table.to_batches(max_chunksize=11):
                w.write_batch(batch)
    else:
        path.write_text(lines, encoding="utf-8")


WIKI = (" = {t} = \n \n {t} is a topic . It has text @-@ like this . \n \n = = Part = = \n \n "
        "More . \n")

FORMATS = ["txt files", "txt blank_lines", "txt wikitext", "jsonl", "jsonl.gz", "jsonl.zst",
           "parquet", "arrow", "stream.arrow"]


def _make_source(fmt: str, tmp: Path, docs: list[str]) -> tuple[Path, list[str], list[str]]:
    """(source path, the documents it holds in order, extra flags); record formats hold an empty
    record too (skipped, but counted as a document index)."""
    if fmt == "txt files":
        folder = tmp / "books"
        folder.mkdir()
        for i, d in enumerate(docs):
            (folder / f"{i:04d}.txt").write_text(d, encoding="utf-8")
        return folder, docs, []
    if fmt == "txt blank_lines":
        path = tmp / "paragraphs.txt"
        path.write_text("\n\n".join(d.strip("\n") for d in docs) + "\n", encoding="utf-8")
        return path, [d.strip("\n") for d in docs], ["--docs", "blank_lines"]
    if fmt == "txt wikitext":
        articles = [WIKI.format(t=f"Topic {i}") for i in range(30)]
        path = tmp / "wiki.txt"
        path.write_text("".join(articles), encoding="utf-8")
        return path, articles, ["--docs", "wikitext"]
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    records.insert(7, {"text": "", "id": -1})
    path = tmp / f"corpus.{fmt}"
    _write_records(path, records)
    return path, [r["text"] for r in records], []


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips(fmt, tmp_path, capsys, enc, docs):
    src, held, extra = _make_source(fmt, tmp_path, docs)
    out = tmp_path / "out"
    manifest = _prepare(src, out, capsys, "--val_fraction", "0.2", "--seed", "3", *extra)
    threshold = manifest["validation"]["threshold"]
    to_val = is_held_out(np.arange(len(held), dtype=np.uint64), 3, threshold)
    want = {"train": [d for d, v in zip(held, to_val, strict=True) if not v and d],
            "val": [d for d, v in zip(held, to_val, strict=True) if v and d]}
    assert want["val"] and want["train"]
    for split, expected in want.items():
        got = _documents(out, split, enc)
        assert [enc.decode(ids) for ids in got] == expected  # every document, in order
        assert got == [enc.encode(d).tolist() for d in expected]  # the tokenizer's own ids
        info = manifest["splits"][split]
        assert info["documents"] == sum(s["documents"] for s in info["shards"]) == len(expected)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in expected)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == (
            sum(len(g) for g in got) + len(got) - 1)  # a separator between documents
        for record in info["shards"]:
            header = read_header(out / record["file"])
            assert (header.num_tokens, header.itemsize) == (record["tokens"], 2)
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert manifest["separator"]["id"] == 50256 and manifest["dtype"] == "uint16"
    assert manifest["documents"]["empty_skipped"] == (0 if fmt.startswith("txt") else 1)
    assert manifest["tokenizer"]["files_sha256"] == enc.fingerprint
    assert "--val_fraction 0.2" in manifest["command"]
    assert not (out / "progress.json").exists()


def test_hub_dataset_through_datasets_on_local_files(tmp_path, capsys, enc, docs):
    """`hf:json --data_files` runs `datasets.load_dataset("json", split=, streaming=True)`: the
    code a hub name runs, minus the download. Same documents, same shards as the local reader."""
    src = tmp_path / "c.jsonl"
    _write_records(src, [{"text": d} for d in docs[:60]])
    local = _prepare(src, tmp_path / "local", capsys, "--val_docs", "6")
    code, _, err = _run(["hf:json", "--data_files", str(src), "--out", str(tmp_path / "hub"),
                         "--no_progress", "--num_proc", "1", "--shard_tokens", "700",
                         "--val_fraction", "0.1"], capsys)
    assert code == 0, err
    hub = read_manifest(tmp_path / "hub")
    assert hub["source"][0]["description"].startswith("Hugging Face dataset json, split train")
    kept = [d for d, v in zip(docs[:60], is_held_out(np.arange(60, dtype=np.uint64), 0,
                                                     hub["validation"]["threshold"]),
                              strict=True) if not v]
    assert _documents(tmp_path / "hub", "train", enc) == [enc.encode(d).tolist() for d in kept]
    assert local["splits"]["val"]["documents"] == 6  # --val_docs: exactly that many


def test_same_source_same_shards_whatever_the_processes(tmp_path, capsys, docs):
    """Byte-identical shards with 1 process and 8 KiB units vs 2 worker processes and 1 KiB."""
    src = tmp_path / "c.jsonl"
    _write_records(src, [{"text": d} for d in docs * 3])
    args = ["--no_progress", "--shard_tokens", "5000", "--val_fraction", "0.05"]
    for name, procs, unit in (("a", "1", "0.008"), ("b", "2", "0.001")):
        code, _, err = _run([str(src), "--out", str(tmp_path / name), "--num_proc", procs,
                             "--unit_mb", unit, *args], capsys)
        assert code == 0, err
    a, b = _shard_bytes(tmp_path / "a"), _shard_bytes(tmp_path / "b")
    assert len(a) > 3 and a == b
    assert read_manifest(tmp_path / "a")["splits"] == read_manifest(tmp_path / "b")["splits"]


# -- kill -9 and the same command again ------------------------------------------------------


def test_kill_9_then_the_same_command_gives_identical_shards(tmp_path, capsys, docs):
    src = tmp_path / "big.jsonl"
    _write_records(src, [{"text": d} for d in docs * 24])  # ~1.6M tokens
    argv = [str(src), "--out", str(tmp_path / "out"), "--no_progress", "--num_proc", "2",
            "--unit_mb", "0.05", "--shard_tokens", "40000", "--val_fraction", "0.01"]
    proc = subprocess.Popen([sys.executable, "prepare_data.py", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # the event: the second complete shard
            lines.append(line)
            if line.startswith("wrote train_000001.bin"):
                os.killpg(proc.pid, signal.SIGKILL)  # the process and its workers, mid-run
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, lines
    out = tmp_path / "out"
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    first = out / "train_000000.bin"
    kept = first.stat().st_ino, first.stat().st_mtime_ns

    code, stdout, err = _run(argv, capsys)  # the same command (in this process)
    assert code == 0, err
    assert "resuming the preparation" in stdout and "complete shard(s) kept" in stdout
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # not redone
    code, _, err = _run([*argv[:2], str(tmp_path / "clean"), *argv[3:]], capsys)
    assert code == 0, err
    resumed, clean = _shard_bytes(out), _shard_bytes(tmp_path / "clean")
    assert len(clean) > 5 and resumed == clean
    assert not list(out.glob("*.partial")) and not (out / "progress.json").exists()


# -- bad input: one line, exit 2, nothing half-written -------------------------------------------


def _error(argv, capsys) -> str:
    code, _, err = _run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory) -> Path:
    """A 70,002-token word-level tokenizer folder (offline): too big for uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("bigtok")
    vocab = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000, "<eos>": 70001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>",
         "unk_token": "[UNK]"}))
    return folder


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, capsys, big_vocab, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    base = ["--out", str(out), "--no_progress", "--num_proc", "1"]

    def refused(src, *extra, needle):
        line = _error([str(src), *base, *extra], capsys)
        assert needle in line, line
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
        return line

    (tmp_path / "field.jsonl").write_text('{"content": "text"}\n')
    refused(tmp_path / "field.jsonl", needle="no 'text' field (its fields: content)")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ol\xe9\nfine text\n".encode("latin-1"))
    refused(tmp_path / "latin1.txt", needle="not UTF-8")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "ok"}\n')
    refused(tmp_path / "latin1.jsonl", needle="not UTF-8")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    refused(tmp_path / "empty.jsonl", needle="holds no tokens")
    (tmp_path / "none").mkdir()
    refused(tmp_path / "none", needle="holds no .txt")
    refused(tmp_path / "missing.jsonl", needle="no such file")
    (tmp_path / "words.txt").write_text("w1 w2 w69999 w3\n")
    refused(tmp_path / "words.txt", "--tokenizer", str(big_vocab), "--dtype", "uint16",
            needle="uint16 holds ids below 65,536")

    # Replace instead of refuse: counted in the manifest.
    code, _, err = _run([str(tmp_path / "latin1.jsonl"), *base, "--utf8", "replace",
                         "--val_docs", "1"], capsys)
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["utf8"] == {"policy": "replace", "replaced": 1}

    # A folder prepared from another source, or with another tokenizer, is refused, not mixed.
    assert "another source" in _error([str(tmp_path / "words.txt"), *base], capsys)
    assert "another tokenizer" in _error([str(tmp_path / "latin1.jsonl"), *base, "--utf8",
                                          "replace", "--val_docs", "1", "--tokenizer",
                                          str(big_vocab)], capsys)
    assert read_manifest(out)["identity_sha256"] == manifest["identity_sha256"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    assert "not empty" in _error([str(tmp_path / "words.txt"), "--out",
                                  str(tmp_path / "other")], capsys)

    # A vocabulary past uint16 is stored as uint32 when the type is left to auto.
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.txt").write_text("w1 w69999 w3")
    (tmp_path / "w" / "b.txt").write_text("w7 w65536")
    code, _, err = _run([str(tmp_path / "w"), "--out", str(tmp_path / "u32"), "--no_progress",
                         "--tokenizer", str(big_vocab), "--val_docs", "1"], capsys)
    assert code == 0, err
    m32 = read_manifest(tmp_path / "u32")
    assert m32["dtype"] == "uint32" and m32["separator"]["id"] == 70001
    both = [*open_split(tmp_path / "u32", "train")[:].tolist(),
            *open_split(tmp_path / "u32", "val")[:].tolist()]
    assert sorted(both) == [1, 3, 7, 65536, 69999]


def test_full_disk_keeps_the_complete_shards_and_the_same_command_finishes(
        tmp_path, capsys, monkeypatch, docs):
    src = tmp_path / "c.jsonl"
    _write_records(src, [{"text": d} for d in docs * 4])
    argv = [str(src), "--out", str(tmp_path / "out"), "--no_progress", "--num_proc", "1",
            "--unit_mb", "0.01", "--shard_tokens", "20000", "--val_docs", "5"]
    real = shards_mod.ShardWriter._complete
    count = [0]

    def full(self):
        count[0] += 1
        if count[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
        return real(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "_complete", full)
    line = _error(argv, capsys)
    assert "No space left on device" in line and "run the same command again" in line
    assert (tmp_path / "out" / "progress.json").exists()
    monkeypatch.setattr(shards_mod.ShardWriter, "_complete", real)
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    code, _, err = _run([*argv[:2], str(tmp_path / "clean"), *argv[3:]], capsys)
    assert code == 0, err
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "clean")


def test_damaged_shards_are_refused(tmp_path, capsys, docs):
    src = tmp_path / "c.jsonl"
    _write_records(src, [{"text": d} for d in docs[:80]])
    _prepare(src, tmp_path / "out", capsys, "--val_docs", "3")
    shard = tmp_path / "out" / "train_000001.bin"
    code, stdout, _ = _run(["--verify", str(tmp_path / "out")], capsys)
    assert code == 0 and "all headers, sizes and checksums match" in stdout
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 10] ^= 0xFF  # one token's bytes changed: the size is right
    shard.write_bytes(bytes(raw))
    assert "do not match their checksum" in _error(["--verify", str(tmp_path / "out")], capsys)
    shard.write_bytes(bytes(raw[:-3]))  # truncated
    with pytest.raises(shards_mod.DataError, match="truncated"):
        open_split(tmp_path / "out", "train")
    assert "truncated" in _error(["--verify", str(tmp_path / "out")], capsys)
    shard.write_bytes(bytes(raw) + b"\0\0")  # longer than the header says
    assert "longer than its header says" in _error(["--verify", str(tmp_path / "out")], capsys)
    head = bytearray(raw)
    head[16] ^= 0x01  # the header's token count changed: its own checksum no longer matches
    shard.write_bytes(bytes(head))
    with pytest.raises(shards_mod.DataError, match="header is damaged"):
        open_split(tmp_path / "out", "train")
    shard.write_bytes(b"\0" * 8 + bytes(raw[8:]))  # no magic: not a shard at all
    assert "is not a token shard" in _error(["--verify", str(tmp_path / "out")], capsys)
