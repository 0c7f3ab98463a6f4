"""Architectures beyond GPT-2 (`LMConfig`'s architecture fields) and the Hugging Face families
that use them (Llama, Qwen2, Qwen3; `model/hf_families.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from model.hf_interop import (
    config_from_hf,
    config_to_hf,
    read_hf_checkpoint,
    state_dict_to_hf,
)
from model.lm import LanguageModel, LMConfig
from training.fused_loss import TrainingModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost here

V = 97
SMALL = dict(vocab_size=V, d_model=32, num_heads=4, num_layers=2, d_ff=48, max_seq_len=16,
             dropout=0.0)
LLAMA_LIKE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", attn_bias=False,
                  attn_out_bias=False, mlp_bias=False)
OPTIONS = {
    "rope": dict(positions="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "rmsnorm_no_weight": dict(norm="rmsnorm", norm_weight=False),
    "layernorm_no_weight": dict(norm_weight=False, norm_eps=1e-6),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "head_dim": dict(head_dim=12),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=3.0),
    "no_biases": dict(attn_bias=False, attn_out_bias=False, mlp_bias=False),
    "llama": dict(LLAMA_LIKE, num_kv_heads=2, tie_embeddings=False, rope_base=500.0),
    "qwen3": dict(LLAMA_LIKE, num_kv_heads=2, qk_norm=True, head_dim=12),
    "everything": dict(LLAMA_LIKE, norm_weight=False, mlp="relu2", num_kv_heads=1,
                       qk_norm=True, head_dim=10, tie_embeddings=False, logit_softcap=5.0,
                       attn_bias=True),
}


def _model(seed: int = 0, **arch) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(**SMALL, **arch).eval()
    with torch.no_grad():  # norms away from their init, so a dropped weight would show
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.lm_head.weight.mul_(10)  # logits of about +-1: a soft-cap makes a difference
    return model


# -- each option alone and combined ----------------------------------------------------------


@pytest.mark.parametrize("name", OPTIONS)
def test_training_steps_reduce_the_loss(name):
    """The trainer's fused LM-head loss (untied head, soft-cap) equals the model's own loss,
    and a few AdamW steps on one batch reduce it."""
    model = _model(**OPTIONS[name]).train()
    torch.manual_seed(1)
    idx = torch.randint(0, V, (4, SMALL["max_seq_len"]))
    targets = torch.roll(idx, -1, dims=1)
    fused = TrainingModule(model)
    assert torch.allclose(fused(idx, targets), model(idx, targets)[1], atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = fused(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", OPTIONS)
def test_cached_decode_equals_full_forward(name):
    model = _model(**OPTIONS[name])
    torch.manual_seed(2)
    ids = torch.randint(0, V, (2, 12))
    with model, torch.no_grad():
        model.setup_cache(2)
        model.forward_cached(ids[:, :5], input_pos=0)
        for t in range(5, 12):
            step = model.forward_cached(ids[:, t:t + 1], input_pos=t)[:, -1]
            full = model(ids[:, :t + 1])[:, -1]
            assert torch.allclose(step, full, atol=1e-5), t


@pytest.mark.parametrize("name", OPTIONS)
def test_ragged_batch_equals_rows_alone_past_the_window(name):
    """Rows of different lengths (masked per-row positions) decode as alone, past the context."""
    model = _model(**OPTIONS[name])
    torch.manual_seed(3)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 9, 1)]
    alone = [model.generate(p, max_new_tokens=30, temperature=0)[0].tolist() for p in prompts]
    batch = model.generate(prompts, max_new_tokens=30, temperature=0)
    for row, expected in zip(batch.tolist(), alone, strict=True):
        assert row[:len(expected)] == expected


def _window_reference(model: LanguageModel, prompt: torch.Tensor, n_new: int) -> list[int]:
    """Greedy tokens by full forward passes over the context that model/generation.py's
    sliding window documents: the last keep + (L - W - 1) % (W - keep + 1) tokens past W."""
    W = model.max_seq_len
    keep = W - W // 4
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(n_new):
            L = len(ids)
            n = L if L <= W else keep + (L - W - 1) % (W - keep + 1)
            logits = model(torch.tensor([ids[-n:]]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids


@pytest.mark.parametrize("name", OPTIONS)
def test_generation_past_max_seq_len(name):
    model = _model(**OPTIONS[name])
    prompt = torch.randint(0, V, (5,), generator=torch.Generator().manual_seed(4))
    got = model.generate(prompt, max_new_tokens=40, temperature=0)[0].tolist()
    assert got == _window_reference(model, prompt, 40)


@pytest.mark.parametrize("name", ["rope", "mqa", "llama", "qwen3", "everything"])
def test_static_decode_step_equals_eager(name, monkeypatch):
    """generate(compile=True)'s static-shape step (whole cache, masked, per-row positions), run
    eagerly here, decodes as the eager path does."""
    model = _model(**OPTIONS[name])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    rows = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
            for n in (3, 9, 5)]
    eager = model.generate(rows, max_new_tokens=30, temperature=0)
    static = model.generate(rows, max_new_tokens=30, temperature=0, compile=True)
    assert torch.equal(eager, static)


def test_compiled_cpu_decode_step_equals_eager():
    """generate(compile=True) through Inductor for real (the packed weight products as an
    opaque op, a bucket of the cache attended): the greedy tokens of eager decoding for ragged
    rows past the context, logits within 1e-5; and after the weights change in place, the
    compiled step uses the new weights."""
    from model.engine import attention_width

    assert [attention_width(n, 2048, torch.device("cpu")) for n in (1, 128, 129, 3000)] == [
        128, 128, 256, 2048]
    assert attention_width(5, 2048, torch.device("cuda")) == 2048
    model = _model(**OPTIONS["qwen3"])
    rows = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
            for n in (3, 9, 5)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # oneDNN's packed copies (model/quant.py) are made with 2+ threads
    try:
        for _ in range(2):
            # compiled first: after the weights change, nothing eager has remade the copies
            compiled, c_lp = model.generate(rows, max_new_tokens=24, temperature=0, compile=True,
                                            return_logprobs=True)
            eager, e_lp = model.generate(rows, max_new_tokens=24, temperature=0,
                                         return_logprobs=True)
            assert torch.equal(eager, compiled)
            assert torch.allclose(e_lp.raw_logprobs, c_lp.raw_logprobs, atol=1e-5, equal_nan=True)
            assert model.lm_head.packed or not torch.backends.mkldnn.is_available()
            with torch.no_grad():  # the second round: other weights, the same compiled function
                model.lm_head.weight.mul_(-1.5)
                model.transformer.h[0].mlp.c_fc.weight.add_(0.5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_half_precision_decode_attention_equals_sdpa(kv_heads):
    """The bf16 decode attention (two matmuls, float32 softmax; model/lm.py) against float32
    SDPA on the same values: ragged masks and grouped key/value heads."""
    from model.lm import _decode_attention

    g = torch.Generator().manual_seed(5)
    B, H, S, D = 3, 4, 300, 16
    q, k, v = (torch.randn(B, n, t, D, generator=g).bfloat16()
               for n, t in ((H, 1), (kv_heads, S), (kv_heads, S)))
    lengths = torch.tensor([300, 17, 1])
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    for m in (mask, None):
        got = _decode_attention(q, k, v, m).float()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=kv_heads != H)
        assert got.shape == (B, H, 1, D)
        assert torch.allclose(got, ref, atol=2e-2), (got - ref).abs().max()


@pytest.mark.parametrize("name", ["llama", "everything"])
def test_bf16_model_decodes_alike_with_either_attention(name, monkeypatch):
    """A model cast to bf16 gives step logits within bf16's rounding of each other whichever
    decode attention runs (the matmuls above a batch's key count, SDPA below it), and of the
    float32 model's; rows at different lengths (the engine's mask) included."""
    from model import lm

    ref = _model(**OPTIONS[name])
    half = _model(**OPTIONS[name]).to(torch.bfloat16)
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([5, 8, 3])  # each row's cached prefix, then one token per step

    def steps(model: LanguageModel) -> torch.Tensor:
        out = []
        with model, torch.no_grad():
            model.setup_cache(3)
            model.forward_cached(ids[:, :8], input_pos=0)
            for t in range(4):
                pos = lengths + t
                mask = (torch.arange(12)[None, :] <= pos[:, None])[:, None, None]
                tok = ids[torch.arange(3), pos][:, None]
                out.append(model.forward_cached(tok, input_pos=pos, position_ids=pos[:, None],
                                                attn_mask=mask)[:, -1].float())
        return torch.stack(out)

    expected = steps(ref)
    got = {}
    for threshold in (0, 10**9):
        monkeypatch.setattr(lm, "_DECODE_ATTENTION_MIN_KEYS", threshold)
        got[threshold] = steps(half)
    scale = expected.abs().max()
    for logits in got.values():
        assert (logits - expected).abs().max() < 0.05 * scale
    assert (got[0] - got[10**9]).abs().max() < 0.05 * scale


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_quantized_decode_runs(fmt):
    model = _model(**OPTIONS["everything"])
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(5))
    model.quantize(fmt)
    assert model.generate(prompt, max_new_tokens=20, temperature=0).shape == (2, 26)


# -- config ----------------------------------------------------------------------------------

GPT2_KEYS_ONE_LAYER = [
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight",
]


def test_gpt2_default_state_dict_keys_unchanged():
    model = LanguageModel(**{**SMALL, "num_layers": 1})
    sd = model.state_dict()
    assert list(sd) == GPT2_KEYS_ONE_LAYER
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (3 * 32, 32)
    assert not list(model.buffers())


def test_old_checkpoint_dict_loads_as_gpt2():
    old = dict(vocab_size=V, d_model=32, num_heads=4, num_layers=1, d_ff=48, max_seq_len=16,
               dropout=0.1)
    cfg = LMConfig.from_dict(old)
    assert cfg == LMConfig(**old)
    assert cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 8 and cfg.tie_embeddings
    assert cfg.logit_softcap is None and cfg.attn_bias and cfg.mlp_bias
    assert list(LanguageModel.from_config(old).state_dict()) == GPT2_KEYS_ONE_LAYER
    with pytest.raises(ValueError, match=r"unknown \['rope_theta'\]"):
        LMConfig.from_dict({**old, "rope_theta": 1.0})
    with pytest.raises(ValueError, match=r"missing \['d_ff'\]"):
        LMConfig.from_dict({k: v for k, v in old.items() if k != "d_ff"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(positions="alibi"), "positions must be one of learned, rope"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(rope_base=-1.0), "rope_base"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(qk_norm=1), "qk_norm must be True or False"),
    (dict(positions="rope", head_dim=7), "even head_dim"),
    (dict(d_model=30), "divisible by num_heads"),
])
def test_bad_architecture_is_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LMConfig(**{**SMALL, **kwargs})
    assert "\n" not in str(info.value)


def test_head_dim_lifts_the_divisibility_rule():
    cfg = LMConfig(**{**SMALL, "d_model": 30, "head_dim": 16})
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    model = LanguageModel.from_config(cfg)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 4 * 16, 30)


# -- Hugging Face families -------------------------------------------------------------------

FAMILIES = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_gqa_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_biases": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qk_norm_head_dim": ("Qwen3Config", "Qwen3ForCausalLM",
                               dict(num_key_value_heads=1, head_dim=24)),
}


def _hf_model(name: str):
    config_cls, model_cls, extra = FAMILIES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, **extra)
    torch.manual_seed(6)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # every weight (norms and biases too) away from its init
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_family_logits_generation_and_round_trip(name):
    hf = _hf_model(name)
    ours = LanguageModel.from_hf_gpt2(hf).eval()
    cfg = ours.config
    assert cfg.positions == "rope" and cfg.rope_base == 1000.0 and cfg.norm == "rmsnorm"
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.std() > 0.1
    assert (got - expected).abs().max() < 1e-4
    # greedy decoding through our KV cache, against transformers' own generate
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                pad_token_id=0)
    assert ours.generate(ids[:1], max_new_tokens=10, temperature=0).tolist() == \
        hf_tokens.tolist()
    # ours -> Hugging Face: the same class, config fields and weights
    back_cfg = config_to_hf(cfg)
    assert type(back_cfg) is type(hf.config)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "num_hidden_layers", "tie_word_embeddings",
                "rms_norm_eps", "max_position_embeddings", "head_dim", "attention_bias"):
        assert getattr(back_cfg, key, None) == getattr(hf.config, key, None), key
    assert config_from_hf(back_cfg) == cfg
    back = type(hf)(back_cfg).eval()
    back.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=True)
    sd_hf, sd_back = hf.state_dict(), back.state_dict()
    assert sorted(sd_hf) == sorted(sd_back)
    assert all(torch.equal(sd_hf[k], sd_back[k]) for k in sd_hf)


def test_hf_family_folder_loads_through_the_gpt2_loaders(tmp_path):
    hf = _hf_model("qwen3_qk_norm_head_dim")
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    ckpt = read_hf_checkpoint(tmp_path)
    assert ckpt["model_config"]["qk_norm"] and ckpt["model_config"]["head_dim"] == 24
    model = LanguageModel.from_hf_gpt2(tmp_path)
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_unrepresentable_and_unsupported_are_one_line_errors():
    with pytest.raises(ValueError, match="logit_softcap=5.0 has no Llama/Qwen equivalent"):
        config_to_hf(LMConfig(**SMALL, **LLAMA_LIKE, logit_softcap=5.0))
    with pytest.raises(ValueError, match="learned positions"):
        config_to_hf(LMConfig(**SMALL, norm="rmsnorm"))
    with pytest.raises(ValueError, match=r"unsupported model_type 'mistral' \(supported: gpt2"):
        config_from_hf({"model_type": "mistral"})
    hf_cfg = _hf_model("llama_gqa_tied").config.to_dict()
    hf_cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 1.0, "factor": 8.0}
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'llama3'"):
        config_from_hf(hf_cfg)
    assert config_to_hf(LMConfig(**SMALL)).model_type == "gpt2"


def _save_checkpoint(path, model: LanguageModel):
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": "gpt2"}, path)
    return path


def test_convert_to_hf_and_back(tmp_path):
    """convert.py --to_hf writes a Llama folder for a Llama-like checkpoint (verified against
    transformers' logits), which loads back as the same model; GGUF takes it as llama.cpp's qwen3
    and refuses, in one line, a model no llama.cpp architecture holds."""
    import convert
    from model.gguf_export import GGUFExportError, check_exportable

    model = _model(**OPTIONS["qwen3"])
    ckpt = _save_checkpoint(tmp_path / "qwen3.pt", model)
    out = convert.to_hf(ckpt, tmp_path / "hf")
    back = LanguageModel.from_hf_gpt2(out)
    assert back.config == model.config
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # both in evaluation mode: the same attention kernel
        model.eval(), back.eval()
        assert torch.equal(back(ids), model(ids))
    assert check_exportable(model.config, model.state_dict(), "f32") == "qwen3"
    everything = _model(**OPTIONS["everything"])
    with pytest.raises(GGUFExportError, match="no llama.cpp architecture holds this model"):
        check_exportable(everything.config, everything.state_dict(), "f32")


def test_train_lm_init_from_a_qwen3_folder_keeps_its_architecture(tmp_path, monkeypatch):
    """train_lm.py --init_from a Qwen3 folder trains a Qwen3-shaped model (the architecture
    fields come from the source), starting from its exact weights."""
    import shutil

    from train_helpers import write_text

    from model.hf_interop import state_dict_from_hf
    from model.tokenizer import BUNDLED_GPT2_DIR
    from training import train_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.Qwen3Config(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=32,
        tie_word_embeddings=True)
    torch.manual_seed(10)
    hf = transformers.Qwen3ForCausalLM(config)
    folder = tmp_path / "tiny-qwen3"
    hf.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(BUNDLED_GPT2_DIR / name, folder / name)
    write_text(tmp_path / "train.txt", 2000, seed=1)
    write_text(tmp_path / "val.txt", 400, seed=2)
    out = tmp_path / "ft"
    assert train_lm.main([
        "--train_file", str(tmp_path / "train.txt"), "--val_file", str(tmp_path / "val.txt"),
        "--out_dir", str(out), "--batch_size", "2", "--eval_windows", "2", "--dropout", "0",
        "--dtype", "float32", "--no_plot", "--init_from", str(folder), "--lr", "0",
        "--max_steps", "1", "--eval_interval", "1"]) == 0
    snap = torch.load(out / "snapshots" / "latest.pt", weights_only=True)
    cfg = LMConfig.from_dict(snap["model_config"])
    assert cfg == config_from_hf(config)
    expected = state_dict_from_hf(hf.state_dict())
    assert set(snap["model_state_dict"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(snap["model_state_dict"][key], value), key


@pytest.mark.parametrize("fused", [True, False])
def test_unseen_tokens_with_an_untied_soft_capped_head(fused):
    """--unseen_tokens shared: the training loss and the validation loss of an untied,
    soft-capped model equal the full softmax's."""
    import numpy as np

    from training.evaluation import evaluate_tokens
    from training.unseen_tokens import UnseenTokens

    seen = np.zeros(V, dtype=bool)
    seen[np.random.RandomState(0).choice(V, 30, replace=False)] = True
    unseen = UnseenTokens(seen)
    model = _model(**OPTIONS["everything"])
    unseen.equalize(model.lm_head.weight)
    seen_ids = torch.from_numpy(np.flatnonzero(seen))
    # training text holds seen tokens only (an unseen target's loss would differ by log U)
    idx = seen_ids[torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(11))]
    targets = torch.roll(idx, -1, dims=1)
    shared = TrainingModule(model, fused_head=fused, unseen=unseen)(idx, targets)
    assert shared.item() == pytest.approx(model(idx, targets)[1].item(), rel=1e-5)
    val = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(12))
    full = evaluate_tokens(model, val, seq_len=16, batch_size=4)
    fast = evaluate_tokens(model, val, seq_len=16, batch_size=4, unseen=unseen)
    assert fast.loss == pytest.approx(full.loss, rel=1e-5)


