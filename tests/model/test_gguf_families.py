"""convert.py --to_gguf for Llama, Qwen2 and Qwen3-shaped models (llama.cpp's llama, qwen2, qwen3)
with their own byte-level BPE tokenizers; refusals of what no llama.cpp architecture holds.

Offline: tiny random models built with transformers' own classes, each with a tokenizer trained
here (a different pre-tokenizer per family: Llama 3's, Qwen2's, SmolLM's; the builders are
bench/gguf_families.py's, which records the same comparison), converted with
`convert.py --from_hf`, then exported as f32, f16 and q8_0. The files are read back with the gguf
package; when llama-cpp-python is installed, llama.cpp loads them, tokenizes as our tokenizer
does, and its greedy continuation is compared with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from cli_cases import assert_usage_errors

import convert
from bench.gguf_families import FAMILIES, GREEDY, PROBE, VOCAB, hf_model, train_tokenizer
from model import gguf_export, gguf_vocab
from model.checkpoint import load_model
from model.lm import LanguageModel

# The types checked per family (q4_0 is checked on GPT-2 shapes in test_gguf_export.py).
TYPES = ("f32", "f16", "q8_0")

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict]:
    """family -> {hf, tokenizer, ckpt, f32, f16, q8_0}: converted with --from_hf, exported with
    --to_gguf (f32 through the command line)."""
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for family in FAMILIES:
        folder = root / family
        folder.mkdir()
        tok = train_tokenizer(family, folder)
        hf = hf_model(family)
        hf.save_pretrained(str(folder), safe_serialization=True)
        if family == "qwen2":  # as released models' configs say (their weights are bf16)
            config = json.loads((folder / "config.json").read_text())
            config.update(dtype="bfloat16", torch_dtype="bfloat16")
            (folder / "config.json").write_text(json.dumps(config))
        ckpt = root / f"{family}.pt"
        assert convert.main(["--from_hf", str(folder), "--out", str(ckpt)]) == 0
        out[family] = dict(hf=hf, tokenizer=tok, ckpt=ckpt)
        for outtype in TYPES:  # each read back and checked (verify)
            path = out[family][outtype] = root / f"{family}-{outtype}.gguf"
            if outtype == "f32":
                assert convert.main(["--to_gguf", str(path), "--checkpoint", str(ckpt),
                                     "--outtype", outtype]) == 0
            else:
                convert.to_gguf(ckpt, path, outtype)
    return out


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _adjacent_pairs(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered (0, h, 1, h+1, ...) with h = head_dim / 2: llama.cpp's
    `llama` RoPE rotates adjacent pairs, Hugging Face rotates halves."""
    d = rows.shape[0] // heads
    order = torch.tensor([j // 2 + (j % 2) * (d // 2) for j in range(d)])
    index = (torch.arange(heads)[:, None] * d + order[None, :]).reshape(-1)
    return rows[index]


# -- the files, read back with gguf.GGUFReader -----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_and_tensors_read_back(models, family):
    m = models[family]
    hf, tok = m["hf"], m["tokenizer"]
    c = hf.config
    reader = gguf.GGUFReader(str(m["f32"]))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    expected = {
        "general.architecture": family, f"{family}.context_length": 128,
        f"{family}.embedding_length": 64, f"{family}.feed_forward_length": 96,
        f"{family}.block_count": 2, f"{family}.attention.head_count": 4,
        f"{family}.attention.head_count_kv": c.num_key_value_heads,
        f"{family}.attention.key_length": head_dim, f"{family}.attention.value_length": head_dim,
        f"{family}.rope.dimension_count": head_dim, f"{family}.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": FAMILIES[family][4],
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.add_bos_token": family == "llama",
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, f"{family}.rope.freq_base") == 10000.0
    assert abs(_field(reader, f"{family}.attention.layer_norm_rms_epsilon") - 1e-6) < 1e-12
    # The tokenizer's own vocabulary and merges, by id; ids past it are unused padding.
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader,
                                                                      "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    for text, i in tok.get_vocab().items():
        assert tokens[i] == text
        special = text in tok.all_special_tokens or text.startswith("<|")
        assert types[i] == (gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL), text
    assert (set(types[len(tok):]) == {gguf.TokenType.UNUSED}) == (len(tok) < VOCAB)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(spec["model"]["merges"])
    # Tensors: llama.cpp's names, Hugging Face's values (q/k rows in adjacent pairs for llama).
    stored = {t.name: t for t in reader.tensors}
    cfg = load_model(m["ckpt"], device="cpu")[0].config
    assert set(stored) == set(gguf_export.expected_tensors(cfg))
    assert ("output.weight" in stored) == (not c.tie_word_embeddings)
    assert ("blk.0.attn_q_norm.weight" in stored) == (family == "qwen3")
    assert ("blk.1.attn_k.bias" in stored) == (family != "qwen3")
    assert "blk.0.attn_output.bias" in stored if family == "llama" else \
        "blk.0.attn_output.bias" not in stored

    def value(name):
        t = stored[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                         dtype=np.float32))

    sd = hf.state_dict()
    assert torch.equal(value("token_embd.weight"), sd["model.embed_tokens.weight"])
    for part, name in (("q", "attn_q"), ("k", "attn_k")):
        heads = c.num_attention_heads if part == "q" else c.num_key_value_heads
        for kind in ("weight", "bias") if family != "qwen3" else ("weight",):
            want = sd[f"model.layers.1.self_attn.{part}_proj.{kind}"]
            if family == "llama":
                want = _adjacent_pairs(want, heads)
            assert torch.equal(value(f"blk.1.{name}.{kind}"), want), (name, kind)
    assert torch.equal(value("blk.0.ffn_gate.weight"), sd["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(value("blk.0.attn_v.weight"), sd["model.layers.0.self_attn.v_proj.weight"])
    if family == "qwen3":
        assert torch.equal(value("blk.1.attn_k_norm.weight"),
                           sd["model.layers.1.self_attn.k_norm.weight"])
    f16 = {t.name: t for t in gguf.GGUFReader(str(m["f16"])).tensors}
    assert f16["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert f16["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # q8_0: every matrix quantized, within its rounding; norms and biases stay f32.
    q8 = {t.name: t for t in gguf.GGUFReader(str(m["q8_0"])).tensors}
    assert q8["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got = torch.from_numpy(np.array(gguf.quants.dequantize(q8["token_embd.weight"].data,
                                                           gguf.GGMLQuantizationType.Q8_0)))
    blocks = sd["model.embed_tokens.weight"].reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    assert ((got.reshape(-1, 32) - blocks).abs() <= 0.57 * d + 1e-9).all()


def test_pre_tokenizer_names_and_refusals():
    def spec(pre, *, ignore_merges=False, normalizer=None, decoder="ByteLevel", **model):
        return {"model": {"type": "BPE", "ignore_merges": ignore_merges, **model},
                "normalizer": normalizer, "pre_tokenizer": pre, "decoder": {"type": decoder}}

    def byte_level(use_regex=True, prefix=False):
        return {"type": "ByteLevel", "use_regex": use_regex, "add_prefix_space": prefix}

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
             "invert": False}, byte_level(use_regex=False)]}

    name = gguf_vocab.pre_tokenizer_name
    assert name(spec(byte_level())) == "gpt-2"
    assert name(spec(split(gguf_vocab.GPT2_REGEX))) == "gpt-2"
    assert name(spec({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level()]})) == "smollm"
    assert name(spec(split(gguf_vocab.QWEN2_REGEX), normalizer={"type": "NFC"})) == "qwen2"
    assert name(spec(split(gguf_vocab.LLAMA3_REGEX), ignore_merges=True)) == "llama-bpe"
    refused = {
        "not one llama.cpp knows": spec(split(r"\w+|\s+")),
        "Whitespace": spec({"type": "Whitespace"}),
        "a space before every text": spec(byte_level(prefix=True)),
        "ignore_merges=False": spec(split(gguf_vocab.LLAMA3_REGEX)),
        "ignore_merges=True": spec(byte_level(), ignore_merges=True),
        "normalizes text (Lowercase)": spec(byte_level(), normalizer={"type": "Lowercase"}),
        "byte fallback": spec(byte_level(), byte_fallback=True),
        "decoder is not byte-level": spec(byte_level(), decoder="Metaspace"),
    }
    for expect, bad in refused.items():
        with pytest.raises(gguf_vocab.GGUFExportError) as info:
            name(bad)
        message = str(info.value)
        assert "\n" not in message and expect in message, message


