"""Exact resume: an interrupted-and-resumed run equals an uninterrupted one, bit for bit (CPU fp32),
across epoch boundaries, with dropout and gradient accumulation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_flags

from training import train_lm
from training.metrics import read_metrics


def _flags(tmp, out, *extra):
    # ~950 tokens -> 29 windows of 32 -> 3 steps per epoch with a global batch of 8 windows.
    return tiny_flags(tmp, "--out_dir", str(out), "--max_steps", "7", "--grad_accum", "2",
                      "--dropout", "0.1", "--dtype", "float32", "--log_interval", "1",
                      "--eval_interval", "3", "--save_interval", "100", *extra, words=700)


def _train_rows(run):
    return [(r["step"], r["lr"], r["loss"]) for r in read_metrics(run / "metrics.csv")
            if r["kind"] == "train"]


@pytest.mark.parametrize("extra", [(), ("--split_tokens", "0.3")], ids=["plain", "split_tokens"])
def test_resume_is_bit_exact(tmp_path, monkeypatch, capsys, extra):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_lm.main(_flags(tmp_path, a, *extra)) == 0

    monkeypatch.setenv("LM_MAX_STEPS", "4")  # stop mid-epoch (epoch 1, batch 1) after step 4
    assert train_lm.main(_flags(tmp_path, b, *extra)) == 0
    half = torch.load(b / "snapshots" / "latest.pt", weights_only=True)
    assert half["args"].get("split_tokens", 0.0) == (float(extra[1]) if extra else 0.0)
    assert ("re-segmented" in capsys.readouterr().out) == bool(extra)
    assert half["step"] == 4 and half["data_position"] == {
        **half["data_position"], "epoch": 1, "batch": 1}
    monkeypatch.delenv("LM_MAX_STEPS")
    # Only --resume PATH: every other flag comes from the snapshot, and the run continues in
    # the snapshot's own run directory.
    assert train_lm.main(["--resume", str(b / "snapshots" / "latest.pt")]) == 0
    assert "resuming from" in capsys.readouterr().out

    rows_a, rows_b = _train_rows(a), _train_rows(b)
    assert len(rows_a) == 7 and rows_a == rows_b
    end_a = torch.load(a / "snapshots" / "latest.pt", weights_only=True)
    end_b = torch.load(b / "snapshots" / "latest.pt", weights_only=True)
    assert end_a["step"] == end_b["step"] == 7
    for key, value in end_a["model_state_dict"].items():
        assert torch.equal(value, end_b["model_state_dict"][key]), key
    opt_a, opt_b = end_a["optimizer_state_dict"]["state"], end_b["optimizer_state_dict"]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k])

    # A finished run resumed again has nothing to do.
    assert train_lm.main(["--out_dir", str(b), "--resume", "auto"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_refuses_a_different_model(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    monkeypatch.setenv("LM_MAX_STEPS", "1")
    assert train_lm.main(_flags(tmp_path, run)) == 0
    capsys.readouterr()
    code = train_lm.main(["--out_dir", str(run), "--resume", "auto", "--d_model", "64",
                          "--num_heads", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "d_model 32 in the snapshot, 64 here" in err and "\n" not in err
    # A fresh run into a directory that holds snapshots is refused rather than mixed in.
    assert train_lm.main(_flags(tmp_path, run)) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_fused_and_plain_loss_train_alike(tmp_path):
    """--no_fused_loss (model(idx, targets)) and the default fused head give the same run."""
    runs = {}
    for name, extra in (("fused", ()), ("plain", ("--no_fused_loss",))):
        out = tmp_path / name
        flags = tiny_flags(tmp_path, "--out_dir", str(out), "--max_steps", "3", "--dtype",
                           "float32", "--log_interval", "1", "--eval_interval", "100", *extra)
        assert train_lm.main(flags) == 0
        runs[name] = [float(r[2]) for r in _train_rows(out)]
    assert len(runs["fused"]) == 3
    for a, b in zip(runs["fused"], runs["plain"], strict=True):
        assert abs(a - b) < 1e-4


def test_a_snapshot_of_the_old_code_resumes_exactly(tmp_path, monkeypatch, capsys):
    """A snapshot written before `training/config.py` (tests/training/fixtures/pre_config_resume,
    step 4 of 7) resumes to the very run this code makes uninterrupted: same losses, weights,
    optimizer state and saved flags."""
    fixture = Path(__file__).parent / "fixtures" / "pre_config_resume"
    a, b = tmp_path / "a", tmp_path / "b"
    for where in (a, b):
        where.mkdir()
        shutil.copytree(fixture / "tokenizer", where / "tokenizer")
        for name in ("train.txt", "val.txt"):
            shutil.copy(fixture / name, where / name)
    (b / "run" / "snapshots").mkdir(parents=True)
    shutil.copy(fixture / "step4.pt", b / "run" / "snapshots" / "latest.pt")
    old = torch.load(fixture / "step4.pt", weights_only=True)
    # the fixture's dropout drew its masks with PyTorch's own samplers (F.dropout, SDPA's):
    # this code's cheaper CPU masks (model/dropout.py) draw others, so run with those
    import torch.nn.functional as F

    import model.dropout
    import model.lm

    monkeypatch.setattr(model.dropout, "dropout", F.dropout)
    monkeypatch.setattr(model.lm, "causal_attention_with_dropout",
                        lambda q, k, v, p: F.scaled_dot_product_attention(
                            q, k, v, is_causal=True, dropout_p=p))

    monkeypatch.chdir(a)
    assert train_lm.main(list(PRE_CONFIG_FLAGS)) == 0
    monkeypatch.chdir(b)
    assert train_lm.main(["--resume", "run/snapshots/latest.pt"]) == 0
    assert "resuming from run/snapshots/latest.pt at step 4" in capsys.readouterr().out

    rows_a, rows_b = _train_rows(a / "run"), _train_rows(b / "run")
    assert len(rows_a) == 7 and rows_a[4:] == rows_b
    end_a = torch.load(a / "run" / "snapshots" / "latest.pt", weights_only=True)
    end_b = torch.load(b / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert end_a["step"] == end_b["step"] == 7
    for key, value in end_a["model_state_dict"].items():
        assert torch.equal(value, end_b["model_state_dict"][key]), key
    opt_a, opt_b = end_a["optimizer_state_dict"]["state"], end_b["optimizer_state_dict"]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k])
    # The snapshot's flags keep their format: the same keys and values as the old code wrote,
    # plus the flags added since, at the values that mean what the old code did.
    added = {"arch": None, "num_kv_heads": None}  # the model's blocks (GPT-2's, as before)
    assert end_b["args"] == {**old["args"], **added, "resume": "run/snapshots/latest.pt"}
    assert end_a["args"] == {**old["args"], **added}
    assert end_a["data_position"] == end_b["data_position"]


# The flags that made the fixture (tests/training/fixtures/make_pre_config_resume.py), relative to
# a folder holding its tokenizer/ and text.
PRE_CONFIG_FLAGS = (
    "--train_file", "train.txt", "--val_file", "val.txt", "--out_dir", "run",
    "--tokenizer", "tokenizer", "--d_model", "32", "--num_heads", "2", "--num_layers", "2",
    "--d_ff", "64", "--max_seq_len", "32", "--batch_size", "4", "--eval_windows", "8",
    "--warmup_steps", "2", "--lr", "3e-3", "--dropout", "0.1", "--no_plot", "--max_steps", "7",
    "--grad_accum", "2", "--dtype", "float32", "--log_interval", "1", "--eval_interval", "3",
    "--save_interval", "100")
