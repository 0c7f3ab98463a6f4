"""GGUF export: our models as files that llama.cpp (and Ollama, LM Studio, llamafile) load.

GGUF is llama.cpp's one-file format: the architecture's hyper-parameters and the tokenizer as
key-value metadata, then every tensor. Our network is GPT-2's, so a model is written as
llama.cpp's `gpt2` architecture with the bundled GPT-2 tokenizer, through the `gguf` package
(llama.cpp's own Python library). What llama.cpp's GPT-2 loader reads, and so what is written:

- metadata: `gpt2.context_length` (max_seq_len), `gpt2.embedding_length` (d_model),
  `gpt2.feed_forward_length` (d_ff: the real width, not 4 x d_model), `gpt2.block_count`,
  `gpt2.attention.head_count`, `gpt2.attention.layer_norm_epsilon` (1e-5), `general.file_type`;
  the tokenizer as `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "gpt-2"` (GPT-2's
  pre-tokenizer), the token list with types, the BPE merges, `<|endoftext|>` as BOS and EOS and
  no BOS added to prompts (as GPT-2 and our tools tokenize);
- tensors, under llama.cpp's names (`GGUF_NAMES`), each (out, in) as `nn.Linear` keeps it; the
  LM head is not written: it is the token embedding (tied), which llama.cpp then reuses.

Types (`--outtype`): "f32" writes every tensor exactly; "f16" and "q8_0" convert the token
embedding and the blocks' four weight matrices (llama.cpp's 8-bit format: blocks of 32 weights
sharing one f16 scale), and keep LayerNorms, biases and the position embedding in f32, as
llama.cpp's own converter does. A model that llama.cpp cannot hold exactly is refused with one
line (`GGUFExportError`) before anything is written: another tokenizer than GPT-2's, a
vocabulary smaller than the tokenizer's, f16 weights out of range, q8_0 rows whose width is not
a multiple of 32. Every file is read back (`check_gguf`) before it replaces its target: the
metadata and tensor shapes llama.cpp's loader expects, and every tensor equal to the source
(f32) or within its type's rounding (f16, q8_0).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.lm import LMConfig
from model.tokenizer import BUNDLED_GPT2_DIR

OUTTYPES = ("f32", "f16", "q8_0")
ARCH = "gpt2"
EOT_ID = 50256  # <|endoftext|>: GPT-2's BOS and EOS
GPT2_VOCAB = 50257
LAYER_NORM_EPS = 1e-5
Q8_0_BLOCK = 32  # weights per q8_0 block (one f16 scale each)
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
# Tensors converted to the outtype; all others (1-D ones, the position embedding) stay f32.
_MATRICES = ("token_embd.weight", "attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
             "ffn_down.weight")


class GGUFExportError(ValueError):
    """A model cannot be written as GGUF exactly; the message is one actionable line."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("the GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _qtypes() -> dict[str, Any]:
    q = _gguf().GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0}


def _file_type(outtype: str):
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0}[outtype]


def gguf_name(name: str) -> str | None:
    """llama.cpp's name of one of our state-dict tensors (None for the tied LM head)."""
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
    """The tensors llama.cpp's GPT-2 loader creates, with their shapes in ggml order (ne:
    innermost dimension first, so an (out, in) matrix is (in, out))."""
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


def tensor_outtype(name: str, outtype: str) -> str:
    """The type a tensor is stored in: the outtype for the weight matrices, else f32."""
    return outtype if name.endswith(_MATRICES) else "f32"


def gguf_tensors(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 CPU tensor) for every tensor of a state dict, tied head left out."""
    for name, value in state_dict.items():
        new = gguf_name(name)
        if new is not None:
            yield new, value.detach().to("cpu", torch.float32).contiguous()


# -- the tokenizer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """The GPT-2 tokenizer as GGUF holds it: token strings (byte-level BPE text, as in
    vocab.json), their types, and the merges in rank order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]


