#!/usr/bin/env python
"""Move weights between this repo and Hugging Face, and out to llama.cpp (GGUF).

    # A Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (config.json + model.safetensors or
    # pytorch_model.bin) or hub name -> one of our checkpoints, loadable by generate_lm.py and
    # the guide's code (it records the folder's tokenizer):
    python convert.py --from_hf path/to/gpt2 --out gpt2.pt

    # Our checkpoint -> a Hugging Face folder (config.json, model.safetensors, tokenizer files)
    # that GPT2LMHeadModel / AutoTokenizer.from_pretrained load offline (lm-eval, HF generate):
    python convert.py --to_hf hf_model --checkpoint lm_shakespeare/snapshots/latest.pt

    # Our checkpoint -> weights-only safetensors, config in the metadata ("model_config"):
    python convert.py --to_safetensors model.safetensors --checkpoint latest.pt

    # Our checkpoint (or run directory, or safetensors export) -> one GGUF file for llama.cpp,
    # Ollama, LM Studio (llama.cpp's gpt2, llama, qwen2 or qwen3 architecture, with the model's
    # tokenizer): f32 (exact), f16, q8_0 or q4_0 (llama.cpp's 8- and 4-bit formats); see
    # model/gguf_export.py
    python convert.py --to_gguf model.gguf --checkpoint lm_shakespeare --outtype f16

Every conversion checks its result: the converted model's logits must match the source's on a
random input, and a GGUF file is read back and compared with the source tensor by tensor (skip
with --no_verify). Nothing is unpickled beyond tensors (`weights_only=True`), and outputs are
written atomically; an existing output is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.cli import OneLineParser
from common.fileio import atomic_write, write_folder

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")  # --to_gguf's tensor types (model.gguf_export.OUTTYPES)


class ConvertError(ValueError):
    """A conversion cannot be done; the message is one actionable line."""


# -- checks shared by every direction ------------------------------------------------------------


def load_weights_strict(model, state_dict: dict[str, Any]) -> None:
    """`model.load_state_dict(strict=True)` with a one-line error naming the first problem."""
    expected = model.state_dict()
    for name, value in state_dict.items():
        if name not in expected:
            raise ConvertError(f"unexpected weight {name!r}: not a GPT-2 language model?")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ConvertError(
                f"shape mismatch for {name}: the weights have {tuple(value.shape)} but the "
                f"config needs {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ConvertError(f"missing weight {missing[0]!r} ({len(missing)} missing in all)")
    model.load_state_dict(state_dict, strict=True)


def verify_logits(ours, hf, vocab_size: int, seq_len: int, label: str) -> float:
    """Compare our model's logits with a Hugging Face model's on one random batch (fp32, CPU).

    Returns:
        The max absolute difference.

    Raises:
        RuntimeError: when the logits differ by more than float32 noise.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab_size, (2, min(seq_len, 16)), generator=gen)
    was = ours.training, hf.training
    ours.eval()
    hf.eval()
    try:
        with torch.no_grad():
            a = ours(idx).float()
            b = hf(input_ids=idx).logits.float()
    finally:
        ours.train(was[0])
        hf.train(was[1])
    diff = float((a - b).abs().max())
    # Same network, same fp32 weights: only summation order differs. A mapping error (a
    # transposed or misplaced matrix) gives differences of the order of the logits themselves.
    tolerance = 1e-4 * (1.0 + float(b.abs().max()))
    if not diff <= tolerance:
        raise RuntimeError(
            f"{label}: logits differ by {diff:.3g} (> {tolerance:.3g}); the conversion is wrong"
        )
    return diff


# -- the three directions ------------------------------------------------------------------------


