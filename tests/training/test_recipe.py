"""The training recipe: Muon + AdamW, the WSD schedule and weight averaging (--ema)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import tiny_flags

import evaluate_lm
import generate_lm
from model.checkpoint import load_model
from model.lm import LanguageModel
from training import optim, train_lm
from training.metrics import read_metrics


def _train_rows(run):
    return [(r["step"], r["lr"], r["loss"]) for r in read_metrics(run / "metrics.csv")
            if r["kind"] == "train"]


# -- schedule -------------------------------------------------------------------------------------


def test_wsd_schedule_values():
    kw = dict(schedule="wsd", warmup_steps=10, max_steps=100, min_ratio=0.1, cooldown=0.2)
    assert optim.lr_scale(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert optim.lr_scale(9, **kw) == 1.0  # the warm-up ends at the peak
    assert optim.lr_scale(10, **kw) == 1.0 and optim.lr_scale(80, **kw) == 1.0  # plateau
    assert optim.lr_scale(90, **kw) == pytest.approx(1.0 - 0.5 * 0.9)  # half-way down
    assert optim.lr_scale(99, **kw) == pytest.approx(1.0 - 0.95 * 0.9)
    assert optim.lr_scale(100, **kw) == pytest.approx(0.1) == optim.lr_scale(500, **kw)
    scales = [optim.lr_scale(s, **kw) for s in range(100)]
    assert all(a >= b for a, b in zip(scales[10:], scales[11:], strict=False))  # never rises
    # A cool-down longer than what is left after the warm-up starts right after it.
    long = dict(kw, cooldown=1.0)
    assert optim.lr_scale(10, **long) == 1.0 and optim.lr_scale(55, **long) == pytest.approx(0.55)


def test_cosine_schedule_is_the_old_one():
    for step in (0, 5, 29, 30, 100, 299, 300, 400):
        expected = (2e-3 * (step + 1) / 30 if step < 30 else 2e-4 if step >= 300 else
                    2e-4 + 0.5 * (1 + math.cos(math.pi * (step - 30) / 270)) * 1.8e-3)
        assert 2e-3 * optim.lr_scale(step, schedule="cosine", warmup_steps=30, max_steps=300,
                                     min_ratio=0.1) == pytest.approx(expected, rel=1e-12)


# -- optimizer ------------------------------------------------------------------------------------


def test_muon_takes_the_block_matrices_only(tiny_config):
    model = LanguageModel(**tiny_config)
    opt = optim.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", optimizer="muon",
                               muon_lr=0.02)
    assert isinstance(opt, optim.MuonAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in muon_ids} == {
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert muon_ids.isdisjoint(adamw_ids) and len(muon_ids | adamw_ids) == len(names)
    assert names[id(model.transformer.wte.weight)] in {names[i] for i in adamw_ids}
    optim.set_lr_scale(opt, 0.5, 1e-3, 0.02)
    assert {g["lr"] for g in opt.muon.param_groups} == {0.01}
    assert {g["lr"] for g in opt.adamw.param_groups} == {5e-4}


def test_muon_newton_schulz_in_float32_unless_bfloat16():
    """Our Muon's step is PyTorch's (bit for bit with the iteration in bf16, as PyTorch runs
    it); the trainer runs the iteration in float32 unless it computes in bfloat16."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40), (24, 24)]
    ref = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    f32 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.01, nesterov=True, adjust_lr_fn="original")
    a, b = torch.optim.Muon(ref, **kw), optim.Muon(ours, ns_dtype=torch.float32, **kw)
    c = optim.Muon(f32, ns_dtype=torch.float32, **kw)
    for _ in range(3):
        for ps in (ref, ours, f32):
            torch.manual_seed(1)
            for p in ps:
                p.grad = torch.randn_like(p)
        a.step()
        b.step_in(torch.bfloat16)
        c.step()
    assert all(torch.equal(x, y) for x, y in zip(ref, ours, strict=True))
    for x, z in zip(ref, f32, strict=True):  # float32 differs by bf16's rounding only
        assert not torch.equal(x, z) and torch.allclose(x, z, atol=2e-3)
    assert c.state_dict()["state"].keys() == a.state_dict()["state"].keys()
    u = optim.newton_schulz(torch.randn(40, 12), (3.4445, -4.7750, 2.0315), 5, 1e-7,
                            torch.float32)
    assert u.dtype == torch.float32 and u.shape == (40, 12)
    assert torch.linalg.svdvals(u).min() > 0.6 and torch.linalg.svdvals(u).max() < 1.25
    model = LanguageModel(vocab_size=64, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                          max_seq_len=8)
    args = optim.OptimArgs(optimizer="muon", weight_decay=0.1, beta1=0.9, beta2=0.95,
                           muon_momentum=0.95, muon_weight_decay=0.0, grad_clip=1.0, ema=0.0,
                           schedule=optim.ScheduleArgs(schedule="cosine", lr=1e-3, min_lr=1e-4,
                                                       muon_lr=0.02, warmup_steps=0,
                                                       cooldown=0.2))
    cpu = torch.device("cpu")
    assert optim.build_optimizer(model, args, cpu, torch.float32).muon.ns_dtype == torch.float32
    assert optim.build_optimizer(model, args, cpu, torch.bfloat16).muon.ns_dtype == (
        torch.bfloat16)


