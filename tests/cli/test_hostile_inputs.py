"""Checkpoints and arguments that are wrong the way a careless or hostile user's are.

Each case ends in one clear line (a `CheckpointError`, or exit 2 from a script), never in a
traceback, an allocator failure or a silently wrong result.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_cases import run_many
from loader_cases import _error, _save
from safetensors.torch import save_file

from model.checkpoint import load_model
from model.generation import NonFiniteLogitsError
from model.repl import Repl
from model.textstream import GenerationSettings
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)


def _with_weight(tiny, name: str, value: torch.Tensor) -> dict:
    sd = dict(tiny["model_state_dict"])
    sd[name] = value
    if name == "transformer.wte.weight":
        sd["lm_head.weight"] = value
    return {**tiny, "model_state_dict": sd}


@pytest.fixture(scope="module")
def nan_checkpoint(tiny, tmp_path_factory) -> Path:
    """The tiny model with one NaN in the last block's MLP: every logit becomes NaN."""
    w = tiny["model_state_dict"]["transformer.h.1.mlp.c_fc.weight"].clone()
    w[0, 0] = math.nan
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    return _save(path, _with_weight(tiny, "transformer.h.1.mlp.c_fc.weight", w))


# -- the loader validates before it allocates ---------------------------------------------------


@pytest.mark.parametrize("key, value, needle", [
    # Each would ask the allocator for terabytes (before: a RuntimeError from the allocator).
    ("max_seq_len", 2**40, "asks for max_seq_len 1,099,511,627,776, more than the"),
    ("d_model", 2**36, "asks for d_model 68,719,476,736, more than the 1,626,400 weights"),
    ("d_ff", 2**40, "asks for d_ff 1,099,511,627,776"),
    ("vocab_size", 2**40, "asks for vocab_size 1,099,511,627,776"),
    # Building even the module tree of a billion layers would take hours.
    ("num_layers", 10**9, "num_layers 1,000,000,000 (the file has 29 tensors)"),
])
def test_absurd_config_is_refused_before_allocating(tmp_path, tiny, key, value, needle):
    cfg = {**tiny["model_config"], key: value}
    if key == "d_model":
        cfg["num_heads"] = 2
    msg = _error(_save(tmp_path / "absurd.pt", {**tiny, "model_config": cfg}))
    assert needle in msg


def test_nonfinite_weights_are_named_and_refused(tmp_path, tiny, nan_checkpoint):
    msg = _error(nan_checkpoint)
    assert "non-finite weights" in msg and "transformer.h.1.mlp.c_fc.weight" in msg
    assert "--allow_nonfinite" in msg
    inf = tiny["model_state_dict"]["transformer.ln_f.bias"].clone()
    inf[3] = -math.inf
    msg = _error(_save(tmp_path / "inf.pt",
                            _with_weight(tiny, "transformer.ln_f.bias", inf)))
    assert "transformer.ln_f.bias" in msg
    model, _ = load_model(nan_checkpoint, device="cpu", allow_nonfinite=True)  # to debug it
    assert torch.isnan(model.transformer.h[1].mlp.c_fc.weight).any()


def test_integer_weights_are_refused(tmp_path, tiny):
    sd = {k: v for k, v in tiny["model_state_dict"].items() if k != "lm_head.weight"}
    sd["transformer.ln_f.weight"] = torch.ones(32, dtype=torch.int64)
    path = tmp_path / "ints.safetensors"
    save_file(sd, str(path), metadata={"model_config": json.dumps(tiny["model_config"])})
    msg = _error(path)
    assert "dense floating-point" in msg and "transformer.ln_f.weight (int64)" in msg


@pytest.mark.parametrize("odd, needle", [
    (torch.zeros(32, device="meta"), "(float32, meta)"),  # before: RuntimeError from .item()
    (torch.zeros(32).to_sparse(), "(float32, sparse_coo)"),  # before: NotImplementedError
])
def test_meta_and_sparse_weights_are_refused(tmp_path, tiny, odd, needle):
    path = _save(tmp_path / "odd.pt", _with_weight(tiny, "transformer.ln_f.bias", odd))
    assert f"transformer.ln_f.bias {needle}" in _error(path)


def test_non_string_keys_do_not_break_the_message(tmp_path, tiny):
    sd = {**tiny["model_state_dict"], 5: torch.zeros(2), "extra.weight": torch.zeros(2)}
    msg = _error(_save(tmp_path / "keys.pt", {**tiny, "model_state_dict": sd}))
    assert "unexpected keys: 5, extra.weight" in msg  # before: TypeError sorting int and str


def test_safetensors_with_wrong_shapes(tmp_path, tiny):
    sd = {k: v for k, v in tiny["model_state_dict"].items() if k != "lm_head.weight"}
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(96, 31)
    path = tmp_path / "shapes.safetensors"
    save_file(sd, str(path), metadata={"model_config": json.dumps(tiny["model_config"])})
    assert "transformer.h.0.attn.c_attn.weight [96, 31] vs [96, 32]" in _error(path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    assert "truncated or corrupt" in _error(path)


# -- generation stops at non-finite logits ------------------------------------------------------


def test_generate_raises_on_nonfinite_logits(nan_checkpoint):
    model, _ = load_model(nan_checkpoint, device="cpu", allow_nonfinite=True)
    for kwargs in (dict(temperature=0), dict(temperature=0.8, top_p=0.9), dict(top_k=5)):
        with pytest.raises(NonFiniteLogitsError, match="non-finite logits") as info:
            model.generate([1, 2, 3], max_new_tokens=5, **kwargs)
        assert "\n" not in str(info.value) and "new token 1" in str(info.value)
    stream = model.stream([1, 2, 3], max_new_tokens=5)
    with pytest.raises(NonFiniteLogitsError):
        next(stream)
    assert isinstance(NonFiniteLogitsError("x"), RuntimeError)


def test_extreme_sampling_values_stay_well_defined(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, device="cpu")  # no end token: every step counts
    prompt = [464, 3290, 286, 262, 995, 373, 257, 1110]
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0)
    # A tiny temperature is greedy in the limit (before: inf - inf = NaN, garbage tokens).
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=1e-300, seed=1),
                       greedy)
    # A tiny repetition penalty makes seen tokens win (before: an inf logit, then NaN).
    out = model.generate(prompt, max_new_tokens=4, repetition_penalty=1e-300, seed=1)
    assert int(out[0, len(prompt)]) in prompt
    # A budget past int64 means "no limit" (before: an overflow error from torch).
    steps = model.stream(prompt, max_new_tokens=10**20, seed=1)
    assert [next(steps).shape for _ in range(3)] == [(1,)] * 3
    steps.close()
    assert model.generate(prompt, max_length=10**30, seed=1, max_new_tokens=2).shape == (1, 10)