def from_hf(
    src: str | Path, out: str | Path, *, tokenizer: str | None = None, force: bool = False,
    verify: bool = True,
) -> Path:
    """Convert a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 model into one of our checkpoints,
    with its tokenizer.

    Args:
        src: folder with config.json and model.safetensors / pytorch_model.bin (or sharded), or
            a hub name (`model.hf_interop.hf_folder`: the local cache, downloaded when online).
        out: the checkpoint to write (.pt).
        tokenizer: the tokenizer to store in the checkpoint; None: the folder's own (GPT-2's,
            by name, when the folder holds GPT-2's files or none).
        force: replace an existing `out`.
        verify: check our logits against transformers' model on the same weights.

    Returns:
        The path written.
    """
    from model.hf_interop import (
        checkpoint_from_hf,
        hf_folder,
        looks_like_hub_name,
        read_hf_folder,
    )
    from model.lm import LanguageModel, LMConfig
    from model.tokenizer import load_checkpoint_tokenizer, tokenizer_record

    out = _check_output(out, force)
    if not Path(src).is_dir():
        if Path(src).exists() or not looks_like_hub_name(str(src)):
            raise ConvertError(f"{src} is not a folder; --from_hf needs a Hugging Face model "
                               "folder")
        src = hf_folder(src)  # a hub name: the local cache (downloaded when online)
    hf_config, hf_sd = read_hf_folder(src)  # the one HF reader (train_lm.py --init_from too)
    ckpt = checkpoint_from_hf(hf_config, hf_sd, src)
    cfg = LMConfig.from_dict(ckpt["model_config"])
    record = tokenizer_record(tokenizer or ckpt["tokenizer"])  # the folder's files, if not GPT-2's
    tok = load_checkpoint_tokenizer(record)
    if len(tok) > cfg.vocab_size:
        raise ConvertError(f"tokenizer {record['tokenizer']!r} has {len(tok):,} tokens but the "
                           f"model's vocabulary has {cfg.vocab_size:,}; pass the tokenizer it "
                           "was trained with (--tokenizer)")
    model = LanguageModel.from_config(cfg)
    load_weights_strict(model, ckpt["model_state_dict"])
    if verify:
        verify_logits(model, _hf_model_of(hf_config, hf_sd), cfg.vocab_size, cfg.max_seq_len,
                      f"--from_hf {src}")
    checkpoint = {
        "model_config": cfg.to_dict(),
        "model_state_dict": model.state_dict(),
        **record,
        "step": 0,
        "epoch": 0,
        "val_loss": None,
        "source": f"converted from Hugging Face folder {Path(src).name}",
    }
    import torch

    with atomic_write(out) as fh:
        torch.save(checkpoint, fh)
    return out


def _hf_model_of(hf_config: dict[str, Any], hf_sd: dict[str, Any]):
    """transformers' own model of a Hugging Face config dict, holding `hf_sd` (for checks)."""
    from model.hf_families import FAMILIES
    from model.hf_interop import hf_state_dict_for_model

    if hf_config.get("model_type") in FAMILIES:
        from transformers import AutoConfig, AutoModelForCausalLM

        rest = {k: v for k, v in hf_config.items() if k != "model_type"}
        config = AutoConfig.for_model(hf_config["model_type"], **rest)
        # float32 whatever dtype the config names (released models say bfloat16)
        hf = AutoModelForCausalLM.from_config(config).float()
        missing = set(hf.load_state_dict(hf_sd, strict=False).missing_keys)
        if missing - {"lm_head.weight"} or (missing and not config.tie_word_embeddings):
            raise ConvertError(f"missing weight {sorted(missing)[0]!r} in the folder's weights")
        hf.tie_weights()  # lm_head: absent when tied
        return hf
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config))
    hf.load_state_dict(hf_state_dict_for_model(hf_sd), strict=False)  # lm_head: tied
    return hf


