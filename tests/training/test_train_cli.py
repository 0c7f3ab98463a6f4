"""train_lm.py's command line: one-line errors with exit 2, --explain, --help, NaN detection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, tiny_flags, write_text

from training import train_lm


def _run(argv, capsys):
    code = train_lm.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_FLAGS = [
    (["--batch_size", "0"], "positive integer"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--no_such_flag"], "unrecognized arguments"),
    (["--d_model", "30", "--num_heads", "4"], "divisible"),
    (["--seq_len", "64"], "exceeds --max_seq_len"),
    (["--lr", "-1"], "number >= 0"),
    (["--lr", "abc"], "expected a number"),
    (["--dropout", "1.5"], "dropout"),
    (["--lr", "0.1", "--min_lr", "1"], "--min_lr"),
    (["--dtype", "float16"], "needs a CUDA GPU"),
    (["--dtype", "int8"], "invalid choice"),
    (["--resume", "no/such/snapshot.pt"], "no snapshot file"),
    (["--vocab_size", "100"], "smaller than the tokenizer"),
    (["--eval_windows", "-1"], "--eval_windows"),
    (["--preset", "huge"], "invalid choice"),
    (["--device", "tpu"], "unknown device"),
    # the training recipe (training/optim.py)
    (["--ema", "-0.1"], "number >= 0"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--ema", "1.5"], "--ema must be in [0, 1)"),
    (["--optimizer", "sgd"], "invalid choice"),
    (["--schedule", "linear"], "invalid choice"),
    (["--cooldown", "0"], "--cooldown must be in (0, 1]"),
    (["--muon_momentum", "1"], "--muon_momentum"),
    (["--optimizer", "muon", "--muon_lr", "0"], "--muon_lr must be positive"),
    # --time_budget (training/budget.py)
    (["--time_budget", "0"], "expected a positive time"),
    (["--time_budget", "-5"], "expected a positive time"),
    (["--time_budget", "ten"], "expected a positive time"),
    (["--time_budget", "nan"], "expected a positive time"),
    (["--time_budget", "5", "--max_steps", "10"], "both set the run's length"),
    (["--time_budget", "0.01s"], "too short for one step here"),
]


@pytest.mark.parametrize("extra,needle", BAD_FLAGS, ids=[" ".join(f[0]) for f in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    code, out, err = _run(tiny_flags(tmp_path, *extra), capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "run" / "snapshots").exists()


def test_bad_data_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline, no `datasets`
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    out = ["--out_dir", str(tmp_path / "out")]
    cases = [
        (["--dataset", "wikitext", *out], "--data_dir"),
        (["--dataset", "wikitext", "--data_dir", str(empty_dir), *out], "has no train.txt"),
        (["--train_file", str(short), "--val_file", str(short), *out], "shorter than one"),
        (["--train_file", str(tmp_path / "none.txt"), *out], "no such file"),
        (["--resume", str(corrupt), *tiny_flags(tmp_path / "t")], "cannot load"),
    ]
    for argv, needle in cases:
        code, out, err = _run(argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    monkeypatch.setenv("LM_MAX_STEPS", "ten")
    code, _, err = _run(tiny_flags(tmp_path), capsys)
    assert code == 2 and "LM_MAX_STEPS" in err
    monkeypatch.delenv("LM_MAX_STEPS")
    monkeypatch.setenv("LM_MAX_EVAL_WINDOWS", "0")
    code, _, err = _run(tiny_flags(tmp_path), capsys)
    assert code == 2 and "LM_MAX_EVAL_WINDOWS" in err


def test_explicit_epochs_override_a_presets_steps(tmp_path, capsys):
    out_dir = ["--out_dir", str(tmp_path / "run")]
    code, _, err = _run(["--preset", "demo", "--epochs", "0", *out_dir], capsys)
    assert code == 2 and "--epochs must be positive" in err  # before: 300 steps, silently
    code, out, _ = _run(["--preset", "demo", "--epochs", "1", "--explain", *out_dir], capsys)
    assert code == 0 and "= 1.00 epochs of" in out, out
    code, out, _ = _run(["--preset", "demo", "--epochs", "1", "--max_steps", "7", "--explain",
                         *out_dir], capsys)
    assert code == 0 and "Schedule: 7 steps" in out, out


def test_max_eval_windows_caps_every_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LM_MAX_EVAL_WINDOWS", "3")
    for flag, shown in (("0", "3 windows"), ("2", "2 windows"), ("50", "3 windows")):
        code, out, _ = _run(tiny_flags(tmp_path, "--eval_windows", flag, "--explain"), capsys)
        assert code == 0 and f"{shown} per evaluation" in out, (flag, out)
    # The cap is not the run's setting: snapshots keep --eval_windows, so a resume without the
    # cap evaluates as the flag says.
    monkeypatch.setenv("LM_MAX_STEPS", "1")
    assert train_lm.main(tiny_flags(tmp_path, "--eval_windows", "50")) == 0
    saved = torch.load(tmp_path / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert saved["args"]["eval_windows"] == 50


def test_cli_errors_have_no_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv in (["--batch_size", "0"], ["--dataset", "wikitext", "--out_dir", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "training/train_lm.py", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_help_lists_every_model_argument(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for flag in ("--d_model", "--num_heads", "--num_layers", "--d_ff", "--max_seq_len",
                 "--dropout", "--vocab_size", "--preset", "--explain", "--resume", "LM_MAX_STEPS"):
        assert flag in out


def test_explain_describes_the_run_and_writes_nothing(tmp_path, capsys):
    code, out, _ = _run(tiny_flags(tmp_path, "--max_steps", "40", "--explain"), capsys)
    assert code == 0
    for needle in ("parameters", "tokens", "40 steps", "warmup", "Memory: about", "a step took",
                   "snapshot_epoch_", "latest.pt", "best.pt", "--resume auto",
                   "python generate_lm.py --checkpoint"):
        assert needle in out, needle
    assert "--explain" not in out.split("Resume:")[1].splitlines()[0]
    assert not (tmp_path / "run" / "snapshots").exists()
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_nan_loss_stops_without_overwriting_the_good_snapshot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LM_MAX_STEPS", "2")
    flags = tiny_flags(tmp_path, "--max_steps", "8", "--dtype", "float32")
    assert train_lm.main(flags) == 0
    latest = tmp_path / "run" / "snapshots" / "latest.pt"
    before = latest.read_bytes()
    monkeypatch.delenv("LM_MAX_STEPS")
    capsys.readouterr()
    # An absurd learning rate sends the weights (and so the loss) to inf/NaN within steps.
    code, _, err = _run(["--out_dir", str(tmp_path / "run"), "--resume", "auto",
                         "--lr", "1e30", "--min_lr", "0"], capsys)
    assert code == 1
    assert "loss is nan" in err and "stopped without saving" in err
    assert latest.read_bytes() == before
    assert torch.load(latest, weights_only=True)["step"] == 2


def test_other_text_and_bad_utf8(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe bad bytes " * 100)
    good = write_text(tmp_path / "good.txt", 300)
    code, _, err = _run(["--train_file", str(bad), "--val_file", str(good), "--out_dir",
                         str(tmp_path / "out")], capsys)
    assert code == 2 and "not UTF-8" in err
