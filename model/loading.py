"""Loading a checkpoint and its tokenizer for inference: the one loader of the scripts.

`load_for_inference` reads a checkpoint, picks its tokenizer (the one asked for, else the
checkpoint's: `model.tokenizer.load_checkpoint_tokenizer`) and builds the model on a device in a
weight format; `generate_lm.py`, `serve_lm.py` and `evaluate_lm.py` all load through it.
`load_runtime` adds what the generation CLI and the server do around it from their runtime flags
(`common.cli.Runtime`): the device, the weight format `--dtype`/`--quantize` ask for
(`weight_format`), the default checkpoint, and one-line `LoadError`s that name the flag to change.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.cli import Runtime
from model.checkpoint import (
    CheckpointError,
    DeviceError,
    build_model,
    find_default_checkpoint,
    pick_device,
    read_weights_source,
)
from model.lm import LanguageModel
from model.tokenizer import (
    TokenizerLoadError,
    checkpoint_tokenizer_name,
    has_embedded_tokenizer,
    load_checkpoint_tokenizer,
    load_tokenizer,
)


class LoadError(ValueError):
    """The model cannot be loaded as asked; the message is one line that names the flag to
    change."""


@dataclass
class Loaded:
    """A model ready for inference, with its tokenizer and where it came from.

    Attributes:
        model: the `LanguageModel`, on its device, in eval-ready weights.
        tokenizer: its tokenizer.
        checkpoint: the checkpoint dict (`_path` is the file read; `step`, `val_loss` if saved).
        tokenizer_name: the name or folder the tokenizer was loaded from ("NAME (stored in the
            checkpoint)" for a tokenizer whose files the checkpoint holds).
        amp_dtype: the autocast dtype to compute in, or None for plain float32.
        seconds: how long loading took.
    """

    model: LanguageModel
    tokenizer: Any
    checkpoint: dict[str, Any]
    tokenizer_name: str
    amp_dtype: torch.dtype | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """The `loaded <path> (step, val_loss, params, context, device and weights)` line."""
        ckpt, model, dtype = self.checkpoint, self.model, self.amp_dtype
        bits = [f"step {ckpt['step']}" if "step" in ckpt else None,
                f"val_loss {ckpt['val_loss']:.4g}" if isinstance(ckpt.get("val_loss"), float)
                else None,
                f"{ckpt['val_bpb']:.4g} bits/byte" if isinstance(ckpt.get("val_bpb"), float)
                else None,
                f"{model.num_params() / 1e6:.2f}M params",
                f"context {model.max_seq_len}",
                f"{model.device}, " + (f"{model.quantization} weights"
                                       if model.quantization != "none"
                                       else "float32" if dtype is None
                                       else f"{str(dtype).replace('torch.', '')} autocast")]
        return f"loaded {ckpt['_path']} (" + ", ".join(b for b in bits if b) + ")"


def load_for_inference(checkpoint: str | Path, *, device: str | torch.device = "auto",
                       weights: str = "none", tokenizer: str | None = None,
                       allow_nonfinite: bool = False) -> Loaded:
    """Read a checkpoint and build its model and tokenizer.

    Args:
        checkpoint: a checkpoint file (.pt or .safetensors), a run folder or its snapshots/, or
            a Hugging Face folder or cached hub name of GPT-2, Llama, Qwen2 or Qwen3.
        device: where the model goes (a name for `model.checkpoint.pick_device`, or a device).
        weights: the weight format (`LanguageModel.quantize`): none, bf16 or int8.
        tokenizer: the tokenizer's name or folder; None: the checkpoint's (its stored files,
            else the name it records, else gpt2).
        allow_nonfinite: build a model with NaN/inf weights instead of refusing it.

    Returns:
        The `Loaded` model (its `amp_dtype` None: the caller decides how to compute).

    Raises:
        DeviceError: no such device.
        CheckpointError: the checkpoint cannot be read or does not fit its config.
        TokenizerLoadError: the tokenizer cannot be loaded.
    """
    start = time.perf_counter()
    if not isinstance(device, torch.device):
        device = pick_device(device)
    ckpt = read_weights_source(checkpoint)  # ours, or a Hugging Face folder or hub name
    if tokenizer is not None:
        name, tok = tokenizer, load_tokenizer(tokenizer)
    else:
        name, tok = checkpoint_tokenizer_name(ckpt), load_checkpoint_tokenizer(ckpt)
        if has_embedded_tokenizer(ckpt):
            name = f"{name} (stored in the checkpoint)"
    model = build_model(ckpt, device, tok, allow_nonfinite=allow_nonfinite)
    model.quantize(weights)
    return Loaded(model, tok, ckpt, name, seconds=time.perf_counter() - start)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype, or None for plain float32."""
    if name == "float32":
        return None
    dtype = getattr(torch, name)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LoadError(f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name(device)}) does "
                        "not support it; use float16 or float32")
    return dtype


