"""Hugging Face Llama, Qwen2 and Qwen3 models and our `LanguageModel`: configs and weight names.

The three families are one network in our terms: RoPE (plain, `rope_theta`), RMSNorm with a
weight, a SwiGLU MLP, grouped-query attention and no position table. They differ in biases
(Llama: `attention_bias` on q/k/v/o and `mlp_bias`; Qwen2: q/k/v only), QK-norm (Qwen3) and
`head_dim` (Llama and Qwen3 may set it apart from hidden_size / heads). SmolLM2 and TinyLlama
are Llama models; Qwen2.5 is Qwen2.

Weights: Hugging Face keeps q/k/v and gate/up as separate `nn.Linear`s; we keep them fused
(`c_attn` = [q; k; v] rows, `c_fc` = [gate; up] rows), so the mapping concatenates and splits
rows. Both use the rotate-half RoPE layout, so no permutation is needed.

`model/hf_interop.py` dispatches here on `model_type` (configs) or on the weight names (state
dicts), so a folder of any of these families loads through the functions that load GPT-2.
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import LMConfig

FAMILIES = ("llama", "qwen2", "qwen3")
# What each family's config class and model class are called in transformers.
_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
_IGNORED = ("rotary_emb.inv_freq",)  # a buffer that older transformers versions saved


def _rope_theta(c: dict[str, Any]) -> float:
    """`rope_theta` of a config dict (transformers 5's `rope_parameters` or the older top-level
    keys); refuses RoPE scaling, which none of the supported models uses."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    if kind != "default":
        raise ValueError(f"unsupported RoPE scaling {kind!r} (only plain RoPE is implemented)")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def config_from_family(c: dict[str, Any], max_seq_len: int | None = None) -> LMConfig:
    """Our config for a Llama, Qwen2 or Qwen3 config dict.

    Args:
        c: the Hugging Face config as a dict (`config.json`, or `config.to_dict()`).
        max_seq_len: the context to use instead of `max_position_embeddings` (the KV cache
            holds that many positions per row: 32,768 for Qwen is a lot of memory).

    Raises:
        ValueError: another family, or an option this model does not implement (one line).
        KeyError: a required field is missing.
    """
    family = c.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"not a Llama/Qwen2/Qwen3 config (model_type={family!r})")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {c['hidden_act']!r} (this model needs silu)")
    if c.get("use_sliding_window"):
        raise ValueError("unsupported use_sliding_window=True (sliding-window attention)")
    heads = c["num_attention_heads"]
    d_model = c["hidden_size"]
    attention_bias = bool(c.get("attention_bias", False))
    return LMConfig(
        vocab_size=c["vocab_size"], d_model=d_model, num_heads=heads,
        num_layers=c["num_hidden_layers"], d_ff=c["intermediate_size"],
        max_seq_len=max_seq_len or c["max_position_embeddings"], dropout=0.0,
        positions="rope", rope_base=_rope_theta(c), norm="rmsnorm", norm_weight=True,
        norm_eps=c.get("rms_norm_eps", 1e-6), mlp="swiglu",
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or d_model // heads,
        qk_norm=family == "qwen3",
        attn_bias=True if family == "qwen2" else attention_bias,
        attn_out_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(c.get("mlp_bias", False)) if family == "llama" else False,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def family_of(cfg: LMConfig) -> str:
    """The Hugging Face family that represents `cfg` exactly: "llama", "qwen2" or "qwen3".

    Raises:
        ValueError: naming the first setting none of them has (one line).
    """
    needs = {"positions": "rope", "norm": "rmsnorm", "norm_weight": True, "mlp": "swiglu",
             "logit_softcap": None}
    for key, value in needs.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"{key}={getattr(cfg, key)!r} has no Llama/Qwen equivalent "
                             f"(they need {key}={value!r})")
    if cfg.qk_norm:
        if cfg.mlp_bias or cfg.attn_bias != cfg.attn_out_bias:
            raise ValueError("qk_norm with mlp_bias, or with attn_bias != attn_out_bias, has no "
                             "Qwen3 equivalent")
        return "qwen3"
    if cfg.attn_bias and not cfg.attn_out_bias:
        if cfg.mlp_bias or cfg.head_dim * cfg.num_heads != cfg.d_model:
            raise ValueError("q/k/v biases without an output bias (Qwen2) need mlp_bias False "
                             "and head_dim == d_model // num_heads")
        return "qwen2"
    if cfg.attn_bias != cfg.attn_out_bias:
        raise ValueError("attn_out_bias without attn_bias has no Llama/Qwen equivalent")
    return "llama"