def gpt2_vocab(vocab_size: int) -> Vocab:
    """The bundled GPT-2 tokenizer for a model of `vocab_size` tokens (ids past GPT-2's 50,257,
    a padded embedding, become unused `[PAD<id>]` tokens, as llama.cpp's converter writes them).

    Raises:
        GGUFExportError: `vocab_size` is smaller than GPT-2's vocabulary.
    """
    token_type = _gguf().TokenType
    if vocab_size < GPT2_VOCAB:
        raise GGUFExportError(
            f"the model has vocab_size {vocab_size} but the GPT-2 tokenizer has {GPT2_VOCAB} "
            "tokens: llama.cpp would produce ids the model has no embedding for")
    by_id = {i: t for t, i in json.loads((BUNDLED_GPT2_DIR / "vocab.json").read_text("utf-8"))
             .items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(token_type.CONTROL if i == EOT_ID else token_type.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(token_type.UNUSED))
    lines = (BUNDLED_GPT2_DIR / "merges.txt").read_text("utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    return Vocab(tokens, types, merges)


# -- checks --------------------------------------------------------------------------------------


def check_exportable(cfg: LMConfig, tensors: dict[str, torch.Tensor], outtype: str,
                     tokenizer: str) -> None:
    """Refuse, with one line, a model that llama.cpp cannot hold exactly in `outtype`.

    Raises:
        GGUFExportError: unknown outtype, an architecture other than GPT-2's, another
            tokenizer than GPT-2's, a vocabulary smaller
            than GPT-2's, f16 weights out of range, or q8_0 rows not a multiple of 32 wide.
    """
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    from model.hf_interop import is_gpt2

    if not is_gpt2(cfg):
        raise GGUFExportError("the GGUF export writes llama.cpp's gpt2 architecture only; this "
                              "model's architecture fields are not GPT-2's (use --to_hf)")
    if tokenizer != "gpt2":
        raise GGUFExportError(
            f"the model uses tokenizer {tokenizer!r}; the GGUF export writes the GPT-2 tokenizer "
            "only, so llama.cpp would tokenize differently (export with --to_hf instead)")
    if cfg.vocab_size < GPT2_VOCAB:
        gpt2_vocab(cfg.vocab_size)  # raises the one-line error
    for name, value in tensors.items():
        kind = tensor_outtype(name, outtype)
        if kind == "f16":
            big = float(value.abs().max())
            if big > F16_MAX:
                raise GGUFExportError(
                    f"{name} holds a weight of magnitude {big:.3g}, beyond f16's range "
                    f"({F16_MAX:g}); use --outtype f32")
        elif kind == "q8_0" and value.size(-1) % Q8_0_BLOCK:
            raise GGUFExportError(
                f"q8_0 needs rows whose width is a multiple of {Q8_0_BLOCK}, but {name} has rows "
                f"of {value.size(-1)}; use --outtype f16 or f32")


# -- writing -------------------------------------------------------------------------------------


def _encode(value: torch.Tensor, kind: str) -> np.ndarray:
    """A tensor as the numpy array the writer stores: float32, float16, or q8_0 bytes."""
    array = value.numpy()
    if kind == "f32":
        return array
    if kind == "f16":
        return array.astype(np.float16)
    gguf = _gguf()
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)


def write_gguf(path: str | Path, cfg: LMConfig, state_dict: dict[str, torch.Tensor],
               outtype: str = "f16", *, tokenizer: str = "gpt2", name: str = "small-lm",
               verify: bool = True) -> Path:
    """Write a model as a GGUF file that llama.cpp's `gpt2` architecture loads.

    The file is written next to `path` under a temporary name, read back and checked
    (`check_gguf`, unless `verify` is False), then renamed over `path`: a failure leaves no
    partial file.

    Args:
        path: the .gguf file to write; its folder must exist.
        cfg: the model's config.
        state_dict: its float weights (our names; the tied `lm_head.weight` may be present).
        outtype: "f32", "f16" or "q8_0" (see the module docstring).
        tokenizer: the model's tokenizer name; only "gpt2" can be exported.
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
    tensors = dict(gguf_tensors(state_dict))
    check_exportable(cfg, tensors, outtype, tokenizer)
    vocab = gpt2_vocab(cfg.vocab_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_block_count(cfg.num_layers)
        writer.add_head_count(cfg.num_heads)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        writer.add_bos_token_id(EOT_ID)
        writer.add_eos_token_id(EOT_ID)
        writer.add_add_bos_token(False)
        qtypes = _qtypes()
        for tname, value in tensors.items():
            kind = tensor_outtype(tname, outtype)
            writer.add_tensor(tname, _encode(value, kind), raw_dtype=qtypes[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if verify:
            check_gguf(tmp, cfg, tensors, outtype)
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
    # q8_0: per block of 32, scale d = amax / 127 stored in f16; error <= d / 2 plus the scale's
    # own rounding times |q| <= 127.
    blocks = value.reshape(-1, Q8_0_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    bound = d * (0.5 + 127 * 2.0**-11) + 1e-12
    return bound.expand_as(blocks).reshape(value.shape)


def check_gguf(path: str | Path | Any, cfg: LMConfig, tensors: dict[str, torch.Tensor],
               outtype: str) -> dict[str, float]:
    """Read a written file back and check it against what llama.cpp's GPT-2 loader expects.

    Checks the architecture and hyper-parameter keys, the tokenizer keys, that the tensors are
    exactly those the loader creates with the shapes it expects, each in its type, and every
    value equal to the source (f32) or within its type's rounding.

    Args:
        path: the file, or a `gguf.GGUFReader` of it (reading one parses the whole
            vocabulary: about a second per 100,000 strings).
        cfg, tensors, outtype: what was written (`tensors` under llama.cpp's names).

    Returns:
        The largest absolute difference from the source per stored type.

    Raises:
        GGUFExportError: naming the first thing that is not as expected.
    """
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path)) if isinstance(path, (str, Path)) else path
    path = reader.data.filename if hasattr(reader.data, "filename") else "the file"
    want = {
        "general.architecture": ARCH,
        f"{ARCH}.context_length": cfg.max_seq_len, f"{ARCH}.embedding_length": cfg.d_model,
        f"{ARCH}.feed_forward_length": cfg.d_ff, f"{ARCH}.block_count": cfg.num_layers,
        f"{ARCH}.attention.head_count": cfg.num_heads,
        "general.file_type": int(_file_type(outtype)),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": EOT_ID, "tokenizer.ggml.eos_token_id": EOT_ID,
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in want.items():
        got = _field(reader, key)
        if got != value:
            raise GGUFExportError(f"{path}: metadata {key} is {got!r}, expected {value!r}")
    eps = _field(reader, f"{ARCH}.attention.layer_norm_epsilon")
    if eps is None or abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise GGUFExportError(f"{path}: layer_norm_epsilon is {eps!r}, expected 1e-5")
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens") or [])
    if n_tokens != cfg.vocab_size:
        raise GGUFExportError(f"{path}: {n_tokens} tokens, expected {cfg.vocab_size}")
    shapes = expected_tensors(cfg)
    stored = {t.name: t for t in reader.tensors}
    if set(stored) != set(shapes):
        extra, missing = sorted(set(stored) - set(shapes)), sorted(set(shapes) - set(stored))
        raise GGUFExportError(f"{path}: tensors do not match llama.cpp's GPT-2 loader "
                              f"(unexpected {extra[:3]}, missing {missing[:3]})")
    worst: dict[str, float] = {}
    for name, t in stored.items():
        kind = tensor_outtype(name, outtype)
        if tuple(int(n) for n in t.shape) != shapes[name] or t.tensor_type.name.lower() != kind:
            raise GGUFExportError(f"{path}: {name} is {t.tensor_type.name} "
                                  f"{tuple(int(n) for n in t.shape)}, expected {kind.upper()} "
                                  f"{shapes[name]}")
        src = tensors[name]
        values = torch.from_numpy(np.array(  # a copy: the reader's arrays are read-only
            gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(src.shape))
        diff = (values - src).abs()
        if not bool((diff <= rounding_bound(src, kind)).all()):
            raise GGUFExportError(f"{path}: {name} differs from the source by "
                                  f"{float(diff.max()):.3g}, more than {kind} rounding allows")
        worst[kind] = max(worst.get(kind, 0.0), float(diff.max()))
    return worst
