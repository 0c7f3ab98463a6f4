"""torchrun with 2 CPU processes (gloo) matches one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, tiny_flags

from training import train_lm
from training.metrics import read_metrics


def _losses(run):
    return [float(r["loss"]) for r in read_metrics(run / "metrics.csv") if r["kind"] == "train"]


@pytest.mark.parametrize("blocks", [(), ("--arch", "modern", "--num_kv_heads", "1")],
                         ids=["gpt2", "modern"])
def test_two_gloo_processes_match_one_process(tmp_path, blocks):
    """Also for the modern blocks (RoPE, QK-norm, ReLU², one key/value head, untied, soft-cap):
    their parameters all get gradients through DDP's buckets."""
    common = ("--max_steps", "4", "--dtype", "float32", "--log_interval", "1",
              "--eval_interval", "4", "--grad_accum", "2", *blocks)
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "training/train_lm.py", *tiny_flags(tmp_path, *common, "--batch_size", "2",
                                             "--out_dir", str(ddp_run))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_lm.main(tiny_flags(tmp_path, *common, "--batch_size", "4",
                                    "--out_dir", str(single_run))) == 0

    ddp_losses, single_losses = _losses(ddp_run), _losses(single_run)
    assert len(ddp_losses) == 4  # rank 0 alone writes the metrics
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    a = torch.load(ddp_run / "snapshots" / "latest.pt", weights_only=True)
    b = torch.load(single_run / "snapshots" / "latest.pt", weights_only=True)
    assert a["data_position"]["global_batch"] == b["data_position"]["global_batch"] == 8
    assert len(a["rng_state"]["ranks"]) == 2
    for key, value in a["model_state_dict"].items():
        assert torch.allclose(value, b["model_state_dict"][key], atol=1e-5), key
    assert "x2" in proc.stdout  # the banner names the process count


def test_a_budgeted_run_in_two_processes_plans_alike(tmp_path):
    """A `--time_budget` WSD run in 2 processes: rank 0's plans (the first and every re-plan)
    reach both ranks, so both step to the same count, with the shared unseen-token column."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "training/train_lm.py", *tiny_flags(
             tmp_path, "--time_budget", "20s", "--schedule", "wsd", "--cooldown", "0.3",
             "--min_lr", "0", "--log_interval", "1", "--eval_interval", "1000",
             "--unseen_tokens", "shared", "--batch_size", "2", "--out_dir", str(run))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    snap = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    n = snap["time_plan"]["steps"]
    assert snap["step"] == n and "unseen tokens shared" in proc.stdout
    assert ("re-planned after step" in proc.stdout) == bool(snap["time_plan"]["replanned_at"])
    rows = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "train"]
    assert [int(r["step"]) for r in rows] == list(range(1, n + 1))
    assert float(rows[-1]["lr"]) < float(rows[n // 2]["lr"])  # the cool-down of the final count
