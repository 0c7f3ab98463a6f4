"""The one checkpoint loader: find a checkpoint, load it safely, build the model on a device.

Everything that loads a trained model (the CLI, the REPL, `example_generate.py`, tests) goes
through `load_model`. Files are read with `torch.load(..., weights_only=True)`, so a checkpoint
whose pickle would run code is refused before any of it runs. Every failure is a
`CheckpointError` (a `ValueError`) whose message is one actionable line.

Accepted paths: a `.pt` snapshot, `latest.pt`, a run directory (`lm_x/`) or its `snapshots/`
directory (the snapshot with the highest step wins), or a weights-only `.safetensors` file with
the model config as JSON under the metadata key "model_config". `read_weights_source` (the
starting point of `train_lm.py --init_from`) also takes a Hugging Face GPT-2 folder or hub name,
read by `model/hf_interop.py`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from model.lm import LanguageModel, LMConfig
from model.quant import check_format
from model.tokenizer import (
    FILES_KEY,
    TokenizerLoadError,
    has_embedded_tokenizer,
    load_checkpoint_tokenizer,
)

_SNAPSHOT_GLOB = "snapshot_*.pt"
_STEP_RE = re.compile(r"step_(\d+)")
_SAFETENSORS_SUFFIX = ".safetensors"
_TIED = ("lm_head.weight", "transformer.wte.weight")  # the LM head shares the token embedding


class CheckpointError(ValueError):
    """A checkpoint cannot be found or loaded; the message is one line saying why and what to do."""


class DeviceError(ValueError):
    """A device name is unknown or the device is not available here."""


# -- devices -----------------------------------------------------------------------------------


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """Resolve a device name.

    Args:
        name: "auto" or None (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".

    Raises:
        DeviceError: for an unknown name or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    key = (name or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    try:
        dev = torch.device(key)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here "
                              f"(torch {torch.__version__}); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not mps_ok:
            raise DeviceError(f"device {name!r} asked for, but MPS is not available here; "
                              "use cpu or auto")
        return dev
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


# -- finding checkpoints -----------------------------------------------------------------------


def _snapshot_key(path: Path) -> tuple[int, float]:
    m = _STEP_RE.search(path.name)
    return (int(m.group(1)) if m else -1, path.stat().st_mtime)


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn what the user passed into one checkpoint file.

    A file is returned as is. A run directory (`lm_x/`, holding `snapshots/`) or a snapshots
    directory gives its newest `snapshot_*.pt` (highest step, then newest file), else its
    `latest.pt`.

    Raises:
        CheckpointError: the path does not exist, or a directory holds no checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        hint = ""
        if p.suffix == "" and p.parent.exists():
            hint = "; pass a .pt file, a run directory (lm_x/) or its snapshots/ directory"
        raise CheckpointError(f"checkpoint not found: {p}{hint}")
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path is neither a file nor a directory: {p}")
    snap_dir = p / "snapshots" if (p / "snapshots").is_dir() else p
    snapshots = [s for s in snap_dir.glob(_SNAPSHOT_GLOB) if s.is_file()]
    if snapshots:
        return max(snapshots, key=_snapshot_key)
    latest = snap_dir / "latest.pt"
    if latest.is_file():
        return latest
    raise CheckpointError(f"no checkpoint in directory {p} (looked for {snap_dir}/snapshot_*.pt "
                          "and latest.pt); train one with: python training/train_lm.py")


def find_default_checkpoint(root: str | Path = ".") -> Path | None:
    """The run directory to use when none is given: the `lm_*/` under `root` trained last.

    Returns:
        The newest `lm_*` run directory holding a snapshot, or None when there is none.
    """
    runs = []
    for run in Path(root).glob("lm_*"):
        snap_dir = run / "snapshots"
        files = [*snap_dir.glob(_SNAPSHOT_GLOB), snap_dir / "latest.pt"]
        mtimes = [f.stat().st_mtime for f in files if f.is_file()]
        if mtimes:
            runs.append((max(mtimes), run))
    return max(runs)[1] if runs else None


# -- reading files -----------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == _SAFETENSORS_SUFFIX:
        return True
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 10**8


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise CheckpointError(f"cannot read safetensors file {path} ({_first_line(exc)}); "
                              "it is truncated or not a safetensors file") from None
    if "model_config" not in meta:
        raise CheckpointError(f"safetensors file {path} has no 'model_config' in its metadata; "
                              "export it with the repo's converter (--to_safetensors)")
    try:
        config = json.loads(meta["model_config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"safetensors file {path}: metadata 'model_config' is not valid "
                              f"JSON ({exc.msg})") from None
    ckpt: dict[str, Any] = {k: v for k, v in meta.items() if k != "model_config"}
    if FILES_KEY in ckpt:  # a stored tokenizer: JSON of {file name: text}
        try:
            files = json.loads(ckpt[FILES_KEY])
            ckpt[FILES_KEY] = {str(k): str(v).encode("utf-8") for k, v in files.items()}
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"safetensors file {path}: metadata {FILES_KEY!r} is not a "
                                  "JSON object of file names and texts") from None
    ckpt.update(model_config=config, model_state_dict=state)
    return ckpt


def _read_torch(path: Path, head: bytes) -> Any:
    is_zip = head[:4] == b"PK\x03\x04"
    if not is_zip and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}); "
                              "pass a .pt file written by training/train_lm.py")

    def load(mmap: bool) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle-protocol notes; errors still raise
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            # mmap (zip files only) leaves the optimizer state on disk: we need only the weights.
            return load(mmap=is_zip)
        except Exception as exc:  # noqa: BLE001
            if not is_zip or "Weights only load failed" in str(exc):
                raise
            return load(mmap=False)  # a damaged file: a plain read gives the telling error
    except Exception as exc:  # noqa: BLE001 - classified below into one-line messages
        msg = str(exc)
        if "Weights only load failed" in msg or "weights_only" in msg:
            m = re.search(r"GLOBAL (\S+)", msg)
            what = f" ({m.group(1)})" if m else ""
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects{what} that a safe "
                "weights_only load does not allow, and unpickling them could run code; only "
                "load checkpoints from a trusted source"
            ) from None
        # It starts like a torch file but does not read as one: cut short or damaged.
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt "
                              f"({_first_line(exc)[:80]}); use another snapshot") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Find and read a checkpoint into a dict on the CPU (no model built yet).

    Args:
        path: anything `resolve_checkpoint` accepts.

    Returns:
        The checkpoint dict, with `model_config`, `model_state_dict` and, added here, `_path`
        (the file actually read, as a string).

    Raises:
        CheckpointError: for every way the path or file can be wrong (one-line message).
    """
    file = resolve_checkpoint(path)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc.strerror}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes); the save was interrupted, "
                              "use another snapshot")
    ckpt = _read_safetensors(file) if _is_safetensors(file, head) else _read_torch(file, head)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{file} holds a {type(ckpt).__name__}, not a checkpoint dict with "
                              "'model_config' and 'model_state_dict'")
    missing = [k for k in ("model_config", "model_state_dict") if k not in ckpt]
    if missing:
        hint = ""
        if any(isinstance(k, str) and k.startswith("transformer.") for k in ckpt):
            hint = " (it looks like a bare state dict; save it with its model_config)"
        raise CheckpointError(f"checkpoint {file} has no {' or '.join(map(repr, missing))}"
                              f"{hint}; keys found: {_few(sorted(map(str, ckpt)))}")
    if not isinstance(ckpt["model_state_dict"], dict):
        raise CheckpointError(f"checkpoint {file}: 'model_state_dict' is a "
                              f"{type(ckpt['model_state_dict']).__name__}, not a dict of tensors")
    ckpt["_path"] = str(file)
    return ckpt


def read_weights_source(source: str | Path) -> dict[str, Any]:
    """Read the weights to start from: anything `read_checkpoint` accepts, a Hugging Face GPT-2
    folder (`config.json` + `model.safetensors` / `pytorch_model.bin`), or a hub name such as
    `gpt2` (from the local Hugging Face cache; downloaded when online).

    A local path wins over a hub name of the same spelling, as with `from_pretrained`.

    Returns:
        A checkpoint dict as `read_checkpoint` returns it (with `tokenizer` for HF models).

    Raises:
        CheckpointError: one line for every way the source can be missing or wrong.
    """
    from model.hf_interop import HFLoadError, looks_like_hub_name, read_hf_checkpoint

    p = Path(source).expanduser()
    is_hf_dir = p.is_dir() and (p / "config.json").is_file() and not (p / "snapshots").is_dir() \
        and not any(p.glob(_SNAPSHOT_GLOB))
    if p.exists() and not is_hf_dir:
        return read_checkpoint(p)
    if not p.exists() and not looks_like_hub_name(str(source)):
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return read_hf_checkpoint(p if is_hf_dir else str(source))
    except HFLoadError as exc:
        raise CheckpointError(str(exc)) from None


# -- building the model ------------------------------------------------------------------------


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    # torch.compile and DistributedDataParallel prefix every key; other trainers save that way.
    for prefix in ("_orig_mod.", "module."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_size(cfg: LMConfig, state: dict[str, Any], file: str) -> None:
    # Refuse what no tensor here could hold before even a `meta` model is built: its time grows
    # with num_layers (12 tensors each), and a dimension past about 3e9 overflows a shape. Past
    # this check, the exact shape comparison bounds every size.
    held = sum(v.numel() for k, v in state.items()
               if isinstance(v, torch.Tensor) and k != _TIED[0])  # the tied head is wte again
    absurd = [f"{k} {getattr(cfg, k):,}"
              for k in ("vocab_size", "d_model", "d_ff", "max_seq_len", "head_dim")
              if getattr(cfg, k) > held]
    if cfg.num_layers > len(state):
        absurd.append(f"num_layers {cfg.num_layers:,} (the file has {len(state)} tensors)")
    if absurd:
        raise CheckpointError(
            f"checkpoint {file}: model_config asks for {', '.join(absurd)}, more than the "
            f"{held:,} weights in the file can hold; the config does not describe these weights")


def _check_state_dict(state: dict[str, Any], expected: dict[str, tuple[int, ...]],
                      file: str, tied: bool = True) -> None:
    bad_type = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_type:
        raise CheckpointError(f"checkpoint {file}: state dict entries are not tensors: "
                              f"{_few(sorted(map(str, bad_type)))}")
    odd = [f"{k} ({str(v.dtype).replace('torch.', '')}"
           + ("" if v.layout == torch.strided else f", {str(v.layout).replace('torch.', '')}")
           + (", meta" if v.is_meta else "") + ")" for k, v in state.items()
           if not v.is_floating_point() or v.layout != torch.strided or v.is_meta]
    if odd:
        raise CheckpointError(f"checkpoint {file}: weights must be dense floating-point tensors "
                              f"with data, got {_few(sorted(odd), 3)}")
    missing = sorted(set(expected) - set(state) - {_TIED[0]})  # a tied head may be left out
    unexpected = sorted(map(str, set(state) - set(expected)))  # keys may be any type
    shapes = [f"{k} {list(state[k].shape)} vs {list(shp)}" for k, shp in expected.items()
              if k in state and tuple(state[k].shape) != shp]
    problems = []
    if shapes:
        problems.append(f"shape mismatch (checkpoint vs model_config): {_few(shapes, 3)}")
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if problems:
        raise CheckpointError(f"checkpoint {file}: weights do not fit its model_config; "
                              + "; ".join(problems))
    head, wte = (state.get(k) for k in _TIED)
    if tied and head is not None and head is not wte and not torch.equal(head, wte):
        raise CheckpointError(f"checkpoint {file}: lm_head.weight differs from "
                              "transformer.wte.weight, but this model ties them")


def _check_finite(state: dict[str, Any], file: str) -> None:
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint {file}: non-finite weights (NaN or inf) in {_few(sorted(bad), 3)}; the "
            "run diverged: use an earlier snapshot (to inspect it anyway: generate_lm.py "
            "--allow_nonfinite, or load_model(..., allow_nonfinite=True))")


def validate_weights(ckpt: dict[str, Any], allow_nonfinite: bool = False
                     ) -> tuple[LMConfig, dict[str, Any]]:
    """Check a checkpoint's config against its tensors without allocating the model.

    In order: the config is valid; its sizes are possible for the file; every tensor has
    the shape a model of that config (built on the `meta` device, so no memory is used)
    expects, so the model to build is exactly as big as the tensors present; and, unless
    `allow_nonfinite`, every weight is finite.

    Args:
        ckpt: a dict from `read_checkpoint` (or any dict with the two keys).
        allow_nonfinite: accept NaN/inf weights (to inspect a diverged run).

    Returns:
        The config and the state dict (wrapper prefixes removed, the tied head filled in).

    Raises:
        CheckpointError: one line naming what does not fit.
    """
    file = ckpt.get("_path", "<dict>")
    try:
        cfg = LMConfig.from_dict(dict(ckpt["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {file}: bad model_config: {_first_line(exc)}") from None
    state = _clean_state_dict(ckpt["model_state_dict"])
    _check_size(cfg, state, file)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in LanguageModel.from_config(cfg)
                    .state_dict().items()}
    if not cfg.tie_embeddings and _TIED[0] not in state:  # only a tied head may be left out
        raise CheckpointError(f"checkpoint {file}: no {_TIED[0]}, and model_config says the "
                              "head is not tied to the embedding (tie_embeddings False)")
    _check_state_dict(state, expected, file, cfg.tie_embeddings)
    if not allow_nonfinite:
        _check_finite(state, file)
    if _TIED[0] not in state:
        state = {**state, _TIED[0]: state[_TIED[1]]}
    return cfg, state


def build_model(ckpt: dict[str, Any], device: str | torch.device | None = None,
                tokenizer: Any = None, dtype: torch.dtype | None = None,
                allow_nonfinite: bool = False) -> LanguageModel:
    """Build the model a checkpoint dict describes, in eval mode on `device`.

    Args:
        ckpt: a dict from `read_checkpoint` (or any dict with the two keys).
        device: see `pick_device`.
        tokenizer: when given, its tokens must fit the model's vocabulary (a model's may be
            larger, padded); it becomes `model.tokenizer` and its EOS id `model.end_token`.
        dtype: cast the weights (e.g. torch.bfloat16); None keeps the stored float32.
        allow_nonfinite: load NaN/inf weights instead of refusing them (see `validate_weights`).

    Raises:
        CheckpointError: bad config, weights that do not fit it (checked before the model is
            allocated), non-finite weights, or a tokenizer mismatch.
        DeviceError: an unknown or unavailable device.
    """
    file = ckpt.get("_path", "<dict>")
    dev = pick_device(device)
    cfg, state = validate_weights(ckpt, allow_nonfinite)
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:  # a padded vocabulary fits
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise CheckpointError(
            f"checkpoint {file} has vocab_size {cfg.vocab_size} but tokenizer {name!r} has "
            f"{len(tokenizer)} tokens; pass the tokenizer the model was trained with (--tokenizer)"
        )
    model = LanguageModel.from_config(cfg)
    model.load_state_dict(state)
    model.to(device=dev, dtype=dtype)
    model.eval()
    if tokenizer is not None:
        model.tokenizer = tokenizer
        model.end_token = tokenizer.eos_token_id
    return model


def load_model(checkpoint_path: str | Path, device: str | torch.device | None = None,
               tokenizer: Any = None, dtype: torch.dtype | None = None,
               allow_nonfinite: bool = False, quantize: str = "none"
               ) -> tuple[LanguageModel, dict[str, Any]]:
    """Load a trained model: find the checkpoint, read it safely, build the model.

    Example:
        >>> from model.checkpoint import load_model
        >>> from model.tokenizer import load_tokenizer
        >>> tok = load_tokenizer("gpt2")
        >>> model, ckpt = load_model("lm_shakespeare", tokenizer=tok)  # newest snapshot
        >>> print(ckpt["_path"], ckpt.get("step"), ckpt.get("val_loss"))

    Args:
        checkpoint_path: a snapshot file, `latest.pt`, a run or snapshots directory, or a
            `.safetensors` file with `model_config` metadata.
        device: "auto"/None (CUDA, MPS, CPU), "cpu", "cuda", "cuda:N", "mps".
        tokenizer: optional; checked against the model's vocabulary and attached to the model
            (`model.tokenizer`, `model.end_token` = its EOS id). None: the tokenizer stored in
            the checkpoint, when it stores one (a model trained or converted with a tokenizer
            other than GPT-2's); else none is attached (str prompts use the bundled GPT-2).
        dtype: optional weight dtype (default: as stored, float32).
        allow_nonfinite: load NaN/inf weights instead of refusing them (to debug a diverged run).
        quantize: the weight format of inference on CPU, "none", "bf16", "int8" or "int4" (see
            `LanguageModel.quantize`; the model's parameters stay as loaded).

    Returns:
        `(model, checkpoint)`: the model in eval mode on the device, and the checkpoint dict
        (tensors on the CPU) with `checkpoint["_path"]` naming the file that was loaded.

    Raises:
        CheckpointError: one-line message for a missing path, a directory without snapshots, an
            empty, truncated, non-torch or unsafe file, missing keys, weights that do not fit the
            config (checked before allocating), non-finite weights, a tokenizer with more
            tokens than the model's vocabulary, or stored tokenizer files that do not load.
        DeviceError: an unknown or unavailable device, or `quantize` on a device not the CPU.
        ValueError: an unknown `quantize` format.
    """
    dev = pick_device(device)  # fail on a bad device before reading a large file
    check_format(quantize)
    if quantize != "none" and dev.type != "cpu":
        raise DeviceError(f"quantize={quantize!r} is for CPU inference, but the device is "
                          f"{dev}; on a GPU use bf16 autocast instead")
    ckpt = read_checkpoint(checkpoint_path)
    if tokenizer is None and has_embedded_tokenizer(ckpt):
        try:
            tokenizer = load_checkpoint_tokenizer(ckpt)
        except TokenizerLoadError as exc:
            raise CheckpointError(f"checkpoint {ckpt['_path']}: {exc}") from None
    model = build_model(ckpt, dev, tokenizer, dtype, allow_nonfinite)
    model.quantize(quantize)
    return model, ckpt
