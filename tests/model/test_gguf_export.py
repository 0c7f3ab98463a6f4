"""convert.py --to_gguf: GGUF files read back with gguf.GGUFReader, loaded by llama.cpp, and the
--to_hf folder that llama.cpp's own converter reads.

The llama.cpp parts run when `llama_cpp` (llama-cpp-python) is importable, and the converter test
when llama.cpp's `convert_hf_to_gguf.py` is found in `LLAMA_CPP_DIR` (llama.cpp's source
folder; .ci/run sets it); otherwise they skip, saying why. Models are tiny, with random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_cases import assert_usage_errors

import convert
from model import gguf_export
from model.checkpoint import load_model
from model.quant import dequantize_int4, quantize_int4

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
# Shapes: the tiny test model (d_ff = 2 x d_model, as the default config) and GPT-2's 4x.
SHAPES = {"x2": dict(d_ff=64), "x4": dict(d_ff=128)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama_cpp_dir() -> Path | None:
    folder = os.environ.get("LLAMA_CPP_DIR")  # .ci/run sets it
    if folder and (Path(folder) / "convert_hf_to_gguf.py").is_file():
        return Path(folder)
    return None


@pytest.fixture(scope="module")
def checkpoints(make_tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-src")
    out = {}
    for name, overrides in SHAPES.items():
        # Larger weights than the default init, so logits spread (clear greedy choices).
        path = make_tiny_checkpoint(folder / f"{name}.pt", **overrides)
        ckpt = torch.load(path, weights_only=True)
        torch.manual_seed(len(name) + overrides["d_ff"])
        sd = {k: (v + 0.3 * torch.randn_like(v)) if v.dim() == 2 else v
              for k, v in ckpt["model_state_dict"].items()}
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
        torch.save({**ckpt, "model_state_dict": sd}, path)
        out[name] = path
    return out


# What is exported: the default shape in every type, the 4x shape in f32.
EXPORTS = [("x2", "f32"), ("x2", "f16"), ("x2", "q8_0"), ("x2", "q4_0"), ("x4", "f32")]


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(shape, outtype) -> file; the x2/f32 one through the command line, with its check."""
    folder = tmp_path_factory.mktemp("gguf-out")
    out = {}
    for shape, outtype in EXPORTS:
        path = folder / f"{shape}-{outtype}.gguf"
        if (shape, outtype) == ("x2", "f32"):
            assert convert.main(["--to_gguf", str(path), "--checkpoint", str(checkpoints[shape]),
                                 "--outtype", outtype]) == 0
        else:  # the tests read these back themselves
            convert.to_gguf(checkpoints[shape], path, outtype, verify=False)
        out[shape, outtype] = path
    return out


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


# -- the file, read back with gguf.GGUFReader ------------------------------------------------------


