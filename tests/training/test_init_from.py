"""`train_lm.py --init_from`: a new run from a Hugging Face GPT-2 folder, a cached hub name or one
of our snapshots; its errors; and exact resume of such a run. All offline, tiny models."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from train_helpers import write_text

from corpus.datasets import DataArgs, load_split
from model.hf_interop import state_dict_from_hf
from model.tokenizer import BUNDLED_GPT2_DIR
from training import train_lm
from training.evaluation import evaluate_tokens
from training.metrics import read_metrics


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved with save_pretrained, with the GPT-2 tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2,
                                    n_head=2, n_inner=64))
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(BUNDLED_GPT2_DIR / name, folder / name)
    return folder


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    """No test here may reach the hub: offline, with an empty cache unless a test fills it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _flags(tmp, out, *extra, words=3000, seed=1):
    """Data and run flags, but no model shape: that comes from --init_from."""
    train, val = tmp / f"train{seed}.txt", tmp / "val.txt"
    if not train.exists():
        write_text(train, words, seed=seed)
    if not val.exists():
        write_text(val, 600, seed=2)
    return ["--train_file", str(train), "--val_file", str(val), "--out_dir", str(out),
            "--batch_size", "4", "--eval_windows", "8", "--warmup_steps", "2", "--dropout", "0",
            "--dtype", "float32", "--log_interval", "1", "--no_plot", *extra]


def _val_rows(run):
    return [(int(r["step"]), float(r["loss"])) for r in read_metrics(run / "metrics.csv")
            if r["kind"] == "val"]