def weight_format(device: torch.device, dtype: str, quantize: str
                  ) -> tuple[str, torch.dtype | None]:
    """What `--dtype` and `--quantize` ask for on `device`, for decoding.

    Returns:
        (the weight format for `LanguageModel.quantize`, the autocast dtype or None). On the
        CPU, bfloat16 means bf16 weights (autocast would convert every weight at every step).

    Raises:
        LoadError: a weight format off the CPU, with a --dtype, or a dtype the GPU lacks.
    """
    if quantize != "none":
        if device.type != "cpu":
            raise LoadError(f"--quantize {quantize} is for CPU decoding, but the device is "
                            f"{device}; on a GPU use --dtype bfloat16, or pass --device cpu")
        if dtype != "float32":
            raise LoadError(f"--quantize {quantize} sets the weight format itself; drop --dtype "
                            f"{dtype}")
        return quantize, None
    if device.type == "cpu" and dtype == "bfloat16":
        # Autocast would convert every weight at every step, slower than float32 on CPU; bf16
        # weight copies are the fast form of the same request.
        return "bf16", None
    if device.type == "cpu" and dtype == "float16":
        sys.stderr.write("note: --dtype float16 on CPU is autocast, which converts the weights at "
                         "every step and is usually slower than float32; --quantize bf16 or int8 "
                         "is faster\n")
    return "none", _autocast_dtype(dtype, device)


def load_runtime(checkpoint: str | None, runtime: Runtime, *,
                 allow_nonfinite: bool = False) -> Loaded:
    """`load_for_inference` as the generation CLI and the server ask for it.

    Args:
        checkpoint: `--checkpoint`; None: the most recently trained lm_*/ run in the current
            directory.
        runtime: the runtime flags.
        allow_nonfinite: `--allow_nonfinite`.

    Returns:
        The `Loaded` model, its `amp_dtype` set from `--dtype`.

    Raises:
        LoadError: one line naming the flag to change.
    """
    try:
        device = pick_device(runtime.device)
    except DeviceError as exc:
        raise LoadError(f"--device: {exc}") from None
    fmt, amp_dtype = weight_format(device, runtime.dtype, runtime.quantize)
    path: str | Path | None = checkpoint
    if path is None:
        path = find_default_checkpoint(".")
        if path is None:
            raise LoadError(f"no --checkpoint given and no trained run (lm_*/snapshots/) in "
                            f"{os.getcwd()}; train one with: python training/train_lm.py, or "
                            "pass --checkpoint PATH")
    try:
        loaded = load_for_inference(path, device=device, weights=fmt,
                                    tokenizer=runtime.tokenizer, allow_nonfinite=allow_nonfinite)
    except TokenizerLoadError as exc:
        origin = ("--tokenizer" if runtime.tokenizer
                  else "the checkpoint's tokenizer (--tokenizer)")
        raise LoadError(f"{origin}: {exc}") from None
    except (CheckpointError, DeviceError) as exc:
        raise LoadError(str(exc)) from None
    loaded.amp_dtype = amp_dtype
    return loaded
