"""A decoder-only Transformer language model: GPT-2 by default, Llama/Qwen-style by config.

One readable file: the KV cache, the blocks and the model. `LMConfig` (`model/config.py`)
holds the hyper-parameters; its architecture fields choose positions (learned or RoPE), norms,
the MLP, grouped-query attention, QK-norm, biases, tying and a logit soft-cap; Hugging Face's
Llama, Qwen2 and Qwen3 weights map onto it in `model/hf_families.py`. The generation loop lives
in `model/generation.py` and the samplers in `model/sampling.py`; `LanguageModel.generate` and
`.stream` call the loop.

Vocabulary (nanoGPT's): B batch, T sequence length, C = d_model, H heads, KV key/value heads,
D head size (C // H unless `head_dim` says otherwise), V vocab size, S cached key/value length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import LMConfig  # re-exported: `from model.lm import LMConfig` stays
from model.dropout import Dropout, causal_attention_with_dropout
from model.quant import Bf16Weight, FloatWeight, Int4Weight, Int8Weight, check_format


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written in place at `input_pos`.

    Each cache row holds one sequence from position 0, so rows of a batch may be at different
    lengths (the decode engine's slots, `model/engine.py`). The buffers are non-persistent, so
    they never appear in `state_dict`.
    """

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)  # (B, H, S, D)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice | torch.Tensor | None = None):
        """Write k, v (B, H, T, D) into cache rows `rows`; return the keys and values to attend to.

        Args:
            input_pos: an int: every row's T tokens go at `input_pos..input_pos+T-1`, and the
                rows' filled prefix `[:input_pos + T]` is returned. A (B,) tensor: one token per
                row (T == 1), row b's at `input_pos[b]`, and the rows' whole buffers are returned,
                to be masked (static shapes, as the compiled decode step needs).
            rows: the cache rows of the batch: a slice, or a (B,) tensor of row indices (only
                with `input_pos == 0`, a prefill); default the first B rows.
        """
        B, T = k.size(0), k.size(2)
        if rows is None:
            rows = slice(0, B)
        if isinstance(input_pos, int):
            end = input_pos + T
            if isinstance(rows, torch.Tensor):
                if input_pos != 0:
                    raise ValueError("cache rows given as indices need input_pos 0 (a prefill)")
                self.k[rows, :, :T] = k
                self.v[rows, :, :T] = v
                return self.k[rows, :, :T], self.v[rows, :, :T]
            self.k[rows, :, input_pos:end] = k
            self.v[rows, :, input_pos:end] = v
            return self.k[rows, :, :end], self.v[rows, :, :end]
        if T != 1:
            raise ValueError("per-row positions take one token per row")
        kc, vc = self.k[rows], self.v[rows]  # (B, H, S, D) views
        b = torch.arange(B, device=k.device)
        kc[b, :, input_pos] = k[:, :, 0].to(kc.dtype)  # (B, H, D) at each row's position
        vc[b, :, input_pos] = v[:, :, 0].to(vc.dtype)
        return kc, vc