def test_repl_survives_nonfinite_logits(nan_checkpoint):
    tok = load_tokenizer("gpt2")
    model, _ = load_model(nan_checkpoint, device="cpu", tokenizer=tok, allow_nonfinite=True)
    out, err = io.StringIO(), io.StringIO()
    repl = Repl(model, tok, GenerationSettings(max_new_tokens=3), interactive=False,
                stdin=io.StringIO("Hello\n/show\n"), stdout=out, stderr=err)
    assert repl.run() == 0
    assert err.getvalue().count("error:") == 1 and "non-finite logits" in err.getvalue()
    assert out.getvalue().startswith("Hello\n")  # the answer's line is ended
    assert "max_new_tokens      3" in out.getvalue()  # the session went on: /show ran


# -- the scripts: one line, exit 2 --------------------------------------------------------------


def test_scripts_refuse_broken_checkpoints(tmp_path, tiny, nan_checkpoint):
    absurd = _save(tmp_path / "absurd.pt",
                   {**tiny, "model_config": {**tiny["model_config"], "d_ff": 2**40}})
    gen = ["--prompt", "Hi", "--max_new_tokens", "3", "--device", "cpu"]
    results = run_many(REPO / "generate_lm.py", {
        "nan": ["--checkpoint", nan_checkpoint, *gen],
        "nan_allowed": ["--checkpoint", nan_checkpoint, *gen, "--allow_nonfinite"],
        "nan_allowed_no_stream": ["--checkpoint", nan_checkpoint, *gen, "--allow_nonfinite",
                                  "--no_stream"],
        "nan_allowed_json": ["--checkpoint", nan_checkpoint, *gen, "--allow_nonfinite", "--json"],
        "absurd": ["--checkpoint", absurd, *gen],
    }, tmp_path)
    for name, needle in (("nan", "non-finite weights"), ("nan_allowed", "non-finite logits"),
                         ("nan_allowed_no_stream", "non-finite logits"),
                         ("nan_allowed_json", "non-finite logits"),
                         ("absurd", "model_config asks for d_ff")):
        code, _, err = results[name]
        assert code == 2 and "Traceback" not in err, (name, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (name, err)
    for script, argv in (("evaluate_lm.py", ["--file", REPO / "README.md"]),
                         ("convert.py", ["--to_safetensors", tmp_path / "x.safetensors"])):
        results = run_many(REPO / script, {
            "nan": ["--checkpoint", nan_checkpoint, *argv],
            "absurd": ["--checkpoint", absurd, *argv],
        }, tmp_path)
        for code, _, err in results.values():
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (script, err)
            assert f"{script}: error:" in err, (script, err)
    assert not (tmp_path / "x.safetensors").exists()


# -- odd terminals and streams ------------------------------------------------------------------


def test_closed_streams_and_a_full_output(tmp_path, tiny_checkpoint):
    """stdin or stdout closed (`<&-`, `>&-`) and output to a full disk (/dev/full): one line each
    (before: AttributeError or OSError tracebacks)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    gen = f"{sys.executable} {REPO / 'generate_lm.py'} --checkpoint {tiny_checkpoint}"
    ev = f"{sys.executable} {REPO / 'evaluate_lm.py'} --checkpoint {tiny_checkpoint}"
    cases = {
        f"{gen} --interactive <&-": (2, "--interactive reads prompts from stdin, but stdin is "
                                        "closed"),
        f"{gen} --prompt - <&-": (2, "stdin is closed"),
        f"{gen} --prompt Hi >&-": (2, "stdout is closed"),
        f"{gen} --prompt Hi --max_new_tokens 2 >/dev/full": (1, "cannot write the output (No "
                                                              "space left on device)"),
        f"{ev} --file {REPO / 'README.md'} --json >/dev/full": (1, "cannot write the report"),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONIOENCODING": "utf-8"}
    # Not UTF-8 on the command line (before: a TypeError from the tokenizer).
    not_utf8 = f"{gen} --prompt $'caf\\xe9' --stop $'\\xff' --max_new_tokens 2 --seed 1"
    # All at once (each waits only for its own exit): the imports dominate, and there are 2 cores.
    procs = {command: subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, cwd=tmp_path)
             for command in (*cases, not_utf8)}
    results = {}
    for command, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[command] = (p.returncode, out, err)
    for command, (code, needle) in cases.items():
        rc, _, err = results[command]
        err = err.decode()
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert rc == code and "Traceback" not in err, (command, err)
        assert len(errors) == 1 and needle in errors[0], (command, err)
    rc, out, err = results[not_utf8]
    assert rc == 0, err.decode()
    assert out.decode("utf-8").startswith("caf\ufffd")
    assert err.decode().count("was not valid UTF-8") == 2
