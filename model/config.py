"""`LMConfig`: the hyper-parameters of `model.lm.LanguageModel`, as stored in checkpoints.

A module of its own (no torch) so that the Hugging Face mapping (`model/hf_interop.py`) and the
checkpoint readers can describe a network without importing the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any


@dataclass
class LMConfig:
    """Hyper-parameters of `LanguageModel`; stored in checkpoints as a plain dict (`to_dict`).

    The first seven fields are GPT-2's shape. The rest choose the architecture; each defaults
    to GPT-2's choice, so a config (or a checkpoint's dict) without them is GPT-2:

    - positions: "learned" (GPT-2's `wpe` table) or "rope" (rotary, base `rope_base`, Hugging
      Face's rotate-half layout as Llama and Qwen use it; no position table).
    - norm: "layernorm" (with bias) or "rmsnorm"; `norm_weight` False drops the learnable
      scale (and LayerNorm's bias); `norm_eps` is the epsilon of every norm.
    - mlp: "gelu" (GPT-2's tanh approximation), "swiglu" (silu(gate) * up, then down; `c_fc`
      holds gate and up, 2 * d_ff outputs) or "relu2" (ReLU squared).
    - num_kv_heads: key/value heads (grouped-query attention; 1 is multi-query); None (the
      default) resolves to num_heads. The KV cache holds only these heads.
    - head_dim: size of each head; None resolves to d_model // num_heads.
    - qk_norm: RMSNorm over the head dim of q and k before RoPE (Qwen3).
    - attn_bias, attn_out_bias, mlp_bias: biases of the q/k/v projection, the attention
      output projection and the MLP's projections.
    - tie_embeddings: the LM head shares `wte`'s weight (else it has its own).
    - logit_softcap: None, or c > 0 for logits = c * tanh(logits / c).
    """

    vocab_size: int = 50257
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    d_ff: int = 512
    max_seq_len: int = 256
    dropout: float = 0.1
    positions: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    norm_weight: bool = True
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    logit_softcap: float | None = None

    # The keys a checkpoint written before the architecture fields may lack (GPT-2's values).
    ARCHITECTURE_KEYS = ("positions", "rope_base", "norm", "norm_weight", "norm_eps", "mlp",
                         "num_kv_heads", "head_dim", "qk_norm", "attn_bias", "attn_out_bias",
                         "mlp_bias", "tie_embeddings", "logit_softcap")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, Real) or not (0.0 <= p < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        self.dropout = float(p)
        self._check_architecture()

    def _check_architecture(self) -> None:
        """Validate (and normalise the types of) the architecture fields."""
        for name, choices in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("norm_weight", "qk_norm", "attn_bias", "attn_out_bias", "mlp_bias",
                     "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.rope_base = _positive_float("rope_base", self.rope_base)
        self.norm_eps = _positive_float("norm_eps", self.norm_eps)
        if self.logit_softcap is not None:
            self.logit_softcap = _positive_float("logit_softcap", self.logit_softcap)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
                )
            self.head_dim = self.d_model // self.num_heads
        self.head_dim = _positive_int("head_dim", self.head_dim)
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self.num_kv_heads = _positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                             f"({self.num_heads})")

    def to_dict(self) -> dict[str, Any]:
        """The constructor's keyword arguments as a plain dict (safe for `weights_only` loads)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Build a config from a dict of the constructor's keys.

        The architecture keys (`ARCHITECTURE_KEYS`) may be missing: a checkpoint written before
        they existed is GPT-2, their defaults. Every other key is required.

        Raises:
            ValueError: naming unknown or missing keys, or an invalid value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"model_config must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d) - set(cls.ARCHITECTURE_KEYS))
        if unknown or missing:
            raise ValueError(
                f"model_config keys do not match: unknown {unknown}, missing {missing}"
            )
        return cls(**d)


POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


# Named block sets for training a new model (`train_lm.py --arch`). Each is a set of
# architecture fields; the shape (d_model, heads, layers, d_ff, context) stays the flags'.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # GPT-2 (2019): learned positions, LayerNorm with biases, GELU MLP, tied head.
    "gpt2": {},
    # Llama-style (SmolLM2, TinyLlama): RoPE, RMSNorm, SwiGLU, no biases. SwiGLU's first
    # projection holds gate and up (2 * d_ff outputs): at the same d_ff the MLP has 1.5x GELU's
    # weights.
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", attn_bias=False,
                  attn_out_bias=False, mlp_bias=False),
    # nanochat/modded-nanogpt-style: RoPE, RMSNorm without a weight, QK-norm, ReLU² MLP, no
    # biases, an untied head and a logit soft-cap of 15.
    "modern": dict(positions="rope", norm="rmsnorm", norm_weight=False, qk_norm=True,
                   mlp="relu2", attn_bias=False, attn_out_bias=False, mlp_bias=False,
                   tie_embeddings=False, logit_softcap=15.0),
}


def architecture_fields(name: str, num_kv_heads: int | None = None) -> dict[str, Any]:
    """The `LMConfig` architecture fields of a named block set (`ARCHITECTURES`), with
    `num_kv_heads` (grouped-query attention) when given.

    Raises:
        ValueError: an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (choose from "
                         f"{', '.join(ARCHITECTURES)})")
    fields_ = dict(ARCHITECTURES[name])
    if num_kv_heads is not None:
        fields_["num_kv_heads"] = num_kv_heads
    return fields_


def describe_architecture(cfg: LMConfig) -> str:
    """The blocks of `cfg` in a few words, e.g. "RoPE, RMSNorm, SwiGLU, 3 key/value heads"."""
    parts = ["learned positions" if cfg.positions == "learned"
             else f"RoPE (base {cfg.rope_base:g})",
             {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[cfg.norm]
             + ("" if cfg.norm_weight else " without weights"),
             {"gelu": "GELU", "swiglu": "SwiGLU", "relu2": "ReLU²"}[cfg.mlp]]
    if cfg.num_kv_heads != cfg.num_heads:
        parts.append(f"{cfg.num_kv_heads} key/value heads")
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        parts.append(f"head size {cfg.head_dim}")
    if cfg.qk_norm:
        parts.append("QK-norm")
    biases = [n for n, on in (("q/k/v", cfg.attn_bias), ("attention output", cfg.attn_out_bias),
                              ("MLP", cfg.mlp_bias)) if on]
    parts.append(f"biases in {', '.join(biases)}" if biases else "no biases")
    parts.append("tied head" if cfg.tie_embeddings else "untied head")
    if cfg.logit_softcap is not None:
        parts.append(f"logit soft-cap {cfg.logit_softcap:g}")
    return ", ".join(parts)
