"""Training and evaluating on a prepared folder (`--data DIR`): the loader over shards on two
ranks, exact resume, a resume with another process count, `--log_to`, and bad folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate_lm
import prepare_data
from corpus.batches import EpochBatches
from corpus.shards import open_split, read_manifest
from training import train_lm
from training.metrics import read_metrics
from training.options import UsageError
from training.start import RunStart, keep_global_batch

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
         "--max_seq_len", "32", "--eval_windows", "8", "--warmup_steps", "2", "--lr", "3e-3",
         "--dropout", "0", "--no_plot"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Tiny Shakespeare's first 400 speeches as JSONL documents, in shards of 1,500 tokens."""
    root = tmp_path_factory.mktemp("prepared")
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    speeches = [s for s in text.split("\n\n") if s.strip()][:400]
    src = root / "speeches.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches), encoding="utf-8")
    code = prepare_data.main([str(src), "--out", str(root / "data"), "--no_progress",
                              "--num_proc", "1", "--shard_tokens", "1500", "--val_docs", "40"])
    assert code == 0
    return root / "data"


def _flags(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out_dir", str(run), *MODEL, *extra]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "train"]


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# -- one process ------------------------------------------------------------------------------


def test_train_explain_evaluate_and_log_to_every_backend(prepared, tmp_path, capsys,
                                                         monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here: offline, synced later
    monkeypatch.setenv("WANDB_SILENT", "true")
    manifest = read_manifest(prepared)
    run = tmp_path / "run"
    flags = _flags(prepared, run, "--batch_size", "4", "--max_steps", "4", "--log_interval", "1",
                   "--eval_interval", "2", "--log_to", "csv,tensorboard,wandb")

    assert train_lm.main([*flags, "--explain"]) == 0
    explained = capsys.readouterr().out
    shards = len(manifest["splits"]["train"]["shards"])
    assert f"{manifest['splits']['train']['tokens']:,} tokens in {shards} shard(s)" in explained
    assert re.search(r"4 steps = 0\.\d\d epochs", explained), explained

    assert train_lm.main(flags) == 0
    out = capsys.readouterr().out
    assert f"{manifest['splits']['train']['tokens']:,} train" in out
    rows = _train_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["grad_norm"]) > 0 for r in rows) and all(r["mfu"] == "" for r in rows)
    losses = [float(r["loss"]) for r in rows]
    val_rows = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "val"]
    val = [float(r["loss"]) for r in val_rows]
    bpb = [float(r["bits_per_byte"]) for r in val_rows]
    assert len(bpb) == 2 and all(0 < b < 20 for b in bpb)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/loss",
            "val/ppl", "val/bits_per_byte"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx(val, rel=1e-6)
    assert [e.value for e in events.Scalars("val/bits_per_byte")] == pytest.approx(bpb, rel=1e-6)

    # W&B's offline record log, read record by record (its history rows, each scalar as JSON)
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in _wandb_records(record) if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(losses,
                                                                                  rel=1e-6)
    assert [h["val/loss"] for h in history if "val/loss" in h] == pytest.approx(val, rel=1e-6)
    assert [h["val/bits_per_byte"] for h in history if "val/bits_per_byte" in h] \
        == pytest.approx(bpb, rel=1e-6)
    assert all("train/grad_norm" in h for h in history if "train/loss" in h)

    assert evaluate_lm.main(["--checkpoint", str(run), "--data", str(prepared), "--json",
                             "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_tokens"] == manifest["splits"]["val"]["tokens"]
    assert str(prepared) in report["data"] and "val split" in report["data"]


def _wandb_records(path: Path):
    """The protobuf records of a W&B offline run file: a 7-byte header, then LevelDB's log
    format (32 KiB blocks; each chunk a 7-byte header: crc32, length, kind; a record spans
    chunks FIRST, MIDDLE..., LAST; a block's tail under 7 bytes is padding)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # padding to the block's end
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def _one_error(argv: list[str], capsys, main=train_lm.main) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_data_folders_are_one_line_errors(prepared, tmp_path, capsys):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(prepared, tmp_path / name))

    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "progress.json").write_text("{}")
    other_tok = copy("other_tokenizer")
    manifest = json.loads((other_tok / "manifest.json").read_text())
    manifest["tokenizer"]["files_sha256"] = "0" * 64  # prepared with other tokenizer files
    (other_tok / "manifest.json").write_text(json.dumps(manifest))
    truncated = copy("truncated")
    shard = truncated / "train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    cases = [
        (empty, [], "not a prepared data folder (no manifest.json)"),
        (tmp_path / "missing", [], "no such folder"),
        (unfinished, [], "its preparation has not finished"),
        (other_tok, [], "was prepared with tokenizer 'gpt2' (files sha256 000000000000)"),
        (truncated, [], "train_000002.bin is truncated"),
        (prepared, ["--train_file", str(REPO / "README.md")], "drop --train_file"),
    ]
    for folder, extra, needle in cases:
        line = _one_error(_flags(folder, tmp_path / "run", "--max_steps", "1", *extra), capsys)
        assert needle in line, line
    line = _one_error(["--checkpoint", str(REPO / "missing.pt"), "--data", str(empty)], capsys,
                      evaluate_lm.main)
    assert "missing.pt" in line or "not a prepared" in line


# -- the loader on two ranks, and resume ----------------------------------------------------------


def test_two_ranks_draw_disjoint_and_complete_windows(prepared, tmp_path):
    """Through gloo: each epoch's windows split over the ranks disjointly and completely, and
    a step's global batch is the one a single process draws with the same global batch."""
    out = tmp_path / "windows.json"
    _torchrun("tests/training/ddp_windows.py", str(prepared), str(out))
    report = json.loads(out.read_text())
    sys.path.insert(0, str(REPO / "tests"))
    import ddp_windows as W

    tokens = open_split(prepared, "train")
    world = report["world_size"]
    global_batch = W.BATCH * W.ACCUM * world
    single = EpochBatches(tokens, W.SEQ_LEN, W.BATCH * world, W.ACCUM, 1, 0, W.SEED)
    ranks = sorted(report["ranks"], key=lambda r: r["rank"])
    spe = ranks[0]["steps_per_epoch"]
    assert world == 2 and report["num_shards"] > 3 and spe == single.steps_per_epoch > 5
    orders = []
    for epoch in range(W.EPOCHS):
        drawn = []
        for step in range(spe):
            # micro-batch m of rank r holds windows [(m * world + r) * B, ... + B) of the step
            batch = [s for m in range(W.ACCUM) for r in ranks
                     for s in r["epochs"][epoch][step][m]["starts"]]
            assert batch == single.epoch_starts(epoch)[step * global_batch:
                                                       (step + 1) * global_batch].tolist()
            assert all(r["epochs"][epoch][step][m]["rows_match"] for r in ranks
                       for m in range(W.ACCUM))
            drawn += batch
        per_rank = [{s for step in r["epochs"][epoch] for m in step for s in m["starts"]}
                    for r in ranks]
        assert not per_rank[0] & per_rank[1]  # disjoint
        assert len(drawn) == len(set(drawn)) == spe * global_batch  # each window at most once
        grid = single.epoch_starts(epoch)
        assert set(drawn) == set(grid[:spe * global_batch].tolist())
        assert single.num_windows - spe * global_batch < global_batch  # all but a partial batch
        ends = report["shard_ends"][:-1]
        assert any(s < e < s + W.SEQ_LEN + 1 for s in drawn for e in ends)  # across shards
        orders.append(drawn)
    assert orders[0] != orders[1]  # a new order (and offset) each epoch


def test_two_rank_resume_is_exact_and_one_process_continues_it(prepared, tmp_path, capsys):
    common = ("--max_steps", "6", "--dtype", "float32", "--log_interval", "1",
              "--eval_interval", "3", "--batch_size", "2", "--grad_accum", "2", "--seed", "3")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _torchrun("training/train_lm.py", *_flags(prepared, whole, *common))
    _torchrun("training/train_lm.py", *_flags(prepared, cut, *common), env={"LM_MAX_STEPS": "3"})
    assert [r["step"] for r in _train_rows(cut)] == ["1", "2", "3"]
    one = Path(shutil.copytree(cut, tmp_path / "one"))
    _torchrun("training/train_lm.py", "--resume", "auto", "--out_dir", str(cut))

    # Two processes, interrupted and resumed: the same batches, bit for bit.
    assert [r["loss"] for r in _train_rows(cut)] == [r["loss"] for r in _train_rows(whole)]
    a = torch.load(whole / "snapshots" / "latest.pt", weights_only=True)
    b = torch.load(cut / "snapshots" / "latest.pt", weights_only=True)
    assert a["data_position"] == b["data_position"]
    assert a["data_position"]["data_id"] == open_split(prepared, "train").data_id
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key

    # One process resumes the two-process run: the same global batch, so the same batches.
    assert train_lm.main(["--resume", "auto", "--out_dir", str(one)]) == 0
    out = capsys.readouterr().out
    assert "--grad_accum 4 keeps its global batch of 8 sequences" in out
    c = torch.load(one / "snapshots" / "latest.pt", weights_only=True)
    assert c["data_position"] == a["data_position"]
    assert [float(r["loss"]) for r in _train_rows(one)] == pytest.approx(
        [float(r["loss"]) for r in _train_rows(whole)], rel=1e-5)
    for key, value in a["model_state_dict"].items():
        assert torch.allclose(value, c["model_state_dict"][key], atol=1e-5), key


def test_resume_with_another_process_count_keeps_the_global_batch_or_refuses():
    start = RunStart("resume", {"rng_state": {"world_size": 2},
                                "data_position": {"global_batch": 8}}, Path("x.pt"))
    said = []
    assert keep_global_batch(2, 2, set(), start, 4, said.append) == 1
    assert "keeps its global batch of 8" in said[0]
    with pytest.raises(UsageError, match=r"3 processes with --batch_size 2 cannot make it"):
        keep_global_batch(2, 2, set(), start, 3, said.append)
    assert keep_global_batch(2, 3, {"grad_accum"}, start, 3, said.append) == 3  # as given
