"""convert.py: Hugging Face folders in and out, safetensors out, checked against transformers.

Every model here is a random-weight tiny GPT-2 built from a `GPT2Config`; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_cases import assert_usage_errors
from safetensors import safe_open
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import convert
from model.checkpoint import load_model
from model.lm import LanguageModel, LMConfig
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
HF_TINY = dict(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_hf_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A tiny GPT2LMHeadModel whose every weight (LayerNorms and biases too) is random."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**HF_TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def ids(batch: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: LanguageModel, hf: GPT2LMHeadModel, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours(idx) - hf(input_ids=idx).logits).abs().max())


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model.save_pretrained(str(folder))
    return folder


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


# -- Hugging Face -> ours --------------------------------------------------------------------------


def test_from_hf_safetensors_gives_hf_logits(hf_model, hf_dir, tmp_path):
    out = tmp_path / "gpt2.pt"
    assert convert.main(["--from_hf", str(hf_dir), "--out", str(out)]) == 0
    model, ckpt = load_model(out, device="cpu")
    assert max_diff(model, hf_model, ids()) <= 1e-5
    assert ckpt["model_config"] == LMConfig(vocab_size=50257, d_model=32, num_heads=2,
                                            num_layers=2, d_ff=128, max_seq_len=32,
                                            dropout=0.0).to_dict()  # GPT-2's architecture
    assert ckpt["tokenizer"] == "gpt2"
    # The guide's own loading code works on the converted file.
    raw = torch.load(out)
    cfg = raw["model_config"]
    guide = LanguageModel(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"],
                          num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
                          d_ff=cfg["d_ff"], max_seq_len=cfg["max_seq_len"],
                          dropout=cfg["dropout"])
    guide.load_state_dict(raw["model_state_dict"])
    guide.eval()
    assert max_diff(guide, hf_model, ids(seed=2)) <= 1e-5


@pytest.mark.parametrize("family", ["llama_untied", "qwen2", "qwen3"])
def test_from_hf_llama_qwen_folders_verify_against_their_own_class(family, tmp_path):
    """--from_hf of a Llama/Qwen2/Qwen3 folder checks its logits against that family's
    transformers class (not GPT-2's), tied or untied."""
    import transformers

    kind, extra = {"llama_untied": ("Llama", dict(tie_word_embeddings=False)),
                   "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
                   "qwen3": ("Qwen3", dict(head_dim=12, tie_word_embeddings=True))}[family]
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **extra)
    torch.manual_seed(4)
    hf = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    out = tmp_path / "converted.pt"
    assert convert.main(["--from_hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    model, _ = load_model(out, device="cpu")
    assert model.config.positions == "rope" and model.config.num_kv_heads == 2
    assert max_diff(model, hf, ids()) <= 1e-4
    # and back out as the same family (the GPT-2-only llama.cpp note is not consulted)
    proc = subprocess.run([sys.executable, str(Path(convert.__file__)), "--to_hf",
                           str(tmp_path / "back"), "--checkpoint", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    back = type(hf).from_pretrained(str(tmp_path / "back")).eval()
    assert max_diff(model, back, ids()) <= 1e-4


def test_from_hf_pytorch_bin_in_gpt2model_layout(hf_model, tmp_path):
    """Hub GPT-2 files: pytorch_model.bin, keys without 'transformer.', causal-mask buffers."""
    src = tmp_path / "gpt2-bin"
    src.mkdir()
    hf_model.config.to_json_file(str(src / "config.json"))
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, src / "pytorch_model.bin")
    out = tmp_path / "from_bin.pt"
    assert convert.main(["--from_hf", str(src), "--out", str(out)]) == 0
    model, _ = load_model(out, device="cpu")
    assert max_diff(model, hf_model, ids()) <= 1e-5


def test_from_hf_default_out_and_force(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert.main(["--from_hf", str(hf_dir), "--no_verify"]) == 0
    out = tmp_path / "tiny-gpt2.pt"
    assert out.is_file()
    before = out.read_bytes()
    capsys.readouterr()
    assert convert.main(["--from_hf", str(hf_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before  # untouched
    assert convert.main(["--from_hf", str(hf_dir), "--out", str(out), "--force"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-gpt2.pt"]  # no temporary files left


def test_cli_process_exit_code_and_message(tmp_path):
    """One real `python convert.py` process: exit status and a single stderr line."""
    proc = run_cli("--from_hf", tmp_path / "missing")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"convert.py: error: {tmp_path / 'missing'} is not a folder; --from_hf needs a Hugging "
        "Face model folder"
    ]


# -- ours -> Hugging Face -> ours ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf_tiny"
    assert convert.main(["--to_hf", str(out), "--checkpoint", str(tiny_checkpoint)]) == 0
    return out


def test_round_trip_ours_hf_ours_is_identical(tiny_checkpoint, exported, tmp_path):
    back = tmp_path / "back.pt"
    assert convert.main(["--from_hf", str(exported), "--out", str(back)]) == 0
    a = torch.load(tiny_checkpoint, weights_only=True)
    b = torch.load(back, weights_only=True)
    assert a["model_config"] == b["model_config"]
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key


def test_to_hf_folder_loads_offline_in_transformers(tiny_checkpoint, exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    assert "pytorch_model.bin" not in names
    hf = GPT2LMHeadModel.from_pretrained(str(exported)).eval()
    ours, _ = load_model(tiny_checkpoint, device="cpu")
    assert max_diff(ours, hf, ids()) <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(exported))
    text = "To be, or not to be: that is the question."
    assert tok(text)["input_ids"] == load_tokenizer("gpt2")(text)["input_ids"]
    assert tok.model_max_length == 32  # the model's context, not GPT-2's 1024
    # Hugging Face's generate and ours agree on greedy decoding.
    prompt = torch.tensor([tok(text)["input_ids"][:8]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    with ours:
        mine = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert mine.tolist() == theirs.tolist()


def test_to_hf_refuses_a_non_empty_folder_without_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(convert.ConvertError, match="--force"):
        convert.to_hf(tiny_checkpoint, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert.to_hf(tiny_checkpoint, out, force=True, verify=False)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left


# -- ours -> safetensors ---------------------------------------------------------------------------


def test_to_safetensors_metadata_and_loader(tiny_checkpoint, tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert convert.main(["--to_safetensors", str(out), "--checkpoint", str(tiny_checkpoint)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    original = torch.load(tiny_checkpoint, weights_only=True)
    assert json.loads(meta["model_config"]) == original["model_config"]
    assert "lm_head.weight" not in keys  # tied to the token embedding
    assert keys == set(original["model_state_dict"]) - {"lm_head.weight"}
    loaded, _ = load_model(out, device="cpu")
    ours, _ = load_model(tiny_checkpoint, device="cpu")
    idx = ids()
    with torch.no_grad():
        assert torch.equal(loaded(idx), ours(idx))


# -- errors: one line on stderr, exit 2, no traceback ----------------------------------------------


def _write_hf(folder: Path, config: dict | None, model: GPT2LMHeadModel | None) -> Path:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if model is not None:
        model.save_pretrained(str(folder / "_m"))
        (folder / "_m" / "model.safetensors").rename(folder / "model.safetensors")
    return folder


class _Evil:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_error_cases_are_one_line_exit_2(hf_model, hf_dir, tiny_checkpoint, tmp_path):
    cfg = {**hf_model.config.to_dict(), "model_type": "gpt2"}
    cases: dict[str, tuple[list, str]] = {}

    def case(name, args, expect):
        cases[name] = (args, expect)

    mistral = _write_hf(tmp_path / "mistral", {**cfg, "model_type": "mistral"}, hf_model)
    case("unsupported family", ["--from_hf", mistral], "unsupported model_type 'mistral'")
    llama = _write_hf(tmp_path / "llama", {**cfg, "model_type": "llama"}, hf_model)
    case("gpt2 fields as llama", ["--from_hf", llama], "not a llama config")
    inv = _write_hf(tmp_path / "inv", {**cfg, "scale_attn_by_inverse_layer_idx": True}, hf_model)
    case("inverse layer idx", ["--from_hf", inv], "scale_attn_by_inverse_layer_idx")
    upcast = _write_hf(tmp_path / "upcast", {**cfg, "reorder_and_upcast_attn": True}, hf_model)
    case("reorder and upcast", ["--from_hf", upcast], "reorder_and_upcast_attn")
    case("no weights", ["--from_hf", _write_hf(tmp_path / "now", cfg, None)],
         "no model.safetensors")
    case("no config", ["--from_hf", _write_hf(tmp_path / "noc", None, hf_model)], "no config.json")
    case("bad json", ["--from_hf", _write_hf(tmp_path / "badjson", None, hf_model)],
         "could not read")
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    case("no folder", ["--from_hf", tmp_path / "nope"], "not a folder")
    wide = _write_hf(tmp_path / "wide", {**cfg, "n_embd": 64}, hf_model)
    case("shape mismatch", ["--from_hf", wide], "shape mismatch")
    corrupt = _write_hf(tmp_path / "corrupt", cfg, None)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    case("corrupt safetensors", ["--from_hf", corrupt], "could not read")
    evil = _write_hf(tmp_path / "evil", cfg, None)
    marker = tmp_path / "code_ran"
    torch.save({"wte.weight": _Evil(marker)}, evil / "pytorch_model.bin")
    case("unsafe pickle", ["--from_hf", evil], "refusing to load")
    case("no mode", ["--checkpoint", tiny_checkpoint], "one of the arguments")
    case("two modes", ["--from_hf", hf_dir, "--to_hf", tmp_path / "x"], "not allowed with")
    case("to_hf needs checkpoint", ["--to_hf", tmp_path / "x"], "needs --checkpoint")
    case("out with to_hf", ["--to_hf", tmp_path / "x", "--checkpoint", tiny_checkpoint,
                            "--out", "y"], "--out is for --from_hf")
    case("missing checkpoint", ["--to_safetensors", tmp_path / "x.safetensors", "--checkpoint",
                                tmp_path / "missing.pt"], "checkpoint not found")
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    case("existing output", ["--to_safetensors", tmp_path / "exists.safetensors",
                             "--checkpoint", tiny_checkpoint], "--force")

    assert_usage_errors(REPO / "convert.py", cases, tmp_path)
    assert not marker.exists()  # the malicious pickle never ran