# -- what no llama.cpp architecture holds: one line, exit 2, no file -------------------------------


def test_unrepresentable_models_are_refused(models, tmp_path):
    base = dict(vocab_size=VOCAB, d_model=64, num_heads=4, num_layers=1, d_ff=96,
                max_seq_len=32, dropout=0.0)
    rope = dict(positions="rope", norm="rmsnorm", mlp="swiglu")
    cases = {
        "relu2 with rope": (dict(rope, mlp="relu2"), "mlp='relu2'"),
        "gelu with rope": (dict(rope, mlp="gelu"), "mlp='gelu'"),
        "layernorm with rope": (dict(rope, norm="layernorm"), "norm='layernorm'"),
        "soft-cap": (dict(rope, logit_softcap=30.0), "logit_softcap=30.0"),
        "norm without weight": (dict(rope, norm_weight=False), "norm_weight=False"),
        "learned with rmsnorm": (dict(norm="rmsnorm"), "learned positions"),
        "learned with gqa": (dict(num_kv_heads=2), "num_kv_heads=2"),
        "qwen3 with biases": (dict(rope, qk_norm=True, attn_bias=True, attn_out_bias=True,
                                   mlp_bias=False), "qwen3 has no output-projection bias"),
    }
    argv = {}
    for name, (arch, _) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        model = LanguageModel(**base, **arch)
        torch.save({"model_config": model.config.to_dict(),
                    "model_state_dict": model.state_dict(), "tokenizer": "gpt2"}, path)
        argv[name] = path
    # A tokenizer whose pre-tokenizer llama.cpp does not have (whitespace words).
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PROBE], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="!").save_pretrained(
        str(tmp_path / "tok"))
    raw = torch.load(models["llama"]["ckpt"], weights_only=True)
    other = tmp_path / "other_tok.pt"
    torch.save({**raw, "tokenizer": str(tmp_path / "tok")}, other)
    out = tmp_path / "out.gguf"
    usage = {name: (["--to_gguf", out, "--checkpoint", argv[name]], expect)
             for name, (_, expect) in cases.items()}
    usage["unknown pre-tokenizer"] = (["--to_gguf", out, "--checkpoint", other],
                                      "is not one llama.cpp knows")
    # --from_hf takes a hub name: offline and not in the (empty) cache, one line saying how.
    usage["hub name offline"] = (["--from_hf", "HuggingFaceTB/SmolLM2-135M", "--out",
                                  tmp_path / "smol.pt"], "huggingface-cli download")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_usage_errors(REPO / "convert.py", usage, tmp_path, HF_HOME=str(tmp_path / "hf-home"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file


# -- llama.cpp loads the files: same tokens, same greedy continuation ------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (CI installs it: .ci/run)")


# Largest logit difference allowed along the prompt and our 50 greedy tokens (logits up to about
# 35 here; bench/results/gguf_families_cpu_2core.txt has the measured ones), with llama.cpp's KV
# cache in f32. f32 differs from ours only in summation order; f16 rounds the weights; q8_0 rounds
# the weights and, in llama.cpp's matrix products, the activations to 8 bits too.
LOGIT_TOL = {"f32": 1e-3, "f16": 0.1, "q8_0": 0.75}


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == n:
            break
    return got


@pytest.mark.parametrize("outtype", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_and_continues_as_we_do(models, llama_cpp, family, outtype):
    """f32: llama.cpp's greedy continuation is ours, all 50 tokens. f16 rounds the weights and
    q8_0 the weights and activations, so their greedy paths may legitimately leave ours where
    our top two logits are close; compared instead: their logits along our path (prompt + our
    50 tokens) within the tolerance, their top token equal to ours at every step whose margin
    exceeds twice that, and their own greedy continuation equal to ours up to the first step
    that does not."""
    m = models[family]
    model, _ = load_model(m["ckpt"], device="cpu")
    model.end_token = None  # llama.cpp's generate runs past end-of-text too
    tok = m["tokenizer"]
    f32_kv = 0  # GGML_TYPE_F32: an exact KV cache (llama.cpp's default is f16)
    llm = llama_cpp.Llama(model_path=str(m[outtype]), n_ctx=128, n_threads=1, logits_all=True,
                          verbose=False, seed=0, type_k=f32_kv, type_v=f32_kv)
    try:
        prompt = tok.encode(PROBE)  # as our tools encode a prompt (BOS for the llama tokenizer)
        # add_bos=True: the special tokens the file says prompts get (BOS for llama only)
        assert llm.tokenize(PROBE.encode(), add_bos=True, special=False) == prompt
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == str(family == "llama").lower()
        assert llm.token_eos() == tok.eos_token_id
        path = model.generate(prompt, max_new_tokens=GREEDY, temperature=0)[0].tolist()
        mine = path[len(prompt):]
        assert len(set(mine)) > 5  # a real continuation, not one token repeated
        llm.reset()
        llm.eval(path)
        theirs = torch.from_numpy(np.array(llm.scores[:len(path)], dtype=np.float32))
        got = _greedy(llm, prompt, GREEDY)
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([path]))[0]
    assert (theirs - ours).abs().max() <= LOGIT_TOL[outtype]
    if outtype == "f32":
        assert got == mine
        return
    steps = slice(len(prompt) - 1, len(path) - 1)  # the logits that chose our 50 tokens
    top2 = ours[steps].topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOL[outtype]
    assert clear.sum() >= GREEDY // 3  # the comparison below is not vacuous
    assert torch.equal(theirs[steps].argmax(1)[clear], torch.tensor(mine)[clear])
    agree_to = int((~clear).nonzero()[0]) if (~clear).any() else GREEDY
    assert got[:agree_to] == mine[:agree_to]


def test_gpt2_blocks_with_their_own_tokenizer(models, tmp_path):
    """A GPT-2-block model trained with another tokenizer (here the qwen3 test's SmolLM-style
    one) exports as llama.cpp's gpt2 with that tokenizer, not GPT-2's."""
    torch.manual_seed(3)
    model = LanguageModel(vocab_size=VOCAB, d_model=64, num_heads=4, num_layers=1, d_ff=128,
                          max_seq_len=128, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.3 * torch.randn_like(p))
    ckpt = tmp_path / "gpt2-blocks.pt"
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": str(models["qwen3"]["ckpt"].parent / "qwen3")}, ckpt)
    out = convert.to_gguf(ckpt, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(out))
    tok = models["qwen3"]["tokenizer"]
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.tokens")[:len(tok)] == \
        tok.convert_ids_to_tokens(list(range(len(tok))))
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    try:
        prompt = tok.encode(PROBE)
        assert llm.tokenize(PROBE.encode(), add_bos=True, special=False) == prompt
        llm.eval(prompt)
        theirs = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    # llama.cpp's gpt2 reads GELU from an f16 table (see test_gguf_export.py's tolerance)
    assert (theirs - ours).abs().max() <= 1e-2


def test_the_bundled_gpt2_tokenizer_object_is_gpt2s_vocabulary():
    """The loaded bundled GPT-2 tokenizer (a slow one, no tokenizer.json) exports as GPT-2's
    files do, so a caller may pass the checkpoint's tokenizer object whatever it is; and GPT-2's
    fast tokenizer, read through its tokenizer.json, gives the same vocabulary."""
    from model.tokenizer import load_tokenizer

    vocab = gguf_vocab.tokenizer_vocab(load_tokenizer("gpt2"), 50304)
    assert vocab == gguf_vocab.gpt2_vocab(50304)
    assert vocab.pre == "gpt-2" and vocab.bos_id == vocab.eos_id == 50256 and not vocab.add_bos
    # The generic path (tokenizer.json) reads GPT-2's fast tokenizer as the same vocabulary.
    from transformers import GPT2TokenizerFast

    from model.tokenizer import BUNDLED_GPT2_DIR

    fast = GPT2TokenizerFast.from_pretrained(str(BUNDLED_GPT2_DIR))
    assert fast.backend_tokenizer is not None
    assert gguf_vocab.tokenizer_vocab(fast, 50304) == vocab