@pytest.mark.parametrize("outtype", gguf_export.OUTTYPES)
def test_read_back_equals_the_source(checkpoints, exports, outtype):
    model, _ = load_model(checkpoints["x2"], device="cpu")
    cfg = model.config
    reader = gguf.GGUFReader(str(exports["x2", outtype]))
    # Metadata as llama.cpp's GPT-2 loader reads it.
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == cfg.max_seq_len
    assert _field(reader, "gpt2.embedding_length") == cfg.d_model
    assert _field(reader, "gpt2.feed_forward_length") == cfg.d_ff == 2 * cfg.d_model
    assert _field(reader, "gpt2.block_count") == cfg.num_layers
    assert _field(reader, "gpt2.attention.head_count") == cfg.num_heads
    assert abs(_field(reader, "gpt2.attention.layer_norm_epsilon") - 1e-5) < 1e-12
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 50256
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = json.loads((REPO / "model/assets/gpt2/vocab.json").read_text("utf-8"))
    assert len(tokens) == 50257 and all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    # Tensors: llama.cpp's names and shapes (ggml order), every value from the source.
    sd = model.state_dict()
    names = {t.name: t for t in reader.tensors}
    assert set(names) == set(gguf_export.expected_tensors(cfg))
    assert "output.weight" not in names  # the LM head is the token embedding
    assert tuple(names["blk.0.ffn_up.weight"].shape) == (cfg.d_model, cfg.d_ff)
    assert tuple(names["blk.1.ffn_down.weight"].shape) == (cfg.d_ff, cfg.d_model)
    ours = {gguf_export.gguf_name(k): v for k, v in sd.items() if k != "lm_head.weight"}
    assert ours["blk.1.ffn_down.weight"] is sd["transformer.h.1.mlp.c_proj.weight"]
    for name, t in names.items():
        src = ours[name]
        kind = gguf_export.tensor_outtype(name, outtype)
        assert t.tensor_type.name.lower() == kind, name
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                        dtype=np.float32)).reshape(src.shape)
        if kind == "f32":
            assert torch.equal(got, src), name
        elif kind == "f16":
            assert torch.equal(got, src.half().float()), name
        elif kind == "q8_0":  # blocks of 32 sharing an f16 scale d = amax / 127; error <= 0.57 d
            blocks = src.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - blocks).abs() <= 0.57 * d + 1e-9).all(), name
            assert not torch.equal(got, src)
        else:  # q4_0: blocks of 32, d = amax / 8 in f16, 16 levels; error <= d (+8 d -> 7 d)
            blocks = src.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / 8
            err = (got.reshape(-1, 32) - blocks).abs()
            assert (err <= 1.01 * d + 1e-9).all() and err.mean() < 0.3 * d.mean(), name
            # our --quantize int4 holds the same grid but for its scale's rounding (bf16, not
            # f16), which may move a value across a rounding midpoint: a step d apart there
            q, dq = quantize_int4(src)
            apart = (dequantize_int4(q, dq) - got).abs().reshape(-1, 32)
            assert (apart <= 1.05 * d + 1e-6).all(), name
            assert (apart <= 8 * 2**-8 * d + 1e-6).float().mean() > 0.95, name
    # 1-D tensors and the position embedding stay f32 in every type, as llama.cpp writes them.
    assert names["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_norm.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    # The export's own check (what convert.py runs before renaming the file) agrees.
    worst = gguf_export.check_gguf(reader, cfg, ours, outtype)
    assert worst["f32"] == 0.0 and (outtype == "f32" or worst[outtype] > 0)


def test_name_map_covers_the_model_and_is_one_to_one(checkpoints):
    model, _ = load_model(checkpoints["x4"], device="cpu")
    names = [gguf_export.gguf_name(k) for k in model.state_dict()]
    written = [n for n in names if n is not None]
    assert len(written) == len(set(written)) == len(names) - 1  # lm_head only is left out
    assert set(written) == set(gguf_export.expected_tensors(model.config))


def test_padded_vocabulary_gets_unused_tokens():
    vocab = gguf_export.gpt2_vocab(50304)  # padded to a multiple of 64, as nanoGPT does
    assert len(vocab.tokens) == len(vocab.types) == 50304
    assert vocab.tokens[50257] == "[PAD50257]" and vocab.types[50303] == gguf.TokenType.UNUSED


# -- bad inputs: one line, exit 2, no partial file -------------------------------------------------


def test_bad_inputs_are_one_line_exit_2_and_leave_no_file(checkpoints, make_tiny_checkpoint,
                                                            exports, tmp_path):
    ckpt = checkpoints["x2"]
    int8 = tmp_path / "int8.pt"
    raw = torch.load(ckpt, weights_only=True)
    torch.save({**raw, "model_state_dict": {k: v.to(torch.int8) for k, v in
                                            raw["model_state_dict"].items()}}, int8)
    small_vocab = make_tiny_checkpoint(tmp_path / "small_vocab.pt", vocab_size=1000)
    odd_width = make_tiny_checkpoint(tmp_path / "odd.pt", d_model=24, d_ff=48, num_heads=2)
    other_tok = tmp_path / "other_tok.pt"
    torch.save({**raw, "tokenizer": "some/other-tokenizer"}, other_tok)
    huge = tmp_path / "huge.pt"
    sd = dict(raw["model_state_dict"])
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"] * 1e6
    torch.save({**raw, "model_state_dict": sd}, huge)
    out = tmp_path / "out.gguf"
    cases = {
        "missing folder": (["--to_gguf", tmp_path / "no" / "such" / "m.gguf", "--checkpoint",
                            ckpt], "does not exist"),
        "bad outtype": (["--to_gguf", out, "--checkpoint", ckpt, "--outtype", "q4_k"],
                        "invalid choice"),
        "outtype without to_gguf": (["--to_hf", tmp_path / "hf", "--checkpoint", ckpt,
                                     "--outtype", "f16"], "--outtype is for --to_gguf"),
        "needs checkpoint": (["--to_gguf", out], "--to_gguf needs --checkpoint"),
        "gguf source": (["--to_gguf", out, "--checkpoint", exports["x2", "q8_0"]],
                        "already a GGUF file"),
        "int8 source": (["--to_gguf", out, "--checkpoint", int8], "floating-point"),
        "small vocab": (["--to_gguf", out, "--checkpoint", small_vocab], "vocab_size 1000"),
        "q8_0 row width": (["--to_gguf", out, "--checkpoint", odd_width, "--outtype", "q8_0"],
                           "multiple of 32"),
        "other tokenizer": (["--to_gguf", out, "--checkpoint", other_tok],
                            "the checkpoint's tokenizer, which the GGUF file must hold"),
        "f16 range": (["--to_gguf", out, "--checkpoint", huge, "--outtype", "f16"],
                      "beyond f16's range"),
        "is a folder": (["--to_gguf", tmp_path, "--checkpoint", ckpt], "is a folder"),
    }
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    cases["existing"] = (["--to_gguf", tmp_path / "exists.gguf", "--checkpoint", ckpt], "--force")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_usage_errors(REPO / "convert.py", cases, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"


def test_a_failed_check_leaves_no_file(checkpoints, tmp_path, monkeypatch):
    def broken(path, *args):
        raise gguf_export.GGUFExportError("check failed")

    monkeypatch.setattr(gguf_export, "check_gguf", broken)
    with pytest.raises(gguf_export.GGUFExportError, match="check failed"):
        convert.to_gguf(checkpoints["x2"], tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


# -- llama.cpp loads the files and agrees with us --------------------------------------------------


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (CI installs it: .ci/run)")


@pytest.fixture
def llama(request):
    """`open(path, n_ctx)` -> a `llama_cpp.Llama` with raw logits for every position, closed
    after the test."""
    llama_cpp = _llama_cpp()
    opened = []

    def open_(path: Path, n_ctx: int):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, logits_all=True,
                              verbose=False, seed=0)
        opened.append(llm)
        return llm

    yield open_
    for llm in opened:
        llm.close()


PROMPT = "To be, or not to be: that is"
# Largest logit difference allowed per type on these models (logits up to about 8; measured:
# 6e-3 f32, 1.7e-2 f16, 0.23 q8_0, which also rounds activations to 8 bits; q4_0, against our
# int4 on nearly its grid, 2.5: random weights at 4 bits, activations at 8, and the scales'
# bf16-vs-f16 rounding moving values across midpoints; its greedy check is then mostly void).
# f32 is not bit-exact: llama.cpp's GELU reads an f16 table and its KV cache is f16 by default.
LOGIT_TOL = {"f32": 1e-2, "f16": 3e-2, "q8_0": 4e-1, "q4_0": 4.0}


def _their_logits(llm, tokens: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))


@pytest.mark.parametrize("shape,outtype", EXPORTS)
def test_llama_cpp_loads_it_and_agrees(checkpoints, exports, llama, shape, outtype):
    from model.tokenizer import load_tokenizer

    model, _ = load_model(checkpoints[shape], device="cpu")
    if outtype == "q4_0":  # llama.cpp's q4_0 against ours on (almost) the same 4-bit grid
        model.quantize("int4")
    llm = llama(exports[shape, outtype], model.max_seq_len)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    assert prompt == load_tokenizer("gpt2").encode(PROMPT)  # llama.cpp tokenizes as we do
    assert llm.token_eos() == llm.token_bos() == 50256
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert (_their_logits(llm, prompt) - ours).abs().max() <= LOGIT_TOL[outtype]
    # Greedy: llama.cpp's continuation is ours up to the first step where our top two logits
    # are closer than its error could separate (the 16 steps are all clear for f32 here).
    n = 16
    mine = model.generate(prompt, max_new_tokens=n, temperature=0)[0, len(prompt):].tolist()
    got = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(tok)
        if len(got) == n:
            break
    with torch.no_grad():
        forced = model(torch.tensor([prompt + mine]))[0, len(prompt) - 1:-1]
    top2 = forced.topk(2).values
    unclear = ((top2[:, 0] - top2[:, 1]) <= 2 * LOGIT_TOL[outtype]).nonzero()
    agree_to = int(unclear[0]) if unclear.numel() else n
    assert got[:agree_to] == mine[:agree_to]
    if outtype == "f32":
        assert agree_to == n


# -- the --to_hf folder in llama.cpp's own converter -----------------------------------------------


def test_to_hf_folder_passes_llama_cpps_converter(checkpoints, tmp_path, llama_or_none):
    folder = tmp_path / "hf"
    assert convert.main(["--to_hf", str(folder), "--checkpoint", str(checkpoints["x4"]),
                         "--no_verify"]) == 0
    config = json.loads((folder / "config.json").read_text())
    # The keys its GPT-2 path reads (conversion/gpt2.py and its base class).
    for key in ("n_ctx", "n_embd", "n_head", "n_layer", "layer_norm_epsilon", "vocab_size"):
        assert key in config, key
    assert config["n_ctx"] == config["n_positions"] == 32
    assert config["architectures"] == ["GPT2LMHeadModel"]
    source = _llama_cpp_dir()
    if source is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LLAMA_CPP_DIR); the "
                    "config keys it reads were checked")
    out = tmp_path / "converted.gguf"
    proc = subprocess.run(
        [sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outfile",
         str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": str(source / "gguf-py")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    if llama_or_none is None:
        pytest.skip("converted; llama-cpp-python is not installed to load the result")
    # This shape's d_ff is 4 x d_model, the one llama.cpp's converter assumes for GPT-2, so its
    # file holds the same network: the same logits as ours.
    from model.tokenizer import load_tokenizer

    model, _ = load_model(checkpoints["x4"], device="cpu")
    prompt = load_tokenizer("gpt2").encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    theirs = _their_logits(llama_or_none(out, model.max_seq_len), prompt)
    assert (theirs - ours).abs().max() <= LOGIT_TOL["f32"]


@pytest.fixture
def llama_or_none(request):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        yield None
        return
    yield request.getfixturevalue("llama")
