"""`--unseen_tokens shared`: the head's shared column for tokens absent from training gives the
full head's training and validation (to float rounding), and the trainer uses it safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import tiny_flags

from corpus.datasets import DataError
from model.lm import LanguageModel
from training import train_lm
from training.evaluation import evaluate_tokens
from training.fused_loss import TrainingModule
from training.metrics import read_metrics
from training.optim import make_optimizer
from training.start import RunStart
from training.unseen_tokens import UnseenTokens, seen_token_mask

V = 96


def _seen() -> np.ndarray:
    seen = np.zeros(V, dtype=bool)
    seen[np.random.RandomState(0).choice(V, 30, replace=False)] = True
    return seen


def _model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(vocab_size=V, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                         max_seq_len=16, dropout=0.0)


def test_seen_token_mask_counts_ids_and_refuses_ids_outside_the_vocabulary():
    tokens = np.array([3, 5, 5, 0, 9], dtype=np.uint16)
    assert np.flatnonzero(seen_token_mask(tokens, 12)).tolist() == [0, 3, 5, 9]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        seen_token_mask(tokens, 9)
    assert UnseenTokens.from_tokens(np.arange(12), 12) is None  # nothing to share
    # the trainer turns it into its one-line data error
    with pytest.raises(DataError, match="token id 9 is outside the vocabulary.*prepare the data"):
        train_lm._unseen_tokens("shared", RunStart(), tokens, 9, torch.device("cpu"))


@pytest.mark.parametrize("optimizer,fused", [("muon", True), ("adamw", True), ("muon", False)])
def test_training_with_the_shared_row_is_full_vocabulary_training(optimizer, fused):
    """The same losses, gradient norms and weights as the full head on a model whose unseen
    rows start equal; the shared run keeps its unseen rows bit-for-bit equal."""
    unseen = UnseenTokens(_seen())
    full, shared = _model(), _model()
    for m in (full, shared):
        unseen.equalize(m.lm_head.weight)
    runs = [(full, TrainingModule(full, fused_head=fused)),
            (shared, TrainingModule(shared, fused_head=fused, unseen=unseen))]
    opts = [make_optimizer(m, 1e-2, 0.1, (0.9, 0.95), "cpu", optimizer=optimizer,
                           ns_dtype=torch.float32) for m, _ in runs]
    ids = unseen.seen_ids
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = ids[torch.randint(0, len(ids), (4, 16), generator=gen)]
        y = ids[torch.randint(0, len(ids), (4, 16), generator=gen)]
        y[0, :3] = -100  # ignored positions map through untouched
        seen = []
        for (m, module), opt in zip(runs, opts, strict=True):
            loss = module(x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen.append((loss.item(), norm.item()))
        assert seen[0] == pytest.approx(seen[1], rel=1e-5)
    # The same function (not every parameter: the attention keys' bias has a zero gradient,
    # which Adam turns into steps of float noise in both runs, and which no output sees).
    x = ids[torch.randint(0, len(ids), (2, 16), generator=gen)]
    with torch.no_grad():
        assert torch.allclose(full(x), shared(x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(full.lm_head.weight, shared.lm_head.weight, atol=1e-4, rtol=1e-4)
    assert unseen.rows_equal(shared.lm_head.weight)
    # ...and the rows did move: the softmax pushed the unseen tokens down.
    assert not torch.equal(shared.lm_head.weight[unseen.unseen_ids[0]],
                           _model().lm_head.weight[unseen.unseen_ids].mean(0))


def test_validation_with_the_shared_row_equals_the_full_softmax():
    """Validation tokens that never occur in training are scored exactly too."""
    unseen = UnseenTokens(_seen())
    model = _model()
    unseen.equalize(model.lm_head.weight)
    val = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(2))
    assert (~torch.from_numpy(_seen())[val]).sum() > 50  # plenty of unseen targets
    full = evaluate_tokens(model, val, seq_len=16, batch_size=4)
    fast = evaluate_tokens(model, val, seq_len=16, batch_size=4, unseen=unseen)
    assert fast.tokens_scored == full.tokens_scored
    assert fast.loss == pytest.approx(full.loss, rel=1e-6)
    assert fast.bits_per_byte is None and fast.windows == full.windows


def _rows(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.csv")
            if r["kind"] == "train"]


def test_a_shared_run_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    def flags(out, *extra):
        return tiny_flags(tmp_path, "--out_dir", str(tmp_path / out), "--max_steps", "6",
                          "--dtype", "float32", "--log_interval", "1", "--eval_interval", "3",
                          "--optimizer", "muon", *extra, words=700)

    assert train_lm.main(flags("whole", "--unseen_tokens", "shared")) == 0
    out = capsys.readouterr().out
    assert "unseen tokens shared:" in out and "(exact)" in out
    monkeypatch.setenv("LM_MAX_STEPS", "4")
    assert train_lm.main(flags("split", "--unseen_tokens", "shared")) == 0
    monkeypatch.delenv("LM_MAX_STEPS")
    assert train_lm.main(["--out_dir", str(tmp_path / "split"), "--resume", "auto"]) == 0
    whole, split = (torch.load(tmp_path / r / "snapshots" / "latest.pt", weights_only=True)
                    for r in ("whole", "split"))
    assert whole["step"] == split["step"] == 6 and whole["args"]["unseen_tokens"] == "shared"
    for key, value in whole["model_state_dict"].items():
        assert torch.equal(value, split["model_state_dict"][key]), key
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "split")


def test_shared_refuses_runs_whose_unseen_rows_differ(tmp_path, capsys):
    base = tiny_flags(tmp_path, "--out_dir", str(tmp_path / "full"), "--max_steps", "1")
    assert train_lm.main(base) == 0
    snap = tmp_path / "full" / "snapshots" / "latest.pt"
    capsys.readouterr()
    # Resuming a full-head run with the shared row: its unseen rows are not equal.
    assert train_lm.main(["--out_dir", str(tmp_path / "full"), "--resume", "auto", "--max_steps",
                          "2", "--unseen_tokens", "shared"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unseen tokens' embedding rows differ" in err and "\n" not in err
    # Fine-tuning from weights that have every row of their own.
    code = train_lm.main(tiny_flags(tmp_path, "--out_dir", str(tmp_path / "ft"), "--init_from",
                                    str(snap), "--max_steps", "1", "--unseen_tokens", "shared"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--unseen_tokens shared needs a new model" in err and "\n" not in err