def to_hf(checkpoint: str | Path, out_dir: str | Path, *, force: bool = False,
          verify: bool = True) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer) for a checkpoint.

    Args:
        checkpoint: one of our checkpoints (anything `model.checkpoint.load_model` accepts).
        out_dir: the folder to create.
        force: replace an existing, non-empty `out_dir`.
        verify: check the Hugging Face model's logits against ours on the same weights.

    Returns:
        The folder written.
    """
    from transformers import AutoModelForCausalLM

    from model.checkpoint import load_model
    from model.hf_interop import config_to_hf, state_dict_to_hf
    from model.tokenizer import checkpoint_tokenizer_name, load_checkpoint_tokenizer

    out_dir = _check_output(out_dir, force, folder=True)
    model, ckpt = load_model(checkpoint, device="cpu")  # a stored tokenizer is checked here
    tokenizer = load_checkpoint_tokenizer(ckpt)  # before any work: it must load
    cfg = model.config
    # GPT2LMHeadModel, or LlamaForCausalLM/Qwen2ForCausalLM/Qwen3ForCausalLM (model/hf_families.py)
    hf = AutoModelForCausalLM.from_config(config_to_hf(cfg))
    hf.load_state_dict(state_dict_to_hf(model.state_dict(), cfg), strict=True)
    if verify:
        verify_logits(model, hf, cfg.vocab_size, cfg.max_seq_len, f"--to_hf {checkpoint}")
    if checkpoint_tokenizer_name(ckpt) != "gpt2":  # its own end (and start) token, not GPT-2's
        _set_special_ids(hf, tokenizer)

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(ckpt, tmp, cfg.max_seq_len)

    write_folder(out_dir, write)
    return out_dir


def to_gguf(checkpoint: str | Path, out: str | Path, outtype: str = "f16", *,
            force: bool = False, verify: bool = True) -> Path:
    """Write a checkpoint as one GGUF file for llama.cpp's matching architecture: `gpt2` for
    GPT-2's blocks, `llama`, `qwen2` or `qwen3` for Llama/Qwen-shaped models, with the
    checkpoint's own tokenizer (`tokenizer_for_export`).

    Args:
        checkpoint: our checkpoint, run directory, snapshots directory or `.safetensors` export
            (anything `model.checkpoint.read_weights_source` reads, Hugging Face folders too).
        out: the .gguf file to write; its folder must exist.
        outtype: "f32" (exact), "f16", "q8_0" or "q4_0"; see `model/gguf_export.py`.
        force: replace an existing `out`.
        verify: read the file back and compare every tensor with the source before it
            replaces `out` (a few seconds: the reader parses the 50,257-token vocabulary).

    Returns:
        The path written.

    Raises:
        ConvertError, GGUFExportError, CheckpointError: one line; nothing is written.
    """
    from model import gguf_export
    from model.checkpoint import read_weights_source, validate_weights

    if outtype not in gguf_export.OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r}; use one of "
                           f"{', '.join(gguf_export.OUTTYPES)}")
    out = _check_output(out, force)
    if not out.parent.is_dir():
        raise ConvertError(f"folder {out.parent} does not exist; create it first or give "
                           "another output path")
    source = Path(checkpoint).expanduser()
    if source.is_file() and source.open("rb").read(4) == b"GGUF":
        raise ConvertError(f"{checkpoint} is already a GGUF file (its weights may be quantized);"
                           " export from the checkpoint it was made from")
    ckpt = read_weights_source(checkpoint)
    cfg, state = validate_weights(ckpt)
    gguf_export.gguf_arch(cfg)  # an unrepresentable model is refused before the tokenizer loads
    return gguf_export.write_gguf(out, cfg, state, outtype, tokenizer=tokenizer_for_export(ckpt),
                                  name=_model_name(ckpt.get("_path", checkpoint)),
                                  verify=verify)


def tokenizer_for_export(ckpt: dict[str, Any]) -> Any:
    """The tokenizer a GGUF export writes into the file: "gpt2" (the bundled GPT-2 tokenizer,
    which `model.gguf_export` writes from its files) or the checkpoint's tokenizer, loaded.

    The one place the export gets a checkpoint's tokenizer: today a checkpoint names it
    (`ckpt["tokenizer"]`: "gpt2", a folder or a hub name).

    Raises:
        ConvertError: the named tokenizer cannot be loaded (one line).
    """
    from model.tokenizer import TokenizerLoadError, load_tokenizer

    name = _tokenizer_name(ckpt)
    if name == "gpt2":
        return name
    try:
        return load_tokenizer(name)
    except TokenizerLoadError as exc:
        cause = _first_line(exc).split("; use --tokenizer")[0]
        raise ConvertError(f"{cause}: the checkpoint's tokenizer, which the GGUF file must "
                           "hold") from None


def to_safetensors(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write a checkpoint's weights as safetensors, with its config in the metadata.

    The metadata holds "model_config" (the JSON of our config dict) and "tokenizer"; a stored
    tokenizer's text files go along as "tokenizer_files" (JSON of {file name: text}) and
    "tokenizer_sha256".
    `lm_head.weight` is left out when it is the token embedding (tied), as in Hugging Face
    files.

    Returns:
        The path written.
    """
    from safetensors.torch import save

    from model.checkpoint import load_model

    out = _check_output(out, force)
    model, ckpt = load_model(checkpoint, device="cpu")
    tied = model.config.tie_embeddings
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    metadata = {
        "format": "pt",
        "model_config": json.dumps(model.config.to_dict()),
        "tokenizer": _tokenizer_name(ckpt),
    }
    with atomic_write(out) as fh:
        fh.write(save(tensors, metadata={**metadata, **_tokenizer_metadata(ckpt)}))
    return out


