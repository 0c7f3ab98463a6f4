"""The shared checkpoint loader: finding files, safe loading, and one clear error per bad case."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from loader_cases import _error, _save
from safetensors.torch import save_file

from model.checkpoint import (
    DeviceError,
    find_default_checkpoint,
    load_model,
    pick_device,
    resolve_checkpoint,
)
from model.lm import LanguageModel
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """The fixture checkpoint read back as a plain dict (to derive broken variants from)."""
    return torch.load(tiny_checkpoint, weights_only=True)


def test_load_model_restores_weights_and_sets_tokenizer(tiny_checkpoint, tiny):
    tok = load_tokenizer("gpt2")
    model, ckpt = load_model(tiny_checkpoint, device="cpu", tokenizer=tok)
    assert isinstance(model, LanguageModel) and not model.training
    assert model.device.type == "cpu"
    assert model.end_token == tok.eos_token_id == 50256 and model.tokenizer is tok
    assert ckpt["_path"] == str(tiny_checkpoint) and ckpt["step"] == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny["model_state_dict"][k]), k
    # The head is still tied to the embedding after loading.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_load_model_without_tokenizer_and_with_dtype(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, device=None, dtype=torch.bfloat16)
    assert model.end_token is None and model.tokenizer is None
    assert next(model.parameters()).dtype == torch.bfloat16


def test_run_and_snapshots_directories_pick_highest_step(tmp_path, tiny_checkpoint):
    snaps = tmp_path / "lm_test" / "snapshots"
    snaps.mkdir(parents=True)
    high = snaps / "snapshot_epoch_0001_step_000200_20260101_000000.pt"
    low = snaps / "snapshot_epoch_0000_step_000010_20260102_000000.pt"
    for f in (high, low, snaps / "latest.pt"):
        shutil.copy(tiny_checkpoint, f)
    os.utime(high, (time.time() - 100, time.time() - 100))  # the lower step is newer on disk
    assert resolve_checkpoint(tmp_path / "lm_test") == high
    assert resolve_checkpoint(snaps) == high
    _, ckpt = load_model(tmp_path / "lm_test", device="cpu")
    assert ckpt["_path"] == str(high)
    high.unlink()
    low.unlink()
    assert resolve_checkpoint(tmp_path / "lm_test") == snaps / "latest.pt"
    assert resolve_checkpoint(snaps / "latest.pt") == snaps / "latest.pt"


def test_find_default_checkpoint_prefers_latest_run(tmp_path, tiny_checkpoint):
    assert find_default_checkpoint(tmp_path) is None
    for name, age in (("lm_old", 500), ("lm_new", 10)):
        snaps = tmp_path / name / "snapshots"
        snaps.mkdir(parents=True)
        shutil.copy(tiny_checkpoint, snaps / "latest.pt")
        os.utime(snaps / "latest.pt", (time.time() - age, time.time() - age))
    (tmp_path / "lm_empty" / "snapshots").mkdir(parents=True)
    assert find_default_checkpoint(tmp_path) == tmp_path / "lm_new"


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, tiny):
    sd = {f"_orig_mod.{k}": v for k, v in tiny["model_state_dict"].items()}
    path = _save(tmp_path / "compiled.pt", {**tiny, "model_state_dict": sd})
    model, _ = load_model(path, device="cpu")
    wte = tiny["model_state_dict"]["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, wte)


def test_safetensors_with_config_metadata(tmp_path, tiny):
    sd = {k: v.clone() for k, v in tiny["model_state_dict"].items() if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"model_config": json.dumps(tiny["model_config"]),
                                       "step": "10"})
    tok = load_tokenizer("gpt2")
    model, ckpt = load_model(path, device="cpu", tokenizer=tok)
    assert ckpt["_path"] == str(path) and ckpt["step"] == "10"
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny["model_state_dict"][k]), k

    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    assert "no 'model_config' in its metadata" in _error(bare)


# -- devices ------------------------------------------------------------------------------------


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type in (expected, "mps")
    assert pick_device(None) == pick_device("auto")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            pick_device("cuda")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_model("does-not-matter.pt", device="cuda:0")


# -- unsafe and broken files ------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny):
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "evil.pt", {**tiny, "model_state_dict": _Payload(marker)})
    # The payload is real: an unsafe load would create the file.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    msg = _error(path)
    assert "refusing to load" in msg and "trusted source" in msg
    assert not marker.exists()
    # A plain pickle (not a torch zip file) with the same payload is refused as well.
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    assert "refusing to load" in _error(legacy)
    assert not marker.exists()


def test_missing_path_and_empty_directory(tmp_path):
    assert "checkpoint not found" in _error(tmp_path / "nope.pt")
    (tmp_path / "run" / "snapshots").mkdir(parents=True)
    msg = _error(tmp_path / "run")
    assert "no checkpoint in directory" in msg and "train_lm.py" in msg


def test_empty_truncated_and_foreign_files(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty.pt"
    empty.touch()
    assert "is empty (0 bytes)" in _error(empty)

    data = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(truncated)

    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not weights\n")
    assert "is not a PyTorch checkpoint" in _error(text)


def test_wrong_contents(tmp_path, tiny):
    assert "holds a list, not a checkpoint dict" in _error(_save(tmp_path / "l.pt", [1, 2]))

    no_sd = {k: v for k, v in tiny.items() if k != "model_state_dict"}
    assert "has no 'model_state_dict'" in _error(_save(tmp_path / "a.pt", no_sd))

    no_cfg = {k: v for k, v in tiny.items() if k != "model_config"}
    assert "has no 'model_config'" in _error(_save(tmp_path / "b.pt", no_cfg))

    bare = _save(tmp_path / "bare.pt", tiny["model_state_dict"])
    assert "looks like a bare state dict" in _error(bare)

    bad_cfg = {**tiny, "model_config": {**tiny["model_config"], "n_embd": 32}}
    msg = _error(_save(tmp_path / "c.pt", bad_cfg))
    assert "bad model_config" in msg and "n_embd" in msg


def test_weights_that_do_not_fit_the_config(tmp_path, tiny):
    cfg = {**tiny["model_config"], "d_model": 64, "num_heads": 2}
    msg = _error(_save(tmp_path / "shape.pt", {**tiny, "model_config": cfg}))
    assert "weights do not fit its model_config" in msg
    assert "transformer.wte.weight [50257, 32] vs [50257, 64]" in msg

    sd = dict(tiny["model_state_dict"])
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.9.attn.c_attn.weight"] = torch.zeros(3)
    msg = _error(_save(tmp_path / "keys.pt", {**tiny, "model_state_dict": sd}))
    assert "missing keys: transformer.h.1.mlp.c_fc.bias" in msg
    assert "unexpected keys: transformer.h.9.attn.c_attn.weight" in msg


def test_vocab_must_match_tokenizer(tmp_path, tiny_config):
    cfg = {**tiny_config, "vocab_size": 1000}
    model = LanguageModel(**cfg)
    path = _save(tmp_path / "small_vocab.pt",
                 {"model_config": cfg, "model_state_dict": model.state_dict()})
    msg = _error(path, tokenizer=load_tokenizer("gpt2"))
    assert "vocab_size 1000" in msg and "50257 tokens" in msg and "--tokenizer" in msg
    load_model(path, device="cpu")  # without a tokenizer there is nothing to compare