def config_to_family(cfg: LMConfig, max_position_embeddings: int | None = None):
    """The transformers config (`LlamaConfig`, `Qwen2Config` or `Qwen3Config`) of `cfg`.

    Raises:
        ValueError: `cfg` has no exact Llama/Qwen equivalent (see `family_of`).
    """
    import transformers

    family = family_of(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, hidden_act="silu",
        max_position_embeddings=max_position_embeddings or cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        attention_dropout=0.0, architectures=[_CLASSES[family][1]],
    )
    if family != "qwen2":
        kwargs.update(head_dim=cfg.head_dim, attention_bias=cfg.attn_bias)
    if family == "llama":
        kwargs["mlp_bias"] = cfg.mlp_bias
    return getattr(transformers, _CLASSES[family][0])(**kwargs)


# (ours, Hugging Face's) per layer, for weights and biases that map one to one.
_LAYER_NAMES = (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                ("attn.c_proj", "self_attn.o_proj"), ("attn.q_norm", "self_attn.q_norm"),
                ("attn.k_norm", "self_attn.k_norm"), ("mlp.c_proj", "mlp.down_proj"))
# fused ours = Hugging Face's parts, concatenated along the output rows
_FUSED = (("attn.c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("mlp.c_fc", ("mlp.gate_proj", "mlp.up_proj")))


def is_family_state_dict(sd: dict[str, Any]) -> bool:
    """Whether `sd` holds Llama/Qwen weight names (`model.embed_tokens.weight`)."""
    return "model.embed_tokens.weight" in sd


def state_dict_from_family(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a `LlamaForCausalLM`/`Qwen2ForCausalLM`/`Qwen3ForCausalLM` one.

    Without `lm_head.weight` (a tied model saved by transformers) the head is `wte`.
    """
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED)}
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    out["lm_head.weight"] = sd.get("lm_head.weight", out["transformer.wte.weight"])
    layer = 0
    while f"model.layers.{layer}.input_layernorm.weight" in sd:
        hf, ours = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for suffix in ("weight", "bias"):
            for our_name, hf_name in _LAYER_NAMES:
                if f"{hf}{hf_name}.{suffix}" in sd:
                    out[f"{ours}{our_name}.{suffix}"] = sd[f"{hf}{hf_name}.{suffix}"]
            for our_name, parts in _FUSED:
                if f"{hf}{parts[0]}.{suffix}" in sd:
                    out[f"{ours}{our_name}.{suffix}"] = torch.cat(
                        [sd[f"{hf}{p}.{suffix}"] for p in parts], dim=0)
        layer += 1
    return out


def state_dict_to_family(sd: dict[str, torch.Tensor], cfg: LMConfig
                         ) -> dict[str, torch.Tensor]:
    """A Llama/Qwen2/Qwen3 `...ForCausalLM` state dict from ours (`lm_head.weight` included,
    the same tensor as the embedding when tied)."""
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = {"attn.c_attn": [q_size, kv_size, kv_size], "mlp.c_fc": [cfg.d_ff, cfg.d_ff]}
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for layer in range(cfg.num_layers):
        hf, ours = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for suffix in ("weight", "bias"):
            for our_name, hf_name in _LAYER_NAMES:
                if f"{ours}{our_name}.{suffix}" in sd:
                    out[f"{hf}{hf_name}.{suffix}"] = sd[f"{ours}{our_name}.{suffix}"]
            for our_name, parts in _FUSED:
                if f"{ours}{our_name}.{suffix}" in sd:
                    pieces = sd[f"{ours}{our_name}.{suffix}"].split(sizes[our_name], dim=0)
                    out.update({f"{hf}{p}.{suffix}": t.contiguous()
                                for p, t in zip(parts, pieces, strict=True)})
    return out