def test_load_with_a_shorter_context():
    hf = _hf_model("qwen2_biases")
    model = LanguageModel.from_hf_gpt2(hf, max_seq_len=24)
    assert model.config.max_seq_len == 24 and model.rope_cos.shape == (24, 8)
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        LanguageModel.from_hf_gpt2(hf, max_seq_len=65)


def test_checkpoint_loader_checks_the_architecture(tmp_path):
    """An untied checkpoint must hold its head; an absurd head_dim is refused before any
    allocation; a RoPE checkpoint loads back as itself."""
    from model.checkpoint import CheckpointError, load_model

    model = _model(**OPTIONS["llama"])
    path = _save_checkpoint(tmp_path / "llama.pt", model)
    loaded, _ = load_model(path, device="cpu")
    assert loaded.config == model.config
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    import convert

    exported, _ = load_model(convert.to_safetensors(path, tmp_path / "llama.safetensors"),
                             device="cpu")  # the untied head is kept
    assert torch.equal(exported.lm_head.weight, model.lm_head.weight)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_state_dict"]["lm_head.weight"]
    torch.save(ckpt, tmp_path / "headless.pt")
    with pytest.raises(CheckpointError, match="no lm_head.weight, and model_config says"):
        load_model(tmp_path / "headless.pt", device="cpu")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["head_dim"] = 2**40
    torch.save(ckpt, tmp_path / "absurd.pt")
    with pytest.raises(CheckpointError, match="asks for head_dim 1,099,511,627,776"):
        load_model(tmp_path / "absurd.pt", device="cpu")