def _hf_val_loss(hf_dir, flags):
    """The HF model's own loss (GPT2LMHeadModel's logits) on the validation windows the
    trainer evaluates."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf
            self.max_seq_len = hf.config.n_positions
            self.config = SimpleNamespace(vocab_size=hf.config.vocab_size)

        def forward(self, idx):
            return self.hf(input_ids=idx).logits

    val, _ = load_split(DataArgs.from_dict(vars(train_lm.parse_args(flags)[0])), "val")
    return evaluate_tokens(Logits(), val, seq_len=32, batch_size=4, max_windows=8).loss, hf


def test_init_from_hf_folder_with_lr_0_keeps_its_weights_and_loss(hf_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    flags = _flags(tmp_path, out, "--init_from", str(hf_dir), "--lr", "0", "--max_steps", "1",
                   "--eval_interval", "1")
    assert train_lm.main(flags) == 0
    assert "new run from the weights of" in capsys.readouterr().out
    snap = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    assert snap["step"] == 1 and snap["init_from"] == str(hf_dir)
    assert snap["args"]["init_from"] == str(hf_dir) and snap["tokenizer"] == "gpt2"
    hf_loss, hf = _hf_val_loss(hf_dir, flags)
    expected = state_dict_from_hf(hf.state_dict())
    assert set(snap["model_state_dict"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(snap["model_state_dict"][key], value), key
    rows = _val_rows(out)
    assert rows[0][0] == 0  # the starting point is evaluated before the first step
    assert abs(rows[0][1] - hf_loss) < 1e-4 and abs(rows[1][1] - hf_loss) < 1e-4


def test_init_from_hf_folder_learns(hf_dir, tmp_path):
    out = tmp_path / "ft"
    flags = _flags(tmp_path, out, "--init_from", str(hf_dir), "--preset", "finetune", "--lr",
                   "3e-3", "--max_steps", "12", "--eval_interval", "12")
    assert train_lm.main(flags) == 0
    (s0, before), (s1, after) = _val_rows(out)
    assert (s0, s1) == (0, 12) and after < before - 0.5


def test_init_from_cached_hub_name(hf_dir, tmp_path, monkeypatch):
    """A hub name resolves through the local Hugging Face cache (hub/models--NAME/...)."""
    commit = "1" * 40
    repo = tmp_path / "hf-home" / "hub" / "models--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap_dir = repo / "snapshots" / commit
    snap_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, snap_dir / name)
    out = tmp_path / "hub"
    assert train_lm.main(_flags(tmp_path, out, "--init_from", "tiny-gpt2", "--lr", "0",
                                "--max_steps", "1", "--max_seq_len", "16")) == 0
    snap = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    assert snap["init_from"] == "tiny-gpt2" and snap["model_config"]["max_seq_len"] == 16
    from safetensors.torch import load_file

    wpe = load_file(hf_dir / "model.safetensors")["transformer.wpe.weight"]
    assert torch.equal(snap["model_state_dict"]["transformer.wpe.weight"], wpe[:16])  # cropped


def test_init_from_our_snapshot_starts_a_new_run(tmp_path, capsys):
    from train_helpers import tiny_flags

    first = tmp_path / "first"
    assert train_lm.main(tiny_flags(tmp_path, "--out_dir", str(first), "--max_steps", "2")) == 0
    old = torch.load(first / "snapshots" / "latest.pt", weights_only=True)
    out = tmp_path / "second"
    flags = _flags(tmp_path, out, "--init_from", str(first), "--max_steps", "1", seed=5,
                   words=1500)
    assert train_lm.main(flags) == 0
    new = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    assert new["step"] == 1 and new["model_config"] == old["model_config"]
    assert new["init_from"] == str(first) and new["dataset"] == "custom"
    steps = {int(s["step"]) for s in new["optimizer_state_dict"]["state"].values()}
    assert steps == {1}  # a fresh optimizer (the source's had taken 2 steps)
    assert [r["step"] for r in read_metrics(out / "metrics.csv") if r["kind"] == "train"] == ["1"]
    assert (first / "snapshots" / "latest.pt").is_file()  # the source run is untouched
    capsys.readouterr()
    assert train_lm.main([*flags, "--explain"]) == 0
    assert f"Starting from the weights of {first}: a new run" in capsys.readouterr().out


def test_init_from_errors_are_one_line_exit_2(hf_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    small_vocab = tmp_path / "small-vocab"  # no tokenizer files: GPT-2's is assumed
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=32, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(small_vocab)
    capsys.readouterr()
    partial = tmp_path / "hf-home" / "hub" / "models--tokenizer-only"  # cached without weights
    (partial / "refs").mkdir(parents=True)
    (partial / "refs" / "main").write_text("2" * 40)
    (partial / "snapshots" / ("2" * 40)).mkdir(parents=True)
    shutil.copy(hf_dir / "config.json", partial / "snapshots" / ("2" * 40) / "config.json")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    cases = [
        (["--init_from", str(hf_dir), "--d_model", "64"], "--d_model 64 (it has 32)"),
        (["--init_from", str(hf_dir), "--num_layers", "3"], "drop those flags"),
        (["--init_from", str(hf_dir), "--max_seq_len", "64"], "larger than its context of 32"),
        (["--init_from", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["--init_from", str(corrupt)], "truncated or corrupt"),
        (["--init_from", "no-such-model"], "not in the local cache"),
        (["--init_from", "tokenizer-only"], "huggingface-cli download tokenizer-only"),
        (["--init_from", str(small_vocab)], "its vocabulary has 1,000 tokens but tokenizer"),
    ]
    for extra, needle in cases:
        out = tmp_path / "run"
        code = train_lm.main(_flags(tmp_path, out, *extra))
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert "Traceback" not in err and not out.exists(), extra


def test_resume_of_a_fine_tune_is_bit_exact(hf_dir, tmp_path, monkeypatch):
    def flags(out):
        return _flags(tmp_path, out, "--init_from", str(hf_dir), "--max_steps", "7",
                      "--grad_accum", "2", "--dropout", "0.1", "--eval_interval", "3",
                      "--save_interval", "100", "--lr", "3e-3", words=700)

    a, b = tmp_path / "a", tmp_path / "b"
    assert train_lm.main(flags(a)) == 0
    monkeypatch.setenv("LM_MAX_STEPS", "4")
    assert train_lm.main(flags(b)) == 0
    monkeypatch.delenv("LM_MAX_STEPS")
    assert train_lm.main([*flags(b), "--resume", "auto"]) == 0  # the same command continues

    def rows(run):  # b also validated at step 4, where LM_MAX_STEPS stopped it
        return [(r["step"], r["kind"], r["lr"], r["loss"])
                for r in read_metrics(run / "metrics.csv")
                if (r["step"], r["kind"]) != ("4", "val")]

    assert rows(a) == rows(b) and len(rows(a)) == 7 + 4  # 7 steps; validation at 0, 3, 6, 7
    end_a = torch.load(a / "snapshots" / "latest.pt", weights_only=True)
    end_b = torch.load(b / "snapshots" / "latest.pt", weights_only=True)
    assert end_a["step"] == end_b["step"] == 7 and end_b["init_from"] == str(hf_dir)
    for key, value in end_a["model_state_dict"].items():
        assert torch.equal(value, end_b["model_state_dict"][key]), key
