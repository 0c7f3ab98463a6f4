"""`train_lm.py --arch / --num_kv_heads`: a new model's blocks, kept on resume, refused when
they contradict the model resumed or started from."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_flags

from model.config import ARCHITECTURES, LMConfig, architecture_fields
from training import train_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(run) -> LMConfig:
    snap = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    return LMConfig.from_dict(snap["model_config"])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_arch_sets_the_blocks_of_a_new_model(tmp_path, arch):
    assert train_lm.main(tiny_flags(tmp_path, "--arch", arch, "--num_kv_heads", "1",
                                    "--max_steps", "2", "--eval_interval", "2")) == 0
    cfg = _config(tmp_path / "run")
    expected = LMConfig(cfg.vocab_size, 32, 2, 2, 64, 32, 0.0,
                        **architecture_fields(arch, num_kv_heads=1))
    assert cfg == expected
    assert cfg.num_kv_heads == 1


def test_resume_keeps_the_blocks_and_refuses_others(tmp_path, capsys):
    flags = tiny_flags(tmp_path, "--arch", "llama", "--max_steps", "4", "--eval_interval", "2")
    assert train_lm.main([*flags, "--max_steps", "2"]) == 0
    first = _config(tmp_path / "run")
    assert first.mlp == "swiglu" and first.positions == "rope"
    # the snapshot's --arch is inherited: a plain --resume trains the same network
    assert train_lm.main([*tiny_flags(tmp_path), "--max_steps", "4", "--eval_interval", "2",
                          "--resume", "auto"]) == 0
    assert _config(tmp_path / "run") == first
    capsys.readouterr()
    assert train_lm.main([*tiny_flags(tmp_path), "--arch", "modern", "--max_steps", "6",
                   "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other blocks" in err[0] and "--arch" in err[0]


def test_init_from_refuses_other_blocks(tmp_path, capsys):
    assert train_lm.main(tiny_flags(tmp_path, "--arch", "modern", "--max_steps", "1",
                                "--eval_interval", "1")) == 0
    source = tmp_path / "run" / "snapshots" / "latest.pt"
    flags = tiny_flags(tmp_path)
    flags[flags.index("--out_dir") + 1] = str(tmp_path / "ft")
    capsys.readouterr()
    assert train_lm.main([*flags, "--init_from", str(source), "--arch", "gpt2",
                          "--max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count("there,") >= 3  # every differing field named
    # without --arch the source's blocks are kept
    assert train_lm.main([*flags, "--init_from", str(source), "--max_steps", "1",
                          "--eval_interval", "1"]) == 0
    assert _config(tmp_path / "ft") == _config(tmp_path / "run")


def test_num_kv_heads_must_divide_the_heads(tmp_path, capsys):
    assert train_lm.main(tiny_flags(tmp_path, "--num_heads", "4", "--num_kv_heads", "3",
                                    "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_kv_heads (3) must divide num_heads (4)" in err[0]
    assert not (tmp_path / "run" / "snapshots").exists()


def test_flops_per_token_follows_the_blocks():
    """6 x matrix weights + 12 x layers x query width x context: GPT-2's count as before; an
    untied embedding (a lookup) does not count, its head does; head_dim sets the attention
    width."""
    from model.lm import LanguageModel
    from training.mfu import flops_per_token

    shape = dict(vocab_size=100, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=16)
    gpt2 = LanguageModel(**shape)
    assert flops_per_token(gpt2) == 6 * gpt2.num_params() + 12 * 2 * 32 * 16
    untied = LanguageModel(**shape, tie_embeddings=False)
    assert flops_per_token(untied) == flops_per_token(gpt2)  # same matmuls, same count
    wide = LanguageModel(**shape, head_dim=16)
    assert flops_per_token(wide) == 6 * wide.num_params() + 12 * 2 * 64 * 16


def test_resume_is_exact_for_modern_blocks_with_muon(tmp_path, monkeypatch):
    """A run of the `modern` blocks (untied, soft-capped, QK-norm, one key/value head) with Muon
    and the shared unseen-token column, stopped at step 2 and resumed, ends with the weights of
    the run that never stopped."""
    common = ["--arch", "modern", "--num_kv_heads", "1", "--optimizer", "muon",
              "--unseen_tokens", "shared", "--eval_interval", "2", "--max_steps", "4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_lm.main(tiny_flags(whole, *common)) == 0
    flags = tiny_flags(parts, *common)
    monkeypatch.setenv("LM_MAX_STEPS", "2")  # stops after step 2, as an interrupted run
    assert train_lm.main(flags) == 0
    monkeypatch.delenv("LM_MAX_STEPS")
    stopped = torch.load(parts / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert stopped["step"] == 2
    assert train_lm.main([*flags, "--resume", "auto"]) == 0
    a = torch.load(whole / "run" / "snapshots" / "latest.pt", weights_only=True)
    b = torch.load(parts / "run" / "snapshots" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key


def test_compiled_training_of_modern_blocks_matches_eager(tmp_path):
    """`--compile` (Inductor on CPU) trains the modern blocks (RoPE, QK-norm, ReLU², GQA,
    soft-cap, untied) to the losses and weights of eager mode, and its snapshot holds the plain
    module's keys (no compiled wrapper's prefix)."""
    from training.metrics import read_metrics

    common = ["--arch", "modern", "--num_kv_heads", "1", "--max_steps", "3", "--dtype",
              "float32", "--log_interval", "1", "--eval_interval", "3"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        assert train_lm.main(tiny_flags(tmp_path, *common, *extra, "--out_dir", str(out))) == 0
        runs[name] = out
    losses = {name: [float(r["loss"]) for r in read_metrics(out / "metrics.csv")]
              for name, out in runs.items()}
    assert len(losses["eager"]) == 4  # 3 training steps and the evaluation
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    a, b = (torch.load(out / "snapshots" / "latest.pt", weights_only=True)["model_state_dict"]
            for out in runs.values())
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-4), key
