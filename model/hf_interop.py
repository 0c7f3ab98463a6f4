"""Hugging Face GPT-2 and our `LanguageModel`: the one place that reads HF folders and names.

Llama, Qwen2 and Qwen3 folders go through the same functions: their configs and weight names
are mapped in `model/hf_families.py`, chosen here by `model_type` or by the weight names.

For GPT-2 the networks are the same; the differences are names of config fields and the layout
of the projection weights: Hugging Face stores them in `Conv1D` modules as (in, out), we use
`nn.Linear` with (out, in).

Reading a Hugging Face model goes through here for everyone (`convert.py --from_hf`,
`train_lm.py --init_from`, `LanguageModel.from_hf_gpt2`): `hf_folder` turns a local folder or
a hub name (via the local Hugging Face cache, downloading when online) into a folder,
`read_hf_folder` reads its config and weights without unpickling anything but tensors, and
`checkpoint_from_hf` maps them to one of our checkpoint dicts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from model.config import LMConfig

# Weight files of a Hugging Face folder, in the order we look for them.
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks saved by old transformers
# What a hub download needs: config, weights (safetensors preferred) and tokenizer files, an
# instruct model's chat template included (newer repos keep it in its own file).
_HUB_FILES = ["config.json", _SAFETENSORS, _SAFETENSORS_INDEX, "model-*.safetensors",
              "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"]
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HFLoadError(ValueError):
    """A Hugging Face model cannot be found or read; the message is one actionable line."""

# Weights that Hugging Face keeps as Conv1D (in, out) and we keep as Linear (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf_config: Any) -> LMConfig:
    """Our config for a `transformers.GPT2Config`, `LlamaConfig`, `Qwen2Config` or
    `Qwen3Config` (or its dict).

    Raises:
        ValueError: another model type, or an option this model does not implement (one line).
    """
    from model.hf_families import FAMILIES, config_from_family

    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if c.get("model_type") in FAMILIES:
        return config_from_family(c)
    if c.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"unsupported model_type {c.get('model_type')!r} (supported: gpt2, "
                         f"{', '.join(FAMILIES)})")
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


def is_gpt2(cfg: LMConfig) -> bool:
    """Whether every architecture field of `cfg` has GPT-2's value (its default)."""
    default = LMConfig()
    return all(getattr(cfg, key) == getattr(default, key) for key in LMConfig.ARCHITECTURE_KEYS
               if key not in ("num_kv_heads", "head_dim")) \
        and cfg.num_kv_heads == cfg.num_heads and cfg.head_dim * cfg.num_heads == cfg.d_model


def config_to_hf(cfg: LMConfig):
    """A transformers config describing the same network as `cfg`: a `GPT2Config` for GPT-2's
    architecture, else a `LlamaConfig`, `Qwen2Config` or `Qwen3Config`
    (`model.hf_families.config_to_family`).

    A `GPT2Config` also holds `n_ctx` (the context again, as GPT-2's released configs have it):
    transformers no longer writes it, but llama.cpp's `convert_hf_to_gguf.py` reads it.

    Raises:
        ValueError: `cfg` has no exact Hugging Face equivalent (one line naming the setting).
    """
    if not is_gpt2(cfg):
        from model.hf_families import config_to_family

        if cfg.positions == "learned":
            raise ValueError("learned positions with a non-GPT-2 architecture have no Hugging "
                             "Face equivalent (GPT-2 needs every architecture field's default)")
        return config_to_family(cfg)
    from transformers import GPT2Config

    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when it exists
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=True, architectures=["GPT2LMHeadModel"],
    )


