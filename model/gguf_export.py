"""GGUF export: our models as files that llama.cpp (and Ollama, LM Studio, llamafile) load.

GGUF is llama.cpp's one-file format: the architecture's hyper-parameters and the tokenizer as
key-value metadata, then every tensor. A model is written as the llama.cpp architecture that
computes exactly the same network (`gguf_arch`), through the `gguf` package (llama.cpp's own
Python library):

- `gpt2`: GPT-2's blocks (every architecture field at its default). Metadata
  `gpt2.context_length` (max_seq_len), `gpt2.embedding_length` (d_model),
  `gpt2.feed_forward_length` (d_ff: the real width, not 4 x d_model), `gpt2.block_count`,
  `gpt2.attention.head_count`, `gpt2.attention.layer_norm_epsilon` (1e-5). Tensors under
  llama.cpp's names (`GGUF_NAMES`), each (out, in) as `nn.Linear` keeps it, q/k/v fused
  (`attn_qkv`); the LM head is not written: it is the token embedding, which llama.cpp reuses.
- `llama`, `qwen2`, `qwen3`: RoPE, RMSNorm with a weight, SwiGLU, grouped-query attention, as
  the Hugging Face families of those names (`model.hf_families.family_of` picks one: Qwen3 for
  QK-norm, Qwen2 for q/k/v biases without an output bias, else Llama). Metadata
  `<arch>.context_length`, `embedding_length`, `feed_forward_length`, `block_count`,
  `attention.head_count`, `attention.head_count_kv`, `attention.key_length` and
  `value_length` (head_dim), `rope.dimension_count` (head_dim), `rope.freq_base`,
  `attention.layer_norm_rms_epsilon` and `vocab_size`. Tensors: q, k, v and gate, up as
  separate matrices (`attn_q`, `attn_k`, `attn_v`, `ffn_gate`, `ffn_up`), the biases the model
  has, `attn_q_norm`/`attn_k_norm` (Qwen3), and `output.weight` only when the head is untied.
  llama.cpp's `llama` applies RoPE to adjacent pairs (x0, x1), (x2, x3), ... while we and
  Hugging Face rotate the two halves of each head (x_i, x_{i + head_dim/2}); so for `llama` the
  rows of q and k (weights and biases) are permuted within each head to put each pair side by
  side, as llama.cpp's converter does. `qwen2` and `qwen3` rotate halves, as we do: no
  permutation.

The tokenizer (`model.gguf_vocab`): the bundled GPT-2 one by name, or any byte-level BPE
tokenizer whose pre-tokenizer llama.cpp knows by name, with its bos/eos ids and whether prompts
get BOS, as our tools encode them.

Types (`--outtype`): "f32" writes every tensor exactly; "f16", "q8_0" and "q4_0" convert the
weight matrices (llama.cpp's 8-bit and 4-bit formats: blocks of 32 weights sharing one f16
scale; q4_0 is what `--quantize int4` computes with, up to its bf16 scale) and keep norms,
biases and GPT-2's position embedding in f32, as llama.cpp's own converter does. A model that
llama.cpp cannot hold exactly is refused with one line (`GGUFExportError`) before anything is
written: an architecture no llama.cpp architecture computes (ReLU² or GELU with RoPE, LayerNorm
with RoPE, a soft-cap, norms without weight, learned positions with other non-GPT-2 fields,
Qwen3 with attention biases, ...), a tokenizer llama.cpp would split or merge differently, a
vocabulary smaller than the tokenizer's, f16 weights out of range, q8_0 or q4_0 rows whose
width is not a multiple of 32. Every file is read back (`check_gguf`) before it replaces its
target: the metadata and tensor shapes llama.cpp's loader expects, and every tensor equal to the
source (f32) or within its type's rounding (f16, q8_0, q4_0).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.gguf_vocab import (  # noqa: F401 - re-exported: the export's error and vocabulary
    EOT_ID,
    GPT2_VOCAB,
    GGUFExportError,
    Vocab,
    gpt2_vocab,
    tokenizer_vocab,
)
from model.lm import LMConfig

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
ARCHES = ("gpt2", "llama", "qwen2", "qwen3")
LAYER_NORM_EPS = 1e-5
Q8_0_BLOCK = 32  # weights per q8_0 (and q4_0) block (one f16 scale each)
F16_MAX = 65504.0

# Our state-dict names -> llama.cpp's (per block: {i}); the tied lm_head is not written.
GGUF_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
}
_BLOCK_NAMES = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
# The Llama/Qwen blocks: modules that map one to one, and our fused ones split into parts.
_FAMILY_BLOCK_NAMES = {
    "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_proj": "attn_output",
    "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm", "mlp.c_proj": "ffn_down",
}
_FAMILY_FUSED = {"attn.c_attn": ("attn_q", "attn_k", "attn_v"), "mlp.c_fc": ("ffn_gate", "ffn_up")}
# Tensors converted to the outtype; all others (1-D ones, the position embedding) stay f32.
_MATRICES = ("token_embd.weight", "output.weight", "attn_qkv.weight", "attn_q.weight",
             "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
             "ffn_up.weight", "ffn_down.weight")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("the GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _qtypes() -> dict[str, Any]:
    q = _gguf().GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}


def _file_type(outtype: str):
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0,
            "q4_0": ft.MOSTLY_Q4_0}[outtype]


# -- which llama.cpp architecture ----------------------------------------------------------------


def gguf_arch(cfg: LMConfig) -> str:
    """The llama.cpp architecture that computes exactly `cfg`'s network: "gpt2", "llama",
    "qwen2" or "qwen3".

    Raises:
        GGUFExportError: none does; the message names what does not fit (one line).
    """
    from model.hf_families import family_of
    from model.hf_interop import is_gpt2

    if is_gpt2(cfg):
        return "gpt2"
    if cfg.positions == "learned":
        default = LMConfig()
        other = [f"{k}={getattr(cfg, k)!r}" for k in LMConfig.ARCHITECTURE_KEYS
                 if k not in ("num_kv_heads", "head_dim")
                 and getattr(cfg, k) != getattr(default, k)]
        if cfg.num_kv_heads != cfg.num_heads:
            other.append(f"num_kv_heads={cfg.num_kv_heads}")
        if cfg.head_dim * cfg.num_heads != cfg.d_model:
            other.append(f"head_dim={cfg.head_dim}")
        raise GGUFExportError(
            f"no llama.cpp architecture holds this model: learned positions are llama.cpp's "
            f"gpt2 only, which has none of {', '.join(other)} (GPT-2's blocks)")
    try:
        family = family_of(cfg)
    except ValueError as exc:
        raise GGUFExportError(f"no llama.cpp architecture holds this model (llama, qwen2, qwen3 "
                              f"for RoPE models): {exc}") from None
    if family == "qwen3" and (cfg.attn_bias or cfg.attn_out_bias):
        raise GGUFExportError("no llama.cpp architecture holds this model: QK-norm (llama.cpp's "
                              "qwen3) with attention biases (its qwen3 has no output-projection "
                              "bias); use --to_hf")
    return family


# -- tensors -------------------------------------------------------------------------------------


def gguf_name(name: str) -> str | None:
    """llama.cpp's `gpt2` name of one of our state-dict tensors (None for the tied LM head)."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    if name == "lm_head.weight":
        return None
    parts = name.split(".")  # transformer.h.{i}.<module>.(weight|bias)
    if len(parts) >= 5 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
        module = ".".join(parts[3:-1])
        if module in _BLOCK_NAMES:
            return f"blk.{parts[2]}.{_BLOCK_NAMES[module]}.{parts[-1]}"
    raise GGUFExportError(f"no GGUF name for weight {name!r}: not a GPT-2 language model")


