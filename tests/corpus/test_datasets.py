"""The built-in data, its prepared cache and epoch batching (corpus/datasets.py, batches.py).

The built-in datasets go through the same preparation as `prepare_data.py`
(tests/corpus/test_prepare.py tests that path for every source format)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from train_helpers import REPO, write_text

from corpus.batches import EpochBatches
from corpus.datasets import DataArgs, DataError, add_data_args, load_split
from corpus.shards import TokenShards
from model.tokenizer import load_tokenizer


def _args(tmp_path, *argv: str) -> DataArgs:
    p = argparse.ArgumentParser()
    add_data_args(p)
    return DataArgs.from_dict(vars(p.parse_args(["--cache_dir", str(tmp_path / "cache"), *argv])))


def test_shakespeare_split_matches_nanogpt(tmp_path):
    args = _args(tmp_path)
    train, train_bytes = load_split(args, "train")
    val, val_bytes = load_split(args, "val")
    assert (len(train), len(val)) == (301_966, 36_059)
    assert isinstance(train, TokenShards) and train.dtype == np.uint16
    # memory-mapped, never read whole: views of the shards' maps
    assert all(isinstance(a.base, np.memmap) for a in train.arrays)
    assert train_bytes + val_bytes == 1_115_394  # Tiny Shakespeare is ASCII
    # The cache holds exactly what the tokenizer gives for the tail 10% of the characters.
    full = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tail = full[int(len(full) * 0.9):]
    assert val.tolist() == load_tokenizer().encode(tail)
    with pytest.raises(DataError, match="only train and val"):
        load_split(args, "test")


def test_cache_manifest_and_rebuild_when_source_changes(tmp_path):
    src = write_text(tmp_path / "a.txt", 300, seed=1)
    args = _args(tmp_path, "--train_file", str(src), "--val_file", str(src))
    tokens, nbytes = load_split(args, "train")
    folder = next((tmp_path / "cache").glob("custom.train.*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "gpt2"
    assert manifest["splits"]["train"]["tokens"] == len(tokens)
    assert manifest["splits"]["train"]["bytes"] == nbytes == src.stat().st_size
    assert manifest["source"][0]["description"] == f"file {src}"  # all of it: no 90/10 rule
    expected = load_tokenizer().encode(src.read_text())
    assert tokens.tolist() == expected

    shard = folder / "train_000000.bin"
    mtime = shard.stat().st_mtime_ns
    load_split(args, "train")  # unchanged source: the cache is reused
    assert shard.stat().st_mtime_ns == mtime

    src.write_text("A different text entirely.\n", encoding="utf-8")
    ids = load_split(args, "train")[0].tolist()
    assert ids == load_tokenizer().encode("A different text entirely.\n")

    shard.write_bytes(b"\x00")  # a damaged cache file is rebuilt too
    assert load_split(args, "train")[0].tolist() == ids


def test_train_file_without_val_file_holds_out_last_tenth(tmp_path):
    src = write_text(tmp_path / "a.txt", 500, seed=2)
    args = _args(tmp_path, "--train_file", str(src))
    text = src.read_text()
    cut = int(len(text) * 0.9)
    train, _ = load_split(args, "train")
    val, val_bytes = load_split(args, "val")
    assert val.tolist() == load_tokenizer().encode(text[cut:])
    assert len(train) > len(val) > 0 and val_bytes == len(text[cut:].encode())
    with pytest.raises(DataError, match="--test_file"):
        load_split(args, "test")


def test_wikitext_dir_separates_articles_with_eos(tmp_path):
    """One <|endoftext|> between articles (the preparation's rule: corpus/prepare.py)."""
    d = tmp_path / "wt"
    d.mkdir()
    article = " = {} = \n \n Some text about {} . \n \n = = Section = = \n \n More text . \n \n"
    (d / "wiki.train.tokens").write_text(article.format("Alpha", "a") + article.format("Beta", "b"))
    (d / "valid.txt").write_text(article.format("Gamma", "c"))
    args = _args(tmp_path, "--dataset", "wikitext", "--data_dir", str(d))
    train, _ = load_split(args, "train")
    eos = load_tokenizer().eos_token_id
    ids = train.tolist()
    assert ids.count(eos) == 1  # one between the two articles, none at the section heading
    first, second = ids[:ids.index(eos)], ids[ids.index(eos) + 1:]
    assert first == load_tokenizer().encode(article.format("Alpha", "a"))
    assert second == load_tokenizer().encode(article.format("Beta", "b"))
    with pytest.raises(DataError, match="test.txt or wiki.test.tokens"):
        load_split(args, "test")


def test_unavailable_data_gives_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails: offline case
    cases = [
        (_args(tmp_path, "--dataset", "wikitext"), "train", "--data_dir"),
        (_args(tmp_path, "--dataset", "wikitext103", "--data_dir", str(tmp_path)), "val",
         "valid.txt"),
        (_args(tmp_path, "--train_file", str(tmp_path / "missing.txt")), "train", "no such file"),
        (_args(tmp_path, "--data_dir", str(tmp_path / "nope")), "train", "not a folder"),
        (_args(tmp_path), "bogus", "unknown split"),
    ]
    for args, split, needle in cases:
        with pytest.raises(DataError, match=needle) as info:
            load_split(args, split)
        assert "\n" not in str(info.value)

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no tokens"):
        load_split(_args(tmp_path, "--train_file", str(tmp_path / "empty.txt")), "train")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_split(_args(tmp_path, "--train_file", str(tmp_path / "latin1.txt")), "train")


def test_hugging_face_path_is_used_when_installed(tmp_path, monkeypatch):
    """With `datasets` importable, WikiText is streamed from load_dataset and prepared once."""
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split, streaming=False):
            calls.append((name, config, split, streaming))
            return [{"text": " = Title = \n"}, {"text": " body text . \n"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    args = _args(tmp_path, "--dataset", "wikitext")
    val, nbytes = load_split(args, "val")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    assert nbytes == len(" = Title = \n body text . \n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # now offline: the prepared cache serves
    assert load_split(args, "val")[0].tolist() == val.tolist() and len(calls) == 1


def test_epoch_batches_cover_each_window_once_in_seeded_order():
    tokens = np.arange(1000, dtype=np.uint16)
    b = EpochBatches(tokens, seq_len=10, batch_size=3, grad_accum=2, world_size=1, seed=7)
    assert b.num_windows == 99 and b.steps_per_epoch == 99 // 6
    seen = []
    for step in range(b.steps_per_epoch):
        for micro in range(2):
            x, y = b.get(0, step, micro)
            assert x.shape == (3, 10) and x.dtype == torch.long
            assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
            seen += x[:, 0].tolist()
    assert len(set(seen)) == len(seen) == b.steps_per_epoch * 6
    offsets = {s % 10 for s in seen}
    assert len(offsets) == 1  # one grid per epoch ...
    again = EpochBatches(tokens, 10, 3, 2, seed=7)
    assert torch.equal(again.get(0, 3, 1)[0], b.get(0, 3, 1)[0])  # ... fixed by (seed, epoch)
    assert not torch.equal(b.get(1, 0, 0)[0], b.get(0, 0, 0)[0])
    assert not torch.equal(EpochBatches(tokens, 10, 3, 2, seed=8).get(0, 0, 0)[0],
                           b.get(0, 0, 0)[0])


def test_windows_across_shards_equal_one_array():
    """The loader's rows over several shards (rows inside one, rows across a boundary) are the
    rows of the same tokens in one array."""
    whole = np.arange(5000, dtype=np.uint16)
    sharded = TokenShards([whole[:1200], whole[1200:1210], whole[1210:4000], whole[4000:]])
    starts = np.array([0, 1190, 1195, 1205, 1300, 3990, 3999, 4979, 17])
    assert np.array_equal(sharded.windows(starts, 21), whole[starts[:, None] + np.arange(21)])
    with pytest.raises(IndexError):
        sharded.windows(np.array([4980]), 21)
    for tokens in (whole, sharded):
        x, y = EpochBatches(tokens, 20, batch_size=4, seed=5).get(1, 3, 0)
        if tokens is whole:
            want = x, y
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])


def test_ranks_split_the_global_batch():
    tokens = np.arange(2000, dtype=np.uint16)
    single = EpochBatches(tokens, 16, batch_size=4, grad_accum=1, world_size=1, seed=3)
    ranks = [EpochBatches(tokens, 16, batch_size=2, grad_accum=1, world_size=2, rank=r, seed=3)
             for r in range(2)]
    for step in range(3):
        whole = single.get(0, step, 0)[0]
        parts = torch.cat([r.get(0, step, 0)[0] for r in ranks])
        assert torch.equal(whole, parts)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="shorter than one training window"):
        EpochBatches(np.arange(10, dtype=np.uint16), seq_len=32, batch_size=1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        EpochBatches(np.arange(100, dtype=np.uint16), seq_len=32, batch_size=8)