def hf_state_dict_for_model(sd: dict[str, Any]) -> dict[str, Any]:
    """Keys of a `GPT2LMHeadModel` for weights saved by `GPT2LMHeadModel` or `GPT2Model`."""
    out = {}
    for key, value in sd.items():
        if key.endswith(_HF_BUFFERS):
            continue  # causal-mask buffers of older transformers versions, not weights
        out[key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key] = value
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a `GPT2LMHeadModel` (or `GPT2Model`) state dict, or from a Llama,
    Qwen2 or Qwen3 `...ForCausalLM` one (told apart by the weight names)."""
    from model.hf_families import is_family_state_dict, state_dict_from_family

    if is_family_state_dict(sd):
        return state_dict_from_family(sd)
    out = {name: value.t().contiguous() if name.endswith(_TRANSPOSED) else value
           for name, value in hf_state_dict_for_model(sd).items()}
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor],
                     cfg: LMConfig | None = None) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ours: `GPT2LMHeadModel`'s (lm_head kept: it is tied to
    wte), or, for a `cfg` that is not GPT-2, that of `config_to_hf(cfg)`'s model class.

    Raises:
        ValueError: weights without a position table (not GPT-2) and no `cfg`.
    """
    if cfg is not None and not is_gpt2(cfg):
        from model.hf_families import state_dict_to_family

        return state_dict_to_family(sd, cfg)
    if "transformer.wpe.weight" not in sd:
        raise ValueError("these weights are not GPT-2's (no wpe): pass their config")
    return {k: (v.t().contiguous() if k.endswith(_TRANSPOSED) else v) for k, v in sd.items()
            if not k.startswith("_")}


# -- finding and reading a Hugging Face model ---------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def looks_like_hub_name(name: str) -> bool:
    """Whether `name` could be a hub model id (`gpt2`, `openai-community/gpt2-medium`)."""
    return bool(_HUB_NAME.fullmatch(name)) and not name.endswith((".pt", ".safetensors", ".bin"))


