"""Where a training run starts from: a new model, the weights of `--init_from`, or `--resume`.

- new: random weights (seeded), step 0.
- `--init_from SOURCE`: a new run (step 0, fresh optimizer and schedule) from the weights of
  SOURCE: anything `generate_lm.py --checkpoint` accepts, a Hugging Face GPT-2 folder, or a hub
  name (read by `model.checkpoint.read_weights_source`, the one loader). The model's shape and
  tokenizer come from SOURCE.
- `--resume auto|PATH`: continue a run exactly where its snapshot stopped, with its flags.

`--resume auto` with no snapshot yet starts as if it were not given, so the same command (with
`--init_from` or without) both starts a run and continues it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpus.datasets import DataArgs, dataset_label
from model.checkpoint import build_model, read_weights_source
from model.config import architecture_fields
from model.lm import LMConfig
from model.tokenizer import TokenizerLoadError, tokenizer_source
from training.errors import UsageError
from training.snapshots import SnapshotError, find_resume_snapshot, load_snapshot

SHAPE_KEYS = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
NEVER_INHERITED = {"resume", "explain", "device", "out_dir", "cache_dir"}

Say = Callable[[str], None]


@dataclass
class RunStart:
    """Where this run starts.

    Attributes:
        kind: "new", "init" (`--init_from`) or "resume".
        ckpt: the snapshot to resume, or the source checkpoint of `--init_from` (CPU tensors).
        path: the file `ckpt` was read from.
        source: `--init_from` as given (also kept by a resumed fine-tune run).
    """

    kind: str = "new"
    ckpt: dict[str, Any] | None = None
    path: Path | None = None
    source: str | None = None

    @property
    def resuming(self) -> bool:
        return self.kind == "resume"


Flags = dict[str, Any]  # flag name -> plain value, as parsed (and as a snapshot's "args")


def run_dir(flags: Mapping[str, Any]) -> Path:
    """The run directory: `--out_dir`, else `lm_<dataset>`."""
    return Path(flags.get("out_dir") or f"lm_{dataset_label(DataArgs.from_dict(flags))}")


def choose_start(flags: Mapping[str, Any], explicit: set[str], say: Say
                 ) -> tuple[RunStart, Flags]:
    """Find the snapshot to resume or read the `--init_from` source, and adopt its flags.

    On resume the snapshot's flags replace those not given on this command line; with
    `--init_from` the model shape (and tokenizer, unless `--tokenizer`) come from the source.

    Args:
        flags: the parsed flags (defaults and preset applied). explicit: those given.
        say: prints a note.

    Returns:
        (where the run starts, the flags with what it adopted: a new dict).

    Raises:
        UsageError, SnapshotError, CheckpointError: one line each.
    """
    flags = dict(flags)
    resume = flags["resume"]
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise UsageError(f"--resume: no snapshot file at {resume!r} (use --resume auto for "
                         "the run directory's latest)")
    ckpt, path = None, None
    if resume == "auto":
        snap_dir = run_dir(flags) / "snapshots"
        path, ckpt, problems = find_resume_snapshot(snap_dir)
        for problem in problems:
            say(f"warning: skipping unloadable snapshot: {problem}")
        if ckpt is None:
            say(f"--resume auto: no snapshot in {snap_dir}; starting a new run")
    elif resume:
        path = Path(resume)
        ckpt = load_snapshot(path)
        if "out_dir" not in explicit and path.parent.name == "snapshots":
            flags["out_dir"] = str(path.parent.parent)  # keep writing next to that snapshot
    if ckpt is not None:
        _inherit_from_snapshot(flags, explicit, ckpt, say)
        return RunStart("resume", ckpt, path, ckpt.get("init_from") or flags["init_from"]), flags
    if flags["init_from"]:
        return _read_source(flags, explicit), flags
    return RunStart(), flags


def _inherit_from_snapshot(flags: Flags, explicit: set[str], ckpt: dict, say: Say) -> None:
    """Resume with the snapshot's flags (into `flags`), except those given on this command
    line."""
    saved = ckpt.get("args") or {}
    changed = []
    for key, value in saved.items():
        if key in NEVER_INHERITED or key not in flags:
            continue
        if key in explicit:
            if flags[key] != value and key not in SHAPE_KEYS:
                changed.append(f"{key} {value!r} -> {flags[key]!r}")
            continue
        flags[key] = value
    if changed:
        say("note: resuming with changed flags (the result will differ from an "
            "uninterrupted run): " + ", ".join(changed))


def _read_source(flags: Flags, explicit: set[str]) -> RunStart:
    """Read `--init_from`, check its weights, and take the model shape and tokenizer from it
    (into `flags`)."""
    source = str(flags["init_from"])
    ckpt = read_weights_source(source)
    path = Path(ckpt["_path"])
    model = build_model(ckpt, "cpu")  # the loader's checks: config, weight shapes, tied head
    src = model.config
    conflicts = [f"--{key} {flags[key]} (it has {getattr(src, key)})"
                 for key in SHAPE_KEYS[:-1]
                 if key in explicit and flags[key] != getattr(src, key)]
    if conflicts:
        raise UsageError(f"--init_from {source}: the model's shape comes from it, but "
                         f"{', '.join(conflicts)}; drop those flags")
    if "max_seq_len" in explicit and flags["max_seq_len"] > src.max_seq_len:
        raise UsageError(f"--init_from {source}: --max_seq_len {flags['max_seq_len']} is larger "
                         f"than its context of {src.max_seq_len} (it can be made smaller, not "
                         "larger)")
    for key in SHAPE_KEYS:
        if key != "max_seq_len" or "max_seq_len" not in explicit:
            flags[key] = getattr(src, key)
    if "dropout" not in explicit:
        flags["dropout"] = src.dropout
    if "tokenizer" not in explicit:  # its stored files, wherever the checkpoint was made
        try:
            flags["tokenizer"] = tokenizer_source(ckpt)
        except TokenizerLoadError as exc:
            raise UsageError(f"--init_from {source}: {exc}") from None
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return RunStart("init", {"model_config": src.to_dict(), "model_state_dict": weights},
                    path, source)


def model_architecture(start: RunStart, arch: str | None,
                       num_kv_heads: int | None) -> dict[str, Any]:
    """The architecture fields of the model to train: those of the model resumed or started
    from (`source_architecture`), else GPT-2's; `--arch` and `--num_kv_heads` replace them when
    given (`check_architecture` then refuses a source of other blocks)."""
    fields = source_architecture(start)
    if arch is not None:
        fields = architecture_fields(arch)
    if num_kv_heads is not None:
        fields["num_kv_heads"] = num_kv_heads
    return fields


def check_architecture(cfg: LMConfig, start: RunStart) -> None:
    """Raise UsageError when the model resumed or started from has other blocks than `cfg`
    (its weights would not fit, or would be trained as another network)."""
    if start.ckpt is None:
        return
    try:
        saved = LMConfig.from_dict(dict(start.ckpt["model_config"]))
    except (KeyError, ValueError, TypeError):
        return  # check_resume_fits / the source's loader report it
    diffs = [f"{k} {getattr(saved, k)!r} there, {getattr(cfg, k)!r} here"
             for k in LMConfig.ARCHITECTURE_KEYS if getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        flag = "--resume" if start.kind == "resume" else "--init_from"
        raise UsageError(f"{flag}: {start.path} holds a model of other blocks "
                         f"({'; '.join(diffs)}); drop --arch / --num_kv_heads to train it as "
                         "it is")


def source_architecture(start: RunStart) -> dict[str, Any]:
    """The architecture fields (`LMConfig.ARCHITECTURE_KEYS`) of the model to resume or start
    from, so a RoPE/Llama-style source is trained as itself; {} for a new run (GPT-2) or an
    unreadable config (which `check_resume_fits` reports)."""
    if start.ckpt is None:
        return {}
    try:
        saved = LMConfig.from_dict(dict(start.ckpt["model_config"]))
    except (KeyError, ValueError, TypeError):
        return {}
    arch = {key: getattr(saved, key) for key in LMConfig.ARCHITECTURE_KEYS}
    # Heads as the defaults resolve them stay defaults (follow --num_heads / --d_model).
    if saved.num_kv_heads == saved.num_heads:
        arch["num_kv_heads"] = None
    if saved.head_dim * saved.num_heads == saved.d_model:
        arch["head_dim"] = None
    return arch


def source_weights(start: RunStart, cfg: LMConfig) -> dict[str, torch.Tensor]:
    """The `--init_from` weights for `cfg`: position embeddings cropped to its context (as
    nanoGPT's `crop_block_size` does) when `--max_seq_len` is smaller than the source's."""
    state = dict(start.ckpt["model_state_dict"])
    if "transformer.wpe.weight" in state:  # RoPE models have no position table to crop
        wpe = state["transformer.wpe.weight"]
        state["transformer.wpe.weight"] = wpe[:cfg.max_seq_len].clone()
    return state


def check_vocabulary(start: RunStart, vocab_size: int, tokenizer_size: int, tokenizer: str) -> None:
    """Raise UsageError when the model's vocabulary cannot hold the tokenizer's tokens."""
    if vocab_size >= tokenizer_size:
        return
    if start.kind == "init":
        raise UsageError(f"--init_from {start.source}: its vocabulary has {vocab_size:,} tokens "
                         f"but tokenizer {tokenizer!r} has {tokenizer_size:,}; pass the tokenizer "
                         "it was trained with (--tokenizer)")
    raise UsageError(f"--vocab_size {vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer_size:,} tokens")


def check_resume_fits(cfg: LMConfig, start: RunStart) -> None:
    """Raise UsageError when the snapshot to resume holds a model of another shape."""
    try:
        saved = LMConfig.from_dict(dict(start.ckpt["model_config"]))
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{start.path}: bad model_config ({exc})") from None
    diffs = [f"{k} {getattr(saved, k)} in the snapshot, {getattr(cfg, k)} here"
             for k in SHAPE_KEYS if getattr(saved, k) != getattr(cfg, k)]  # dropout may change
    if diffs:
        raise UsageError(f"--resume: {start.path} holds a different model ({'; '.join(diffs)}); "
                         "drop those flags to use the snapshot's, or use a new --out_dir")


def keep_global_batch(batch_size: int, grad_accum: int, explicit: set[str], start: RunStart,
                      world_size: int, say: Say) -> int:
    """A resume with another number of processes continues with the snapshot's global batch:
    returns the `--grad_accum` to train with.

    The batches are a function of the global batch (`corpus.batches`), not of how it is split
    into processes and micro-batches. So when only the process count changed, `--grad_accum` is
    set to keep the global batch, and the run sees exactly the batches it would have seen (the
    dropout randomness is reseeded). Explicit `--batch_size` / `--grad_accum` are obeyed as given.

    Raises:
        UsageError: the saved global batch cannot be split over `world_size` processes with the
            batch size.
    """
    if not start.resuming or "batch_size" in explicit or "grad_accum" in explicit:
        return grad_accum
    saved = int((start.ckpt.get("rng_state") or {}).get("world_size") or world_size)
    target = (start.ckpt.get("data_position") or {}).get("global_batch")
    if saved == world_size or not target:
        return grad_accum
    per_step = batch_size * world_size
    if target % per_step:
        raise UsageError(f"--resume: the snapshot's global batch is {target} sequences ({saved} "
                         f"process(es)); {world_size} processes with --batch_size "
                         f"{batch_size} cannot make it: pass --batch_size B and --grad_accum "
                         f"A with B x A x {world_size} = {target}")
    grad_accum = target // per_step
    say(f"note: resuming a {saved}-process run with {world_size} process(es): --grad_accum "
        f"{grad_accum} keeps its global batch of {target} sequences, so the data order is "
        "unchanged")
    return grad_accum