def test_scripts_load_a_hugging_face_folder_directly(tmp_path):
    """`--checkpoint` of generate_lm.py / serve_lm.py / evaluate_lm.py takes a Llama, Qwen2 or
    Qwen3 folder as it is (the one loader, `model.loading.load_for_inference`)."""
    import shutil
    import subprocess
    import sys

    from model.loading import load_for_inference
    from model.tokenizer import BUNDLED_GPT2_DIR

    config = transformers.Qwen2Config(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)
    torch.manual_seed(11)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    folder = tmp_path / "tiny-qwen2"
    hf.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(BUNDLED_GPT2_DIR / name, folder / name)
    loaded = load_for_inference(folder, device="cpu")
    assert loaded.model.config.num_kv_heads == 2 and loaded.model.config.attn_bias
    ids = torch.randint(0, 50257, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (loaded.model(ids) - hf(ids).logits).abs().max() < 1e-4
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    repo = Path(__file__).resolve().parents[2]
    gen = subprocess.run([sys.executable, str(repo / "generate_lm.py"), "--checkpoint",
                          str(folder), "--prompt", "Hello", "--max_length", "6", "--seed", "0"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Hello") and f"loaded {folder}" in gen.stderr
    ev = subprocess.run([sys.executable, str(repo / "evaluate_lm.py"), "--checkpoint",
                         str(folder), "--file", str(text)],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert "perplexity" in ev.stdout