def test_muon_missing_falls_back_to_adamw(tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(optim, "muon_available", lambda: False)
    opt = optim.make_optimizer(LanguageModel(**tiny_config), 1e-3, 0.1, (0.9, 0.95), "cpu",
                               optimizer="muon")
    assert isinstance(opt, torch.optim.AdamW)
    err = capsys.readouterr().err.strip()
    assert "no torch.optim.Muon" in err and "\n" not in err


def test_muon_run_learns_and_resumes_bit_exact(tmp_path, monkeypatch, capsys):
    def flags(out):
        return tiny_flags(tmp_path, "--out_dir", str(out), "--max_steps", "12",
                          "--optimizer", "muon", "--schedule", "wsd", "--cooldown", "0.5",
                          "--ema", "0.9", "--dropout", "0.1", "--dtype", "float32",
                          "--log_interval", "1", "--eval_interval", "4",
                          "--save_interval", "100", words=1500)

    a, b = tmp_path / "a", tmp_path / "b"
    assert train_lm.main(flags(a)) == 0
    rows = _train_rows(a)
    assert len(rows) == 12
    losses, lrs = [float(r[2]) for r in rows], [float(r[1]) for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.5  # it learns
    assert lrs[5] == pytest.approx(3e-3) and lrs[-1] < 1e-3  # plateau, then cool-down

    monkeypatch.setenv("LM_MAX_STEPS", "7")
    assert train_lm.main(flags(b)) == 0
    monkeypatch.delenv("LM_MAX_STEPS")
    assert train_lm.main(["--resume", str(b / "snapshots" / "latest.pt")]) == 0
    capsys.readouterr()

    assert _train_rows(b) == rows
    end_a = torch.load(a / "snapshots" / "latest.pt", weights_only=True)
    end_b = torch.load(b / "snapshots" / "latest.pt", weights_only=True)
    for key in ("model_state_dict", "raw_model_state_dict"):
        for name, value in end_a[key].items():
            assert torch.equal(value, end_b[key][name]), (key, name)
    assert end_a["ema_state"]["updates"] == end_b["ema_state"]["updates"] == 12
    for part in ("muon", "adamw"):
        sa = end_a["optimizer_state_dict"][part]["state"]
        sb = end_b["optimizer_state_dict"][part]["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (part, i, k)


def test_ema_snapshots_hold_the_average(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ema"
    flags = tiny_flags(tmp_path, "--out_dir", str(out), "--max_steps", "6", "--ema", "0.8",
                       "--dtype", "float32", "--eval_interval", "3", "--eval_windows", "0")
    assert train_lm.main(flags) == 0
    capsys.readouterr()
    snap = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    raw, avg = snap["raw_model_state_dict"], snap["model_state_dict"]
    assert set(raw) == set(avg)
    assert not torch.equal(raw["transformer.h.0.mlp.c_fc.weight"],
                           avg["transformer.h.0.mlp.c_fc.weight"])
    # Tied weights stay tied in the averaged state dict.
    assert torch.equal(avg["lm_head.weight"], avg["transformer.wte.weight"])
    assert torch.equal(avg["transformer.wte.weight"], snap["ema_state"]["shadow"][
        "transformer.wte.weight"])

    # best.pt holds the averaged weights, and the tools load it unchanged.
    best = torch.load(out / "snapshots" / "best.pt", weights_only=True)
    model, _ = load_model(out / "snapshots" / "best.pt", device="cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model_state_dict"][name]), name
    val_rows = [r for r in read_metrics(out / "metrics.csv") if r["kind"] == "val"]
    assert best["val_loss"] == pytest.approx(min(float(r["loss"]) for r in val_rows), abs=1e-5)
    code = evaluate_lm.main(["--checkpoint", str(out / "snapshots" / "best.pt"),
                             "--file", str(tmp_path / "val.txt"), "--seq_len", "32",
                             "--stride", "32", "--dtype", "float32", "--json"])
    assert code == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])
    code = generate_lm.main(["--checkpoint", str(out / "snapshots" / "best.pt"), "--prompt",
                             "The", "--max_new_tokens", "5", "--seed", "0", "--no_stream"])
    assert code == 0 and capsys.readouterr().out.startswith("The")


def test_without_ema_snapshots_are_as_before(tmp_path, capsys):
    out = tmp_path / "plain"
    assert train_lm.main(tiny_flags(tmp_path, "--out_dir", str(out), "--max_steps", "2")) == 0
    snap = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    assert "raw_model_state_dict" not in snap and "ema_state" not in snap
    assert set(snap["optimizer_state_dict"]) == {"state", "param_groups"}


def test_weight_average_math(tiny_config):
    model = LanguageModel(**tiny_config)
    avg = optim.WeightAverage(model, 0.9)
    w = model.transformer.h[0].mlp.c_fc.weight
    start = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    avg.update(model)  # d_0 = min(0.9, 1 / 10) = 0.1: the average moves 90% of the way
    assert torch.allclose(avg.shadow["transformer.h.0.mlp.c_fc.weight"], start + 0.9)
    with avg.applied(model):
        assert torch.allclose(w, start + 0.9)
    assert torch.equal(w, start + 1.0)  # the training weights come back bit for bit
    with pytest.raises(ValueError):
        optim.WeightAverage(model, 1.0)
