"""Mapping between our `LanguageModel` and Hugging Face's `GPT2LMHeadModel`.

The networks are the same; the differences are names of config fields and the layout of the
projection weights: Hugging Face stores them in `Conv1D` modules as (in, out), we use
`nn.Linear` with (out, in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.lm import LanguageModel, LMConfig

# Weights that Hugging Face keeps as Conv1D (in, out) and we keep as Linear (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf_config: Any) -> LMConfig:
    """Our config for a `transformers.GPT2Config` (or its dict).

    Raises:
        ValueError: if the config is not GPT-2, or uses an option this model does not implement.
    """
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if c.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"not a GPT-2 config (model_type={c.get('model_type')!r})")
    unsupported = {
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "scale_attn_weights": True, "tie_word_embeddings": True,
    }
    for key, ours in unsupported.items():
        if key in c and bool(c[key]) != ours:
            raise ValueError(f"unsupported GPT-2 option {key}={c[key]!r} (this model needs {ours})")
    if c.get("activation_function", "gelu_new") not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported activation_function {c['activation_function']!r} (needs gelu_new)"
        )
    eps = c.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"unsupported layer_norm_epsilon {eps} (this model uses 1e-5)")
    d_model = c["n_embd"]
    return LMConfig(
        vocab_size=c["vocab_size"], d_model=d_model, num_heads=c["n_head"],
        num_layers=c["n_layer"], d_ff=c.get("n_inner") or 4 * d_model,
        max_seq_len=c["n_positions"], dropout=c.get("resid_pdrop", 0.1),
    )


def config_to_hf(cfg: LMConfig):
    """A `transformers.GPT2Config` describing the same network as `cfg`."""
    from transformers import GPT2Config

    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when it exists
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=True, architectures=["GPT2LMHeadModel"],
    )


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a `GPT2LMHeadModel` (or `GPT2Model`) state dict."""
    out = {}
    for key, value in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        out[name] = value.t().contiguous() if name.endswith(_TRANSPOSED) else value
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `GPT2LMHeadModel` state dict from ours (lm_head kept: it is tied to wte)."""
    return {k: (v.t().contiguous() if k.endswith(_TRANSPOSED) else v) for k, v in sd.items()
            if not k.startswith("_")}


def load_hf_gpt2(model_or_dir: Any) -> LanguageModel:
    """Convert a `GPT2LMHeadModel` instance, or a local folder holding one, to a `LanguageModel`."""
    if isinstance(model_or_dir, (str, Path)):
        from transformers import GPT2LMHeadModel

        path = Path(model_or_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"no config.json in {path}: not a Hugging Face model folder")
        model_or_dir = GPT2LMHeadModel.from_pretrained(str(path))
    cfg = config_from_hf(model_or_dir.config)
    model = LanguageModel.from_config(cfg)
    sd = state_dict_from_hf(model_or_dir.state_dict())
    model.load_state_dict(sd, strict=True)
    return model.to(next(model_or_dir.parameters()).device)