def expected_tensors(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's loader for `gguf_arch(cfg)` creates, with their shapes in ggml
    order (ne: innermost dimension first, so an (out, in) matrix is (in, out))."""
    if gguf_arch(cfg) != "gpt2":
        return _family_shapes(cfg)
    C, F, V, T = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (C, V), "position_embd.weight": (C, T),
        "output_norm.weight": (C,), "output_norm.bias": (C,),
    }
    for i in range(cfg.num_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (C,), f"blk.{i}.attn_norm.bias": (C,),
            f"blk.{i}.attn_qkv.weight": (C, 3 * C), f"blk.{i}.attn_qkv.bias": (3 * C,),
            f"blk.{i}.attn_output.weight": (C, C), f"blk.{i}.attn_output.bias": (C,),
            f"blk.{i}.ffn_norm.weight": (C,), f"blk.{i}.ffn_norm.bias": (C,),
            f"blk.{i}.ffn_up.weight": (C, F), f"blk.{i}.ffn_up.bias": (F,),
            f"blk.{i}.ffn_down.weight": (F, C), f"blk.{i}.ffn_down.bias": (C,),
        })
    return shapes


def _family_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    C, F, V, D = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    Q, KV = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (C, V), "output_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (C, V)
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (C,), b + "attn_q.weight": (C, Q), b + "attn_k.weight": (C, KV),
            b + "attn_v.weight": (C, KV), b + "attn_output.weight": (Q, C),
            b + "ffn_norm.weight": (C,), b + "ffn_gate.weight": (C, F),
            b + "ffn_up.weight": (C, F), b + "ffn_down.weight": (F, C),
        })
        if cfg.attn_bias:
            shapes.update({b + "attn_q.bias": (Q,), b + "attn_k.bias": (KV,),
                           b + "attn_v.bias": (KV,)})
        if cfg.attn_out_bias:
            shapes[b + "attn_output.bias"] = (C,)
        if cfg.mlp_bias:
            shapes.update({b + "ffn_gate.bias": (F,), b + "ffn_up.bias": (F,),
                           b + "ffn_down.bias": (C,)})
        if cfg.qk_norm:
            shapes.update({b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,)})
    return shapes


def tensor_outtype(name: str, outtype: str) -> str:
    """The type a tensor is stored in: the outtype for the weight matrices, else f32."""
    return outtype if name.endswith(_MATRICES) else "f32"


def gguf_tensors(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp `gpt2` name, float32 CPU tensor) for every tensor of a GPT-2 state dict, tied
    head left out."""
    for name, value in state_dict.items():
        new = gguf_name(name)
        if new is not None:
            yield new, value.detach().to("cpu", torch.float32).contiguous()


def rope_pairs_adjacent(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows (weight or bias) from the rotate-half RoPE layout to llama.cpp `llama`'s
    adjacent pairs: within each head, rows (j, j + head_dim/2) become rows (2j, 2j + 1)."""
    head_dim = rows.shape[0] // n_heads
    return (rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2)
            .reshape(rows.shape).contiguous())


def family_tensors(state_dict: dict[str, torch.Tensor], cfg: LMConfig, arch: str
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 CPU tensor) for a Llama/Qwen2/Qwen3-shaped model's state dict:
    fused q/k/v and gate/up split, q and k rows permuted for `llama`, the head written only
    when untied."""
    sizes = {"attn.c_attn": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.num_kv_heads * cfg.head_dim], "mlp.c_fc": [cfg.d_ff, cfg.d_ff]}
    for name, value in state_dict.items():
        value = value.detach().to("cpu", torch.float32)
        if name == "transformer.wte.weight":
            yield "token_embd.weight", value.contiguous()
            continue
        if name == "transformer.ln_f.weight":
            yield "output_norm.weight", value.contiguous()
            continue
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                yield "output.weight", value.contiguous()
            continue
        parts = name.split(".")  # transformer.h.{i}.<module>.(weight|bias)
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if parts[:2] != ["transformer", "h"] or len(parts) < 5:
            raise GGUFExportError(f"no GGUF name for weight {name!r}: not a {arch} model")
        block = f"blk.{parts[2]}."
        if module in _FAMILY_BLOCK_NAMES:
            yield f"{block}{_FAMILY_BLOCK_NAMES[module]}.{kind}", value.contiguous()
        elif module in _FAMILY_FUSED:
            for i, (part, piece) in enumerate(zip(_FAMILY_FUSED[module],
                                                  value.split(sizes[module]), strict=True)):
                if arch == "llama" and part in ("attn_q", "attn_k"):
                    piece = rope_pairs_adjacent(piece, cfg.num_heads if i == 0
                                                else cfg.num_kv_heads)
                yield f"{block}{part}.{kind}", piece.contiguous()
        else:
            raise GGUFExportError(f"no GGUF name for weight {name!r}: not a {arch} model")


def export_tensors(state_dict: dict[str, torch.Tensor], cfg: LMConfig
                   ) -> dict[str, torch.Tensor]:
    """Every tensor the export writes, under llama.cpp's names, in its layout (float32)."""
    arch = gguf_arch(cfg)
    if arch == "gpt2":
        return dict(gguf_tensors(state_dict))
    return dict(family_tensors(state_dict, cfg, arch))


# -- checks --------------------------------------------------------------------------------------


def check_exportable(cfg: LMConfig, tensors: dict[str, torch.Tensor], outtype: str) -> str:
    """Refuse, with one line, a model that llama.cpp cannot hold exactly in `outtype`.

    Args:
        cfg: the model's config.
        tensors: what will be written (llama.cpp's names, or ours: only values are checked).
        outtype: "f32", "f16", "q8_0" or "q4_0".

    Returns:
        The llama.cpp architecture (`gguf_arch`).

    Raises:
        GGUFExportError: unknown outtype, an architecture no llama.cpp architecture computes,
            f16 weights out of range, or q8_0/q4_0 rows not a multiple of 32 wide.
    """
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    arch = gguf_arch(cfg)
    for name, value in tensors.items():
        kind = tensor_outtype(name, outtype)
        if kind == "f16":
            big = float(value.abs().max())
            if big > F16_MAX:
                raise GGUFExportError(
                    f"{name} holds a weight of magnitude {big:.3g}, beyond f16's range "
                    f"({F16_MAX:g}); use --outtype f32")
        elif kind in ("q8_0", "q4_0") and value.size(-1) % Q8_0_BLOCK:
            raise GGUFExportError(
                f"{kind} needs rows whose width is a multiple of {Q8_0_BLOCK}, but {name} has "
                f"rows of {value.size(-1)}; use --outtype f16 or f32")
    return arch


def export_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """The vocabulary to write: "gpt2" is the bundled GPT-2 tokenizer (`gpt2_vocab`); another
    string is loaded with `model.tokenizer.load_tokenizer`; anything else is a Hugging Face
    fast tokenizer (`tokenizer_vocab`).

    Raises:
        GGUFExportError: a tokenizer llama.cpp would not reproduce, or a vocabulary the model
            is too small for (one line).
    """
    if isinstance(tokenizer, str):
        if tokenizer == "gpt2":
            return gpt2_vocab(vocab_size)
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return tokenizer_vocab(tokenizer, vocab_size)


# -- writing -------------------------------------------------------------------------------------


def _encode(value: torch.Tensor, kind: str) -> np.ndarray:
    """A tensor as the numpy array the writer stores: float32, float16, or q8_0/q4_0 bytes."""
    array = value.numpy()
    if kind == "f32":
        return array
    if kind == "f16":
        return array.astype(np.float16)
    return _gguf().quants.quantize(array, _qtypes()[kind])


def _add_metadata(writer: Any, cfg: LMConfig, arch: str, outtype: str, vocab: Vocab) -> None:
    """The hyper-parameter and tokenizer keys (see the module docstring)."""
    gguf = _gguf()
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos:
        writer.add_add_eos_token(True)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(path: str | Path, cfg: LMConfig, state_dict: dict[str, torch.Tensor],
               outtype: str = "f16", *, tokenizer: Any = "gpt2", name: str = "small-lm",
               verify: bool = True) -> Path:
    """Write a model as a GGUF file for llama.cpp's matching architecture (`gguf_arch`).

    The file is written next to `path` under a temporary name, read back and checked
    (`check_gguf`, unless `verify` is False), then renamed over `path`: a failure leaves no
    partial file.

    Args:
        path: the .gguf file to write; its folder must exist.
        cfg: the model's config.
        state_dict: its float weights (our names; the tied `lm_head.weight` may be present).
        outtype: "f32", "f16" or "q8_0" (see the module docstring).
        tokenizer: "gpt2" (the bundled tokenizer), a tokenizer name or folder, or a Hugging
            Face fast tokenizer (`export_vocab`).
        name: `general.name` in the file.
        verify: read the file back and check it before it replaces `path`.

    Returns:
        The path written.

    Raises:
        GGUFExportError: the model cannot be represented exactly (one line; nothing written).
        OSError: the file cannot be written.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.parent.is_dir():
        raise GGUFExportError(f"folder {path.parent} does not exist; create it first or give "
                              "another output path")
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    tensors = export_tensors(state_dict, cfg)
    arch = check_exportable(cfg, tensors, outtype)
    vocab = export_vocab(tokenizer, cfg.vocab_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        _add_metadata(writer, cfg, arch, outtype, vocab)
        qtypes = _qtypes()
        for tname, value in tensors.items():
            kind = tensor_outtype(tname, outtype)
            writer.add_tensor(tname, _encode(value, kind), raw_dtype=qtypes[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if verify:
            check_gguf(tmp, cfg, tensors, outtype, vocab)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- reading back --------------------------------------------------------------------------------


def _field(reader, key: str) -> Any:
    """A scalar, string or array metadata value of a GGUFReader, or None when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def read_gguf_tensors(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of a GGUF file as (type name, float32 tensor in (out, in) order)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> numpy order
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name.lower(),
                       torch.from_numpy(np.array(values, dtype=np.float32)))
    return out


def rounding_bound(value: torch.Tensor, kind: str) -> torch.Tensor:
    """Largest error the type's rounding allows per element (0 for f32)."""
    if kind == "f32":
        return torch.zeros_like(value)
    if kind == "f16":  # half an f16 ulp (relative 2**-11), and subnormals' fixed step
        return value.abs() * 2.0**-11 + 2.0**-25
    blocks = value.reshape(-1, Q8_0_BLOCK)
    if kind == "q4_0":
        # q4_0: per block of 32, d = (value of largest magnitude) / -8 in f16, q - 8 in [-8, 7]:
        # error <= d / 2, or d where +8 d is clamped to 7 d, plus the scale's own rounding
        # times |q - 8| <= 8.
        d = blocks.abs().amax(dim=1, keepdim=True) / 8.0
        return (d * (1 + 8 * 2.0**-11) + 1e-12).expand_as(blocks).reshape(value.shape)
    # q8_0: per block of 32, scale d = amax / 127 stored in f16; error <= d / 2 plus the scale's
    # own rounding times |q| <= 127.
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    bound = d * (0.5 + 127 * 2.0**-11) + 1e-12
    return bound.expand_as(blocks).reshape(value.shape)


def expected_metadata(cfg: LMConfig, outtype: str, vocab: Vocab | None = None
                      ) -> tuple[dict[str, Any], dict[str, float]]:
    """The metadata a file of `cfg` holds: (exact values, float values stored as float32).

    `vocab` None: the bundled GPT-2 tokenizer's keys."""
    arch = gguf_arch(cfg)
    vocab = vocab or Vocab([], [], [])
    exact: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": cfg.max_seq_len, f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.feed_forward_length": cfg.d_ff, f"{arch}.block_count": cfg.num_layers,
        f"{arch}.attention.head_count": cfg.num_heads,
        "general.file_type": int(_file_type(outtype)),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": vocab.pre,
        "tokenizer.ggml.bos_token_id": vocab.bos_id, "tokenizer.ggml.eos_token_id": vocab.eos_id,
        "tokenizer.ggml.add_bos_token": vocab.add_bos,
    }
    if arch == "gpt2":
        return exact, {f"{arch}.attention.layer_norm_epsilon": LAYER_NORM_EPS}
    exact.update({
        f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.rope.dimension_count": cfg.head_dim, f"{arch}.vocab_size": cfg.vocab_size,
    })
    return exact, {f"{arch}.rope.freq_base": cfg.rope_base,
                   f"{arch}.attention.layer_norm_rms_epsilon": cfg.norm_eps}