class Linear(nn.Linear):
    """`nn.Linear` that multiplies by a cached decode-time copy of its weight on CPU.

    Decoding reads every weight once per token for a few rows, which is memory-bound; in
    `nn.Linear`'s (out, in) layout PyTorch's CPU kernels stream it at about half the machine's
    bandwidth. So `setup_cache` (on CPU only, so by the first generation) makes a copy laid out
    for such products (`model.quant.FloatWeight`: oneDNN's packed layout on x86-64 with more
    than one torch thread, else a plain (in, out) transpose); a single row goes through our
    own product on the weight itself where it builds (`model/native.py`). The copy is
    refreshed if the weight changes in place, used only with gradients and autocast off, and
    kept until `clear_cache` (or the end of a `with model:` block): the weights take twice
    their memory meanwhile. Parameters and `state_dict` are those of
    `nn.Linear`.

    `decode_format` (set by `LanguageModel.quantize`, see `model/quant.py`) makes the copy bf16
    or int8 instead (`Bf16Weight`, `Int8Weight`, each with the kernel that is fastest on this
    CPU); such a copy is made at once, replaces the float32 one, is used in every forward pass
    without gradients (autocast or not) and stays until the format is set back to "none".
    """

    decode_w: FloatWeight | Bf16Weight | Int8Weight | Int4Weight | None = None
    decode_format: str = "none"  # "none" (float32), "bf16", "int8" or "int4"
    _decode_key: tuple | None = None

    @property
    def packed(self) -> bool:
        """Whether the float32 decode copy is in oneDNN's packed layout."""
        return isinstance(self.decode_w, FloatWeight) and self.decode_w.packed

    def enable_decode_copy(self, enabled: bool) -> None:
        self.decode_w = self._decode_key = None
        if enabled:
            self._refresh()

    def _refresh(self) -> FloatWeight | Bf16Weight | Int8Weight | Int4Weight:
        w = self.weight.detach()
        self._decode_key = (w.data_ptr(), w._version, w.dtype)
        kind = {"none": FloatWeight, "bf16": Bf16Weight, "int8": Int8Weight,
                "int4": Int4Weight}[self.decode_format]
        self.decode_w = kind(w)
        return self.decode_w

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle leave the decode copies out (packed weights cannot be
        # copied); setup_cache, or for a `quantize` format the next forward, makes them again.
        return {**self.__dict__, "decode_w": None, "_decode_key": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wd = self._decode_copy(x)
        if wd is None:
            return F.linear(x, self.weight, self.bias)
        return wd.linear(x, self.bias)

    def _decode_copy(self, x: torch.Tensor
                     ) -> FloatWeight | Bf16Weight | Int8Weight | Int4Weight | None:
        """The decode copy to multiply `x` by (made or refreshed here), or None: `F.linear`."""
        wd = self.decode_w
        if torch.is_grad_enabled() or (self.decode_format == "none" and (
                wd is None or torch.is_autocast_enabled("cpu") or x.dtype != self.weight.dtype)):
            return None
        if torch.compiler.is_compiling():
            # The compiled decode step (model/engine.py; its eager prefill made the copy
            # current): the packed float copy goes through an op the compiler keeps.
            return wd if isinstance(wd, FloatWeight) and wd.packed else None
        w = self.weight
        if wd is None or self._decode_key != (w.data_ptr(), w._version, w.dtype):
            wd = self._refresh()
        return wd


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) over the last dimension, times a weight (if it has one).

    Computed in float32 and rounded to x's dtype before the weight, as Hugging Face's Llama,
    Qwen2 and Qwen3 do it (so bf16 models match theirs); six plain ops, which on CPU decode
    run faster than `nn.RMSNorm`'s fused path for one token. Its state is `nn.RMSNorm`'s
    (`weight`, or nothing), so checkpoints of either load.
    """

    def __init__(self, dim: int, eps: float, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h if self.weight is None else h * self.weight


def make_norm(cfg: LMConfig, dim: int) -> nn.Module:
    """The config's normalisation over the last `dim` features (LayerNorm or RMSNorm)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_weight)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_weight)


def rope_tables(cfg: LMConfig, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim), in float32.

    Frequency i (of D / 2) turns by `position / rope_base ** (2i / D)`; the table repeats the
    D / 2 angles twice, the rotate-half layout of Hugging Face's Llama (features i and
    i + D / 2 form a pair), so their weights load without a permutation. Computed in float32
    the way Hugging Face does it, so the tables match theirs bit for bit.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, device=device).float() / D))
    pos = torch.arange(cfg.max_seq_len, device=device).float()
    angles = torch.outer(pos, inv_freq)  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos(), angles.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with its first half negated, as `apply_rope` takes it."""
    half = sin.size(-1) // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs (i, i + D/2) of x (B, H, T, D) by the angles of cos and
    `signed_sin(sin)`, each (B or 1, 1, T, D).

    Hugging Face's `x * cos + rotate_half(x) * sin`, with rotate_half(x) = (-x2, x1): rolling x
    by D/2 gives (x2, x1), and the sign rides on the table, so the products are the same
    floating-point values in two ops fewer (this runs twice per layer per decoded token).
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin_signed


_HALF = (torch.bfloat16, torch.float16)
# Below this many keys in a batch (rows x cache length) SDPA's one call beats the matmuls' fixed
# ~80 us on CPU; above it SDPA grows ~0.55 us per key in bf16 and the matmuls ~0.08.
_DECODE_ATTENTION_MIN_KEYS = 256


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row in bf16/fp16 on CPU, as two matmuls and a float32
    softmax (Hugging Face's eager attention): PyTorch's CPU SDPA kernel takes 1.2 ms for this
    in bf16 at 2,048 keys where these take 0.18, 9.8 ms where they take 0.73 for 8 rows (2-core
    AMD EPYC; float32 SDPA is fast, so float32 keeps it).

    q (B, H, 1, D); k, v (B, KV, S, D) with H a multiple of KV (query heads h*G..h*G+G-1 share
    key/value head h); attn_mask None or boolean (B, 1, 1, S). Returns (B, H, 1, D).
    """
    B, H, _, D = q.shape
    KV = k.size(1)
    qg = q.view(B, KV, H // KV, D)  # (B, H, 1, D) -> (B, KV, G, D): a group's queries together
    att = (qg @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(D))  # (B, KV, G, S)
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))  # (B, 1, 1, S) broadcasts
    y = att.softmax(dim=-1).to(v.dtype) @ v  # (B, KV, G, D)
    return y.view(B, H, 1, D)


