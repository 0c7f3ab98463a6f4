"""Snapshots: names, keys, weights_only loading, latest/best, retention, atomic writes; and the
fused LM-head loss the trainer uses."""

from __future__ import annotations

import os
import stat
from datetime import datetime

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_flags

from common.fileio import atomic_write
from model.lm import LanguageModel
from training import train_lm
from training.fused_loss import lm_head_cross_entropy
from training.metrics import read_metrics
from training.snapshots import (
    clean_state_dict,
    list_snapshots,
    parse_snapshot_name,
    prune_snapshots,
    snapshot_name,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snap")
    flags = tiny_flags(tmp, "--max_steps", "6", "--eval_interval", "2", "--keep_last", "2",
                       "--dtype", "float32")
    assert train_lm.main(flags) == 0
    return tmp / "run"


def test_snapshot_name_format():
    name = snapshot_name(3, 1234, datetime(2026, 2, 12, 9, 51, 34))
    assert name == "snapshot_epoch_0003_step_001234_20260212_095134.pt"
    assert parse_snapshot_name(name) == (3, 1234, "20260212_095134")
    assert parse_snapshot_name("latest.pt") is None


def test_snapshot_keys_and_weights_only_load(run_dir):
    snaps = run_dir / "snapshots"
    latest = torch.load(snaps / "latest.pt", weights_only=True)
    for key in ("model_config", "model_state_dict", "optimizer_state_dict", "step", "epoch",
                "val_loss", "val_ppl", "best_val_loss", "args", "rng_state", "data_position",
                "tokenizer", "versions"):
        assert key in latest, key
    assert latest["step"] == 6 and latest["tokenizer"] == "gpt2"
    assert latest["model_config"]["d_model"] == 32
    assert latest["val_ppl"] == pytest.approx(torch.tensor(latest["val_loss"]).exp().item())
    assert isinstance(latest["args"], dict) and latest["args"]["max_steps"] == 6
    assert isinstance(latest["rng_state"]["ranks"][0]["torch"], torch.Tensor)
    assert isinstance(latest["versions"]["torch"], str)
    keys = list(latest["model_state_dict"])
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    # The guide's own loading code works on it.
    cfg = latest["model_config"]
    model = LanguageModel(**cfg)
    model.load_state_dict(latest["model_state_dict"])


def test_latest_best_and_retention(run_dir):
    snaps = run_dir / "snapshots"
    names = [p.name for p in list_snapshots(snaps)]
    steps = [parse_snapshot_name(n)[1] for n in names]
    best = torch.load(snaps / "best.pt", weights_only=True)
    # keep_last 2 (steps 4 and 6) plus the snapshot best.pt came from.
    assert steps[-2:] == [4, 6] and len(steps) <= 3
    assert best["best_snapshot"] in names
    assert best["val_loss"] == best["best_val_loss"]
    rows = read_metrics(run_dir / "metrics.csv")
    vals = [float(r["loss"]) for r in rows if r["kind"] == "val"]
    assert best["val_loss"] == pytest.approx(min(vals))
    for name in ("latest.pt", "best.pt"):
        mode = os.lstat(snaps / name).st_mode
        assert stat.S_ISREG(mode) and not stat.S_ISLNK(mode)
    assert torch.load(snaps / "latest.pt", weights_only=True)["step"] == 6


def test_prune_keeps_newest_and_protected(tmp_path):
    for step in range(1, 7):
        (tmp_path / snapshot_name(0, step)).write_bytes(b"x")
    protect = snapshot_name(0, 2)
    removed = prune_snapshots(tmp_path, keep_last=2, protect=[protect])
    left = [parse_snapshot_name(p.name)[1] for p in list_snapshots(tmp_path)]
    assert left == [2, 5, 6] and len(removed) == 3


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_write(target) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_clean_state_dict_strips_wrapper_prefixes():
    sd = {"_orig_mod.module.a": torch.ones(1), "module._orig_mod.b": torch.zeros(1)}
    assert set(clean_state_dict(sd)) == {"a", "b"}


def test_fused_loss_matches_model_loss_and_gradients(tiny_config):
    torch.manual_seed(0)
    model = LanguageModel(**tiny_config)
    idx = torch.randint(0, 50257, (3, 17))
    targets = torch.randint(0, 50257, (3, 17))
    targets[0, :5] = -100  # ignored positions
    _, ref = model(idx, targets)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hidden = model.forward_hidden(idx)
    assert torch.allclose(model.lm_head(hidden), model(idx), atol=1e-6)
    loss = lm_head_cross_entropy(hidden, model.lm_head.weight, targets, chunk_rows=7)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        assert ((p.grad - g).norm() / g.norm()).item() < 1e-5


def test_fused_loss_bf16_close_to_reference():
    torch.manual_seed(0)
    h = torch.randn(64, 48, requires_grad=True)
    w = (torch.randn(1000, 48) * 0.1).requires_grad_()
    t = torch.randint(0, 1000, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_head_cross_entropy(h, w, t, chunk_rows=16)
    ref = F.cross_entropy(h.double() @ w.double().t(), t)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