def _hub_cache() -> Path:
    """The hub cache folder, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_folder(name_or_dir: str | Path) -> Path:
    """A local Hugging Face model folder for a folder path or a hub name.

    A hub name is looked up in the local Hugging Face cache first (no network); when it is not
    there and the hub is not switched off (`HF_HUB_OFFLINE`), its config, weights and tokenizer
    files are downloaded into that cache, as `from_pretrained` would.

    Raises:
        HFLoadError: neither a folder nor a cached or downloadable model (one line, saying how
            to get the weights).
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if not looks_like_hub_name(name):
        raise HFLoadError(f"{name}: no such folder, and not a Hugging Face model name")
    from huggingface_hub import snapshot_download

    cache = _hub_cache()
    try:
        return Path(snapshot_download(name, cache_dir=str(cache), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or a broken cache entry): try the hub
        pass
    how = (f"get it with: huggingface-cli download {name} --local-dir {name.split('/')[-1]} "
           "(online), then pass that folder")
    if _offline():
        raise HFLoadError(f"{name}: no such file or folder, and Hugging Face model {name!r} is "
                          f"not in the local cache ({cache}) while offline; {how}")
    try:
        return Path(snapshot_download(name, cache_dir=str(cache), allow_patterns=_HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown repo: one line
        raise HFLoadError(f"{name}: no such file or folder, and downloading Hugging Face model "
                          f"{name!r} failed ({_first_line(exc)[:120]}); {how}") from None


def read_hf_folder(src: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read `config.json` and the weights of a local Hugging Face GPT-2 folder.

    Weights come from `model.safetensors`, else `pytorch_model.bin` (loaded with
    `weights_only=True`), or their sharded forms.

    Returns:
        (config dict, state dict as saved by Hugging Face, on the CPU).

    Raises:
        HFLoadError: missing/invalid config or weight files.
    """
    src = Path(src)
    if not src.is_dir():
        raise HFLoadError(f"{src} is not a folder; a Hugging Face model is a folder with "
                          "config.json and model.safetensors")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise HFLoadError(f"no config.json in {src}: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFLoadError(f"could not read {config_path}: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise HFLoadError(f"{config_path} does not hold a JSON object")
    return config, _read_weights(src)


def _read_weights(src: Path) -> dict[str, Any]:
    if (src / _SAFETENSORS).is_file():
        return _load_safetensors(src / _SAFETENSORS)
    if (src / _SAFETENSORS_INDEX).is_file():
        return _load_shards(src / _SAFETENSORS_INDEX, _load_safetensors)
    if (src / _BIN).is_file():
        return _load_bin(src / _BIN)
    if (src / _BIN_INDEX).is_file():
        return _load_shards(src / _BIN_INDEX, _load_bin)
    raise HFLoadError(f"no {_SAFETENSORS} or {_BIN} in {src}; the folder holds no weights")


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise HFLoadError(f"could not read {path}: {_first_line(exc)}") from None


def _load_bin(path: Path) -> dict[str, Any]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise HFLoadError(
                f"refusing to load {path}: it holds Python objects{what} that a safe "
                "weights_only load does not allow (unpickling them could run code); use "
                "model.safetensors instead"
            ) from None
        raise HFLoadError(f"could not read {path}: {_first_line(exc)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HFLoadError(f"{path} does not hold a state dict of tensors")
    return sd


def _load_shards(index_path: Path, load) -> dict[str, Any]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HFLoadError(f"could not read {index_path}: {_first_line(exc)}") from None
    sd: dict[str, Any] = {}
    for shard in shards:
        path = index_path.parent / shard
        if not path.is_file():
            raise HFLoadError(f"{index_path.name} lists {shard}, which is missing")
        sd.update(load(path))
    return sd


def _tokenizer_of(folder: Path) -> str:
    """The tokenizer to record: "gpt2" (bundled) unless the folder holds a different one."""
    from model.tokenizer import BUNDLED_GPT2_DIR

    vocab = folder / "vocab.json"
    if not (vocab.is_file() or (folder / "tokenizer.json").is_file()):
        return "gpt2"
    try:
        same = vocab.read_bytes() == (BUNDLED_GPT2_DIR / "vocab.json").read_bytes()
    except OSError:
        same = False
    return "gpt2" if same else str(folder)


def checkpoint_from_hf(hf_config: dict[str, Any], hf_sd: dict[str, Any],
                       src: str | Path) -> dict[str, Any]:
    """One of our checkpoint dicts (`model_config`, `model_state_dict`, `tokenizer`, `_path`)
    from what `read_hf_folder` read. Weight shapes are checked by whoever builds the model.

    Raises:
        HFLoadError: not a GPT-2, Llama, Qwen2 or Qwen3 config this model implements, or no
            token embedding.
    """
    from model.hf_families import FAMILIES

    family = hf_config.get("model_type") in FAMILIES
    try:
        cfg = config_from_hf(hf_config)
    except KeyError as exc:
        what = hf_config["model_type"] if family else "GPT-2"
        raise HFLoadError(f"config.json of {src} lacks {exc.args[0]!r}; not a {what} "
                          "config") from None
    except (ValueError, TypeError) as exc:
        raise HFLoadError(f"{src}: {_first_line(exc)}") from None
    if family and "model.embed_tokens.weight" not in hf_sd:
        raise HFLoadError(f"no token embedding (model.embed_tokens.weight) in the weights of "
                          f"{src}")
    if not family and "transformer.wte.weight" not in hf_state_dict_for_model(hf_sd):
        raise HFLoadError(f"no token embedding (wte.weight) in the weights of {src}")
    return {"model_config": cfg.to_dict(), "model_state_dict": state_dict_from_hf(hf_sd),
            "tokenizer": _tokenizer_of(Path(src)), "_path": str(src)}


def read_hf_checkpoint(name_or_dir: str | Path) -> dict[str, Any]:
    """`hf_folder` + `read_hf_folder` + `checkpoint_from_hf`: a folder or hub name as one of
    our checkpoint dicts (on the CPU). Raises HFLoadError (one line)."""
    folder = hf_folder(name_or_dir)
    try:
        hf_config, hf_sd = read_hf_folder(folder)
    except HFLoadError as exc:
        if Path(name_or_dir).expanduser().is_dir():
            raise
        name = str(name_or_dir)  # a hub name whose cache entry is incomplete (e.g. tokenizer only)
        raise HFLoadError(f"{exc}; the local Hugging Face cache holds only part of {name!r}: "
                          f"get the weights with huggingface-cli download {name}") from None
    return checkpoint_from_hf(hf_config, hf_sd, folder)
