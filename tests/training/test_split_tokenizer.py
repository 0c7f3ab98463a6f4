"""`train_lm.py --train_tokenizer N`: a BPE trained on the run's own training split, cached,
carried by the run's snapshots to generation and evaluation, kept by a resume, and overridden
by a tokenizer the command names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluate_lm
import generate_lm
from corpus.datasets import DataArgs
from corpus.shards import DataError
from corpus.split_tokenizer import split_tokenizer_folder, with_split_tokenizer
from model.tokenizer import load_checkpoint_tokenizer
from training import train_lm

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
         "--max_seq_len", "32", "--eval_windows", "4", "--warmup_steps", "1", "--dropout", "0",
         "--no_plot", "--batch_size", "4", "--eval_interval", "2"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """60 KB of Tiny Shakespeare: its last 10% is the validation split."""
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000],
                    encoding="utf-8")
    return path


def _run(text: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--train_file", str(text), "--cache_dir", str(tmp / "cache"),
            "--out_dir", str(tmp / "run"), *MODEL, *extra]


def test_trained_cached_carried_and_resumed(text, tmp_path, capsys, monkeypatch):
    flags = _run(text, tmp_path, "--train_tokenizer", "320", "--max_steps", "4")
    monkeypatch.setenv("LM_MAX_STEPS", "2")  # stop half way, to resume below
    assert train_lm.main(flags) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert "trained a byte-level BPE of 320 tokens on the training split" in out
    assert str(folder) in out
    data = DataArgs(train_file=str(text), cache_dir=str(tmp_path / "cache"), train_tokenizer=320)
    assert split_tokenizer_folder(data, 320) == folder
    ckpt = torch.load(tmp_path / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == 320 and ckpt["args"]["train_tokenizer"] == 320
    tok = load_checkpoint_tokenizer(ckpt)  # the snapshot carries the trained files
    sample = "ROMEO: O, she doth teach the torches to burn bright! \u00e9\u00e8 \U0001f600"
    assert len(tok) == 320 and tok.decode(tok.encode(sample)) == sample
    first = {p.name: p.read_bytes() for p in folder.iterdir()}

    # resume on a machine without the cache: the same files are trained again, identically
    monkeypatch.delenv("LM_MAX_STEPS")
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    assert train_lm.main([*flags, "--resume", "auto"]) == 0
    assert "trained a byte-level BPE" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    ckpt = torch.load(tmp_path / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 4

    # a rerun finds the cache: nothing trained
    assert train_lm.main([*flags, "--out_dir", str(tmp_path / "again")]) == 0
    assert "trained a byte-level BPE" not in capsys.readouterr().out

    # generation and evaluation take the tokenizer from the checkpoint: no flag
    best = str(tmp_path / "run" / "snapshots" / "latest.pt")
    assert generate_lm.main(["--checkpoint", best, "--prompt", "ROMEO:", "--max_new_tokens", "5",
                             "--device", "cpu", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert evaluate_lm.main(["--checkpoint", best, "--train_file", str(text), "--json",
                             "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bits_per_byte"] > 0 and report["num_tokens"] > 0


def test_named_tokenizer_wins_over_a_presets(text, tmp_path):
    data = DataArgs(train_file=str(text), cache_dir=str(tmp_path), train_tokenizer=512)
    kept = with_split_tokenizer(data, tokenizer_given=True, train_given=False, say=print)
    assert kept.tokenizer == "gpt2" and kept.train_tokenizer == 0
    assert not (tmp_path / "tokenizers").exists()
    with pytest.raises(DataError, match="drop one of them"):
        with_split_tokenizer(data, tokenizer_given=True, train_given=True, say=print)
    shards = DataArgs(data=str(tmp_path), train_tokenizer=512)
    assert with_split_tokenizer(shards, False, False, print).train_tokenizer == 0
    with pytest.raises(DataError, match="--data already names the tokenizer"):
        with_split_tokenizer(shards, False, True, print)


@pytest.mark.parametrize("value, message", [
    ("100", "--train_tokenizer 100: --vocab_size 100 is below the byte alphabet"),
    ("-3", "--train_tokenizer: expected a vocabulary size"),
    ("4k", "--train_tokenizer: expected a vocabulary size"),
])
def test_bad_sizes_one_line(text, tmp_path, capsys, value, message):
    code = train_lm.main([*_run(text, tmp_path, "--max_steps", "1"), "--train_tokenizer", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "snapshots").exists()