# -- helpers -------------------------------------------------------------------------------------


def _model_name(path: str | Path) -> str:
    """`general.name` for a GGUF export: the run's folder name, else the file's stem."""
    p = Path(path).resolve()
    if p.is_file() and p.parent.name == "snapshots":
        return p.parent.parent.name
    return p.stem if p.is_file() else p.name


def _tokenizer_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """A stored tokenizer as safetensors metadata (str values): its text files as JSON."""
    from model.tokenizer import FILES_KEY, SHA256_KEY, has_embedded_tokenizer

    if not has_embedded_tokenizer(ckpt):
        return {}
    texts = {}
    for name, data in ckpt[FILES_KEY].items():
        try:
            texts[name] = data if isinstance(data, str) else data.decode("utf-8")
        except UnicodeDecodeError:  # e.g. a sentencepiece model; tokenizer.json suffices
            continue
    return {FILES_KEY: json.dumps(texts), SHA256_KEY: str(ckpt.get(SHA256_KEY) or "")}


def _tokenizer_name(ckpt: Any) -> str:
    name = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    return name if isinstance(name, str) and name else "gpt2"


def _set_special_ids(hf: Any, tokenizer: Any) -> None:
    """The Hugging Face model's end, start and padding ids: the tokenizer's."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    for config in (hf.config, hf.generation_config):
        config.eos_token_id, config.bos_token_id = eos, bos
    hf.generation_config.pad_token_id = tokenizer.pad_token_id


def _save_tokenizer(ckpt: dict[str, Any], folder: Path, max_seq_len: int) -> None:
    """Put the checkpoint's tokenizer files into `folder`: its stored files, the bundled GPT-2
    files, or the named tokenizer's."""
    from model.tokenizer import write_checkpoint_tokenizer

    write_checkpoint_tokenizer(ckpt, folder)
    # The tokenizer should not claim a longer context than this model has.
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tok_config["model_max_length"] = max_seq_len
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def _check_output(path: str | Path, force: bool, folder: bool = False) -> Path:
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise ConvertError(f"{path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise ConvertError(f"{path} exists and is not empty; pass --force to replace it")
    else:
        if path.is_dir():
            raise ConvertError(f"{path} is a folder; give a file path")
        if path.exists() and not force:
            raise ConvertError(f"{path} exists; pass --force to replace it")
    return path


def _note_llama_cpp_ffn(folder: Path) -> None:
    """Warn where llama.cpp's own converter would write a wrong file from this folder."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        return  # only GPT-2's converter guesses the width
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        print(f"convert.py: note: llama.cpp's convert_hf_to_gguf.py takes GPT-2's feed-forward "
              f"width as 4 x n_embd ({4 * config['n_embd']}), not this model's "
              f"{config['n_inner']}; for llama.cpp use --to_gguf instead", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="convert.py",
        description="Convert weights between this repo's checkpoints and Hugging Face (GPT-2, "
        "Llama, Qwen2, Qwen3), and export them as GGUF for llama.cpp and Ollama.",
        epilog="Examples: --from_hf hf_gpt2/ --out gpt2.pt | --to_hf hf_out/ --checkpoint "
        "ckpt.pt | --to_safetensors model.safetensors --checkpoint ckpt.pt | --to_gguf "
        "model.gguf --checkpoint lm_shakespeare --outtype q8_0",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from_hf", metavar="DIR",
                      help="Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (or hub name) to "
                           "convert into a checkpoint")
    mode.add_argument("--to_hf", metavar="OUT_DIR",
                      help="write --checkpoint as a Hugging Face folder")
    mode.add_argument("--to_safetensors", metavar="OUT",
                      help="write --checkpoint as safetensors with the config in its metadata")
    mode.add_argument("--to_gguf", metavar="FILE",
                      help="write --checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--outtype", choices=OUTTYPES, default=None,
                   help="tensor type of --to_gguf: f32 (exact), f16 (default), q8_0 or q4_0 "
                        "(llama.cpp's 8- and 4-bit formats)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="our checkpoint, run directory or .safetensors export (for --to_hf, "
                        "--to_safetensors and --to_gguf)")
    p.add_argument("--out", metavar="PATH",
                   help="checkpoint to write with --from_hf (default: ./<DIR name>.pt)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer stored in the --from_hf checkpoint (default: the folder's "
                        "own; GPT-2's when it holds none)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no_verify", action="store_true",
                   help="skip the logits check against transformers (saves memory on big models)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.outtype is not None and args.to_gguf is None:
        parser.error("--outtype is for --to_gguf")
    if args.from_hf is not None:
        if args.checkpoint is not None:
            parser.error("--checkpoint is for --to_hf/--to_safetensors/--to_gguf; --from_hf "
                         "reads DIR")
    else:
        if args.checkpoint is None:
            flag = next(f"--{k}" for k in ("to_hf", "to_safetensors", "to_gguf")
                        if getattr(args, k) is not None)
            parser.error(f"{flag} needs --checkpoint PATH")
        if args.out is not None:
            parser.error("--out is for --from_hf; give the output path to the flag itself")
    try:
        if args.from_hf is not None:
            out = args.out or f"{Path(args.from_hf).resolve().name}.pt"
            path = from_hf(args.from_hf, out, tokenizer=args.tokenizer, force=args.force,
                           verify=not args.no_verify)
            print(f"wrote checkpoint {path}")
        elif args.to_hf is not None:
            path = to_hf(args.checkpoint, args.to_hf, force=args.force,
                         verify=not args.no_verify)
            print(f"wrote Hugging Face folder {path}")
            _note_llama_cpp_ffn(path)
        elif args.to_gguf is not None:
            outtype = args.outtype or "f16"
            path = to_gguf(args.checkpoint, args.to_gguf, outtype, force=args.force,
                           verify=not args.no_verify)
            print(f"wrote GGUF file {path} ({outtype}, {path.stat().st_size / 1e6:.1f} MB)")
        else:
            path = to_safetensors(args.checkpoint, args.to_safetensors, force=args.force)
            print(f"wrote {path}")
    except RuntimeError as exc:  # failed verification: not a usage error
        print(f"convert.py: error: {_first_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # ConvertError, CheckpointError, config errors
        print(f"convert.py: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