# Training on CPU, causal attention as matrix products (model/dropout.py) rather than SDPA: with
# dropout, SDPA's own sampler is slow (a 256-wide, 4-layer step of 16 x 128 tokens: 422 ms vs 472
# on a 2-core Zen 5 EPYC, bf16); without, its fused kernel's backward is slower at short contexts
# (359 ms vs 396). Past this many tokens the (T x T) scores cost more memory than the fused
# kernel saves time, so SDPA keeps them (with dropout it materializes them anyway).
_TRAIN_ATTENTION_MAX_T = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        # q, k, v for all heads at once
        self.c_attn = Linear(cfg.d_model, q_size + 2 * kv_size, bias=cfg.attn_bias)
        self.c_proj = Linear(q_size, cfg.d_model, bias=cfg.attn_out_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # RMSNorm over each head's features (Qwen3)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_weight)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_weight)
        # Grouped-query attention: SDPA repeats each key/value head for its group of q heads.
        self.sdpa_kwargs = {"enable_gqa": True} if cfg.num_kv_heads != cfg.num_heads else {}
        self.resid_dropout = Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: int | torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None,
                cache_rows: slice | torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D); k and v have KV heads
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)  # sin: signed (apply_rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the cache holds rotated k
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows)  # (B, KV, S, D)
            if attn_mask is not None and k.size(2) > attn_mask.size(-1):
                # per-row positions: attend to the first S keys only (the mask's width)
                k, v = k[:, :, :attn_mask.size(-1)], v[:, :, :attn_mask.size(-1)]
        if (T == 1 and q.dtype in _HALF and q.device.type == "cpu" and not self.training
                and B * k.size(2) >= _DECODE_ATTENTION_MIN_KEYS):
            y = _decode_attention(q, k, v, attn_mask)  # (B, H, 1, D)
            return self.resid_dropout(self.c_proj(y.view(B, 1, H * D)))
        # Without a mask: a fresh sequence is plainly causal; one new token sees every cached key.
        is_causal = attn_mask is None and T > 1
        if is_causal and k.size(2) != T:
            raise ValueError("a multi-token step after a cached prefix needs an attention mask")
        if (self.training and is_causal and q.device.type == "cpu"
                and (self.dropout > 0 or T <= _TRAIN_ATTENTION_MAX_T)):
            y = causal_attention_with_dropout(q, k, v, self.dropout)  # faster on CPU: above
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, **self.sdpa_kwargs,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    # GPT-2's GELU is the tanh approximation ("gelu_new" in Hugging Face).
    return F.gelu(h, approximate="tanh")


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)  # (B, T, 2*F) -> two (B, T, F)
    return F.silu(gate) * up


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        width = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff  # swiglu: gate and up
        self.c_fc = Linear(cfg.d_model, width, bias=cfg.mlp_bias)
        self.c_proj = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = {"gelu": _gelu_tanh, "swiglu": _swiglu, "relu2": _relu2}[cfg.mlp]
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, input_pos=None, attn_mask=None,
                cache_rows=None, rope=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, attn_mask, cache_rows, rope)
        return x + self.mlp(self.ln_2(x))