def check_gguf(path: str | Path | Any, cfg: LMConfig, tensors: dict[str, torch.Tensor],
               outtype: str, vocab: Vocab | None = None) -> dict[str, float]:
    """Read a written file back and check it against what llama.cpp's loader expects.

    Checks the architecture and hyper-parameter keys, the tokenizer keys, that the tensors are
    exactly those the loader creates with the shapes it expects, each in its type, and every
    value equal to the source (f32) or within its type's rounding.

    Args:
        path: the file, or a `gguf.GGUFReader` of it (reading one parses the whole
            vocabulary: about a second per 100,000 strings).
        cfg, tensors, outtype: what was written (`tensors` under llama.cpp's names, in its
            layout: `export_tensors`).
        vocab: the tokenizer written (None: the bundled GPT-2 one); its tokens are compared.

    Returns:
        The largest absolute difference from the source per stored type.

    Raises:
        GGUFExportError: naming the first thing that is not as expected.
    """
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path)) if isinstance(path, (str, Path)) else path
    path = reader.data.filename if hasattr(reader.data, "filename") else "the file"
    exact, floats = expected_metadata(cfg, outtype, vocab)
    for key, value in exact.items():
        got = _field(reader, key)
        if got != value:
            raise GGUFExportError(f"{path}: metadata {key} is {got!r}, expected {value!r}")
    for key, value in floats.items():
        got = _field(reader, key)
        if got is None or abs(got - value) > 1e-6 * abs(value):
            raise GGUFExportError(f"{path}: metadata {key} is {got!r}, expected {value!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if len(tokens) != cfg.vocab_size or (vocab is not None and tokens != vocab.tokens):
        raise GGUFExportError(f"{path}: the token list is not the tokenizer's ({len(tokens)} "
                              f"tokens, expected {cfg.vocab_size})")
    _check_tensors(path, reader, cfg, tensors, outtype)
    return _compare_values(path, reader, tensors, outtype)


def _check_tensors(path: Any, reader: Any, cfg: LMConfig, tensors: dict[str, torch.Tensor],
                   outtype: str) -> None:
    shapes = expected_tensors(cfg)
    stored = {t.name: t for t in reader.tensors}
    if set(stored) != set(shapes) or set(tensors) != set(shapes):
        extra, missing = sorted(set(stored) - set(shapes)), sorted(set(shapes) - set(stored))
        raise GGUFExportError(f"{path}: tensors do not match llama.cpp's {gguf_arch(cfg)} "
                              f"loader (unexpected {extra[:3]}, missing {missing[:3]})")
    for name, t in stored.items():
        kind = tensor_outtype(name, outtype)
        if tuple(int(n) for n in t.shape) != shapes[name] or t.tensor_type.name.lower() != kind:
            raise GGUFExportError(f"{path}: {name} is {t.tensor_type.name} "
                                  f"{tuple(int(n) for n in t.shape)}, expected {kind.upper()} "
                                  f"{shapes[name]}")


def _compare_values(path: Any, reader: Any, tensors: dict[str, torch.Tensor], outtype: str
                    ) -> dict[str, float]:
    gguf = _gguf()
    worst: dict[str, float] = {}
    for t in reader.tensors:
        kind = tensor_outtype(t.name, outtype)
        src = tensors[t.name]
        values = torch.from_numpy(np.array(  # a copy: the reader's arrays are read-only
            gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(src.shape))
        diff = (values - src).abs()
        if not bool((diff <= rounding_bound(src, kind)).all()):
            raise GGUFExportError(f"{path}: {t.name} differs from the source by "
                                  f"{float(diff.max()):.3g}, more than {kind} rounding allows")
        worst[kind] = max(worst.get(kind, 0.0), float(diff.max()))
    return worst