class LanguageModel(nn.Module):
    """Decoder-only language model, GPT-2 unless `LMConfig`'s architecture fields say otherwise;
    loads Hugging Face GPT-2, Llama, Qwen2 and Qwen3 weights (`from_hf_gpt2`) and generates text.

    Use `with model:` for a block of generation calls: inside, the model is in eval mode with
    gradients off and its KV cache allocated; on exit the previous mode and grad state return and
    the cache is freed. `generate`/`stream` also work outside such a block.

    Attributes:
        config: the `LMConfig` the model was built from.
        end_token: a token id that ends a row of generation (None: generate to the length limit).
        tokenizer: used to encode `str` prompts (None: the bundled GPT-2 tokenizer).
    """

    def __init__(self, vocab_size: int = 50257, d_model: int = 256, num_heads: int = 4,
                 num_layers: int = 4, d_ff: int = 512, max_seq_len: int = 256,
                 dropout: float = 0.1, **architecture: Any) -> None:
        """Build the network; `architecture` takes `LMConfig`'s other fields (default GPT-2)."""
        super().__init__()
        cfg = LMConfig(vocab_size, d_model, num_heads, num_layers, d_ff, max_seq_len, dropout,
                       **architecture)
        self.config = cfg
        modules = dict(wte=nn.Embedding(cfg.vocab_size, cfg.d_model))
        if cfg.positions == "learned":
            modules["wpe"] = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers)),
            ln_f=make_norm(cfg, cfg.d_model),
        ))
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        if cfg.positions == "rope":
            # Non-persistent: not in state_dict; they follow .to() (dtype too: Hugging Face
            # also casts its tables to the activations' dtype).
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
            self.register_buffer("rope_sin", signed_sin(sin), persistent=False)  # see apply_rope
        else:
            self.rope_cos = self.rope_sin = None
        self._softcap = cfg.logit_softcap
        self.end_token: int | None = None
        self.tokenizer = None
        self._with_stack: list[tuple[bool, bool]] = []
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * num_layers) at init.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, config: LMConfig | dict[str, Any]) -> LanguageModel:
        """Build a model from an `LMConfig` or a checkpoint's `model_config` dict (one without
        the architecture keys is GPT-2)."""
        cfg = config if isinstance(config, LMConfig) else LMConfig.from_dict(config)
        return cls(**cfg.to_dict())

    @classmethod
    def from_hf_gpt2(cls, model_or_dir: Any, max_seq_len: int | None = None) -> LanguageModel:
        """Convert a Hugging Face model: a `GPT2LMHeadModel`, `LlamaForCausalLM`,
        `Qwen2ForCausalLM` or `Qwen3ForCausalLM` instance, a local folder holding one, or a hub
        name (through the local cache; see `model.hf_interop.hf_folder`).

        Args:
            model_or_dir: the model, folder or hub name.
            max_seq_len: a shorter context than the model's (the KV cache holds `max_seq_len`
                positions per row: Qwen's 32,768 or 40,960 would take gigabytes per row);
                GPT-2's position table is cropped to it.

        Raises:
            ValueError: `max_seq_len` longer than the model's context.
        """
        from model.hf_interop import config_from_hf, read_hf_checkpoint, state_dict_from_hf

        if isinstance(model_or_dir, (str, Path)):
            ckpt = read_hf_checkpoint(model_or_dir)
            cfg, sd = LMConfig.from_dict(ckpt["model_config"]), ckpt["model_state_dict"]
            device = torch.device("cpu")
        else:
            cfg = config_from_hf(model_or_dir.config)
            sd = state_dict_from_hf(model_or_dir.state_dict())
            device = next(model_or_dir.parameters()).device
        if max_seq_len is not None and max_seq_len != cfg.max_seq_len:
            if max_seq_len > cfg.max_seq_len:
                raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of "
                                 f"{cfg.max_seq_len}")
            cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
            if "transformer.wpe.weight" in sd:
                sd = {**sd, "transformer.wpe.weight": sd["transformer.wpe.weight"][:max_seq_len]}
        model = cls.from_config(cfg)
        model.load_state_dict(sd, strict=True)
        return model.to(device)

    from_hf = from_hf_gpt2  # the name that says it takes every family

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (token ones are the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    # -- forward -------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position; with `targets`, also the mean cross-entropy loss.

        Args:
            idx: token ids, (B, T) with T <= max_seq_len.
            targets: next-token ids (B, T); -100 marks positions to ignore.

        Returns:
            logits (B, T, V) when `targets` is None, else `(logits, loss)`.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        if idx.size(1) > self.max_seq_len:
            raise ValueError(
                f"sequence of {idx.size(1)} tokens exceeds max_seq_len ({self.max_seq_len})"
            )
        logits = self.forward_cached(idx)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, input_pos: int | torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None,
                       last_only: bool = False,
                       cache_rows: slice | torch.Tensor | None = None,
                       logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The network itself, with optional KV cache use (the decode engine's entry point).

        Args:
            idx: (B, T) token ids.
            input_pos: where these tokens go in the KV cache: an int for every row, or a (B,)
                tensor of per-row positions for a one-token step (see `KVCache.update`); None
                runs without the cache.
            position_ids: (B, T) positions for the position embedding or RoPE; default
                `input_pos + arange(T)` (or `arange(T)` without a cache or with per-row positions
                not given here).
            attn_mask: boolean (B, 1, T, S) mask, True where a query may attend a key; with
                per-row positions, S may be less than the cache length (the keys beyond are not
                attended).
            last_only: compute logits for the last position only (decoding needs no more).
            cache_rows: the KV cache rows of this batch (see `KVCache.update`; default the
                first B).
            logits_at: (B,) the position of each row whose logits to compute (a right-padded
                prefill); wins over `last_only`.

        Returns:
            logits (B, T, V), or (B, 1, V) with `last_only` or `logits_at`.
        """
        x = self.forward_hidden(idx, input_pos, position_ids, attn_mask, cache_rows)
        if logits_at is not None:
            x = x[torch.arange(x.size(0), device=x.device), logits_at].unsqueeze(1)  # (B, 1, C)
        elif last_only and x.size(1) > 1:
            x = x[:, -1:, :]  # (B, 1, C): the LM head is the costliest matmul when decoding
        logits = self.lm_head(x)
        if self._softcap is not None:
            logits = self._softcap * torch.tanh(logits / self._softcap)
        return logits

    def forward_hidden(self, idx: torch.Tensor, input_pos: int | torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None,
                       cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states, after `ln_f` and before the LM head: (B, T, C).

        Arguments as in `forward_cached`; the trainer's fused LM-head loss starts from here.
        """
        B, T = idx.size()
        if position_ids is None:
            start = input_pos if isinstance(input_pos, int) else 0
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        if self.rope_cos is None:
            x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)
            rope = None
        else:
            # RoPE encodes positions in q and k: only their differences reach the attention
            # scores, so the sliding window of model/generation.py, which re-feeds its tokens
            # at positions 0..keep-1, gives the same scores as at their original positions.
            x = self.transformer.wte(idx)
            # (B or 1, T, D) -> (B or 1, 1, T, D), broadcast over the heads
            rope = (self.rope_cos[position_ids].unsqueeze(1),
                    self.rope_sin[position_ids].unsqueeze(1))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, input_pos, attn_mask, cache_rows, rope)
        return self.transformer.ln_f(x)

    # -- KV cache and the `with model:` block --------------------------------------------------

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """Allocate (or keep, when big enough) a KV cache of max_seq_len positions per row.

        On CPU this also makes the decode-time (in, out) weight copies of `Linear`, which double
        the weights' memory until `clear_cache` (unless `quantize` has made its own copies).
        """
        device = self.device
        if dtype is None:
            dev_type = device.type
            if torch.is_autocast_enabled(dev_type):
                dtype = torch.get_autocast_dtype(dev_type)
            else:
                dtype = self.transformer.wte.weight.dtype
        cfg = self.config
        if device.type == "cpu" and self.lm_head.decode_w is None:
            for m in self.modules():
                if isinstance(m, Linear):
                    m.enable_decode_copy(True)
        for block in self.transformer.h:
            old = block.attn.kv_cache
            if (old is not None and old.k.size(0) >= batch_size and old.k.dtype == dtype
                    and old.k.device == device):
                continue
            block.attn.kv_cache = KVCache(batch_size, cfg.num_kv_heads, self.max_seq_len,
                                          cfg.head_dim, device, dtype)

    def clear_cache(self) -> None:
        """Free the KV cache and the float32 decode-time weight copies (see `Linear`); the
        copies of a `quantize` format stay."""
        self.free_kv_cache()
        for m in self.modules():
            if isinstance(m, Linear) and m.decode_format == "none":
                m.enable_decode_copy(False)

    # -- inference weight formats (model/quant.py) ----------------------------------------------

    def quantize(self, fmt: str = "int8") -> None:
        """Choose the weight format of inference on CPU: "none" (float32), "bf16", "int8" or
        "int4".

        Every forward pass without gradients (generation, evaluation) then multiplies by bf16
        copies of the weights, by symmetric per-output-channel int8 weights, or by 4-bit weights
        in llama.cpp's Q4_0 scheme (LM head included), made now from the float32 weights; these
        replace the float32 decode copies.
        It is a view for inference: the parameters, training, `state_dict`, checkpoints and
        exports stay float32, and the copies are remade if the weights change. See
        `model/quant.py`. `quantize("none")` goes back to float32.

        Example:
            >>> model.quantize("int8")
            >>> model.generate("Once upon a time", max_new_tokens=50)

        Raises:
            ValueError: an unknown format, or a format other than "none" on a model that is
                not on the CPU (on a GPU, use bf16 autocast or `model.to(torch.bfloat16)`).
        """
        check_format(fmt)
        if fmt != "none" and self.device.type != "cpu":
            raise ValueError(f"quantize({fmt!r}) is for CPU inference, but the model is on "
                             f"{self.device}; on a GPU use bf16 autocast instead")
        for m in self.modules():
            if isinstance(m, Linear):
                m.decode_format = fmt
                m.enable_decode_copy(fmt != "none")  # float32 copies return with setup_cache

    @property
    def quantization(self) -> str:
        """The weight format of inference set by `quantize`: "none", "bf16", "int8" or "int4"."""
        return self.lm_head.decode_format

    def free_kv_cache(self) -> None:
        """Free the KV cache only; the decode-time weight copies stay for the next generation."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def has_cache(self) -> bool:
        return self.transformer.h[0].attn.kv_cache is not None

    def __enter__(self) -> LanguageModel:
        self._with_stack.append((self.training, torch.is_grad_enabled()))
        self.eval()
        torch.set_grad_enabled(False)
        self.setup_cache(batch_size=1)
        return self

    def __exit__(self, *exc: object) -> None:
        training, grad_enabled = self._with_stack.pop()
        self.train(training)
        torch.set_grad_enabled(grad_enabled)
        if not self._with_stack:
            self.clear_cache()

    # -- generation (model/generation.py holds the loop, model/sampling.py the samplers) -------

    def stream(self, prompt: Any, max_length: int = 100, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, **kwargs: Any
               ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, a (B,) tensor per step; see `generate`."""
        from model.generation import stream

        return stream(self, prompt, max_length=max_length, temperature=temperature,
                      top_k=top_k, top_p=top_p, **kwargs)

    def generate(self, prompt: Any, max_length: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, **kwargs: Any
                 ) -> torch.Tensor:
        """Generate a continuation of `prompt`; returns (B, T) ids including the prompt.

        See `model.generation.generate` for every argument, the batching and the sliding-window
        policy. Extra keywords: max_new_tokens, do_sample, repetition_penalty, seed, generator,
        pad_token_id, attention_mask, compile, return_logprobs (then `(ids, TokenLogprobs)` is
        returned; see `model.scoring`), top_logprobs.
        """
        from model.generation import generate

        return generate(self, prompt, max_length=max_length, temperature=temperature,
                        top_k=top_k, top_p=top_p, **kwargs)
