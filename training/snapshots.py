"""Training snapshots: names, crash-safe writes, `latest.pt` / `best.pt`, retention, loading.

A run directory holds `snapshots/snapshot_epoch_{epoch:04d}_step_{step:06d}_{YYYYmmdd_HHMMSS}.pt`
plus `latest.pt` (the newest) and `best.pt` (lowest validation loss). All three are regular files
(hard links where the filesystem allows, copies elsewhere) that load with
`torch.load(path, weights_only=True)`: a snapshot holds only tensors, numbers, strings, lists and
dicts. Each file is complete before `latest.pt` points at it, so a `kill -9` at any instant
leaves a loadable `latest.pt`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from common.fileio import atomic_link_or_copy, atomic_write
from model.checkpoint import CheckpointError, validate_weights

LATEST, BEST = "latest.pt", "best.pt"
_NAME_RE = re.compile(r"^snapshot_epoch_(\d{4,})_step_(\d{6,})_(\d{8}_\d{6})\.pt$")
REQUIRED_KEYS = ("model_config", "model_state_dict", "optimizer_state_dict", "step", "epoch")


class SnapshotError(ValueError):
    """A snapshot cannot be loaded or used; the message is one line."""


class SnapshotWriteError(SnapshotError):
    """A snapshot could not be written (disk full, quota, I/O error); nothing was replaced."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or what it was raised while handling), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def snapshot_name(epoch: int, step: int, when: datetime | None = None) -> str:
    """`snapshot_epoch_0000_step_000123_20260212_095134.pt` for epoch 0, step 123."""
    stamp = (when or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return f"snapshot_epoch_{epoch:04d}_step_{step:06d}_{stamp}.pt"


def parse_snapshot_name(name: str) -> tuple[int, int, str] | None:
    """(epoch, step, timestamp) of a snapshot file name, or None for other names."""
    m = _NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def list_snapshots(snap_dir: str | Path) -> list[Path]:
    """The timestamped snapshots in `snap_dir`, oldest (lowest step) first."""
    found = []
    for p in Path(snap_dir).glob("snapshot_epoch_*_step_*.pt"):
        parsed = parse_snapshot_name(p.name)
        if parsed is not None:
            found.append((parsed[1], parsed[2], p))
    return [p for _, _, p in sorted(found)]


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`_orig_mod.`, `module.`) and move tensors to the CPU."""
    out = {}
    for key, value in state_dict.items():
        while True:
            for prefix in ("_orig_mod.", "module."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            else:
                break
        out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU (for saving)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def capture_rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and every CUDA device), as tensors.

    Training draws randomness only from these (dropout); data order comes from a generator
    seeded with (seed, epoch), so it needs no saved state.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `capture_rng_state` (CUDA states are restored only on a machine with as many GPUs)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_snapshot(snap_dir: str | Path, payload: dict[str, Any], *, name: str | None = None,
                  is_best: bool = False, keep_last: int = 5,
                  protect: Iterable[str] = ()) -> Path:
    """Write a timestamped snapshot atomically, point `latest.pt` (and `best.pt`) at it, prune.

    Args:
        snap_dir: the snapshots folder (created if missing).
        payload: what to save; must hold only weights_only-loadable types.
        name: the file name (default: from the payload's epoch and step, and the time now).
        is_best: also replace `best.pt`.
        keep_last: how many timestamped snapshots to keep (the newest ones).
        protect: names never pruned (the snapshot `best.pt` came from).

    Returns:
        The path of the new timestamped snapshot.

    Raises:
        SnapshotWriteError: the disk is full or a write failed; every file that was not yet
            replaced (`latest.pt`, `best.pt`) is as it was, and no temporary file is left.
    """
    snap_dir = Path(snap_dir)
    path = snap_dir / (name or snapshot_name(int(payload["epoch"]), int(payload["step"])))
    done = []
    try:
        with atomic_write(path) as f:
            torch.save(payload, f)
        atomic_link_or_copy(path, snap_dir / LATEST)
        done.append(LATEST)
        if is_best:
            atomic_link_or_copy(path, snap_dir / BEST)
    except (OSError, RuntimeError) as exc:  # torch.save wraps a failed write in a RuntimeError
        cause = _os_error(exc)
        if cause is None:
            raise
        # Every write above is atomic: what was not replaced is exactly as it was.
        kept = " and ".join(n for n in (LATEST, BEST) if n not in done and (snap_dir / n).exists())
        raise SnapshotWriteError(
            f"could not write the step {payload.get('step')} snapshot in {snap_dir} "
            f"({cause.strerror or cause}); "
            + (f"{kept} {'are' if ' and ' in kept else 'is'} unchanged" if kept
               else "no snapshot was replaced")
            + "; free some space, then continue with --resume auto") from None
    prune_snapshots(snap_dir, keep_last, protect={path.name, *protect})
    return path


def prune_snapshots(snap_dir: str | Path, keep_last: int,
                    protect: Iterable[str] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` timestamped snapshots (and the protected ones)."""
    protect = set(protect)
    snaps = list_snapshots(snap_dir)
    doomed = [p for p in snaps[:max(0, len(snaps) - keep_last)] if p.name not in protect]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return doomed


def remove_stale_temporaries(snap_dir: str | Path) -> None:
    """Delete half-written temporary files left by a run that was killed mid-write."""
    for p in Path(snap_dir).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """Load a snapshot with `weights_only=True` onto the CPU and check its keys.

    Raises:
        SnapshotError: unreadable file, not a snapshot, missing keys, weights that do not fit
            the model_config or are not finite (`model.checkpoint.validate_weights`).
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"no snapshot at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or foreign: one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SnapshotError(f"cannot load {path} ({first})") from None
    if not isinstance(ckpt, dict):
        raise SnapshotError(f"{path} is not a training snapshot (no dict inside)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise SnapshotError(f"{path} is not a train_lm.py snapshot (missing {', '.join(missing)})")
    try:  # the loader's checks: config against tensors (before allocating), finite weights
        validate_weights({**ckpt, "_path": str(path)})
    except CheckpointError as exc:
        raise SnapshotError(str(exc)) from None
    return ckpt


def find_resume_snapshot(snap_dir: str | Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest loadable snapshot: `latest.pt`, else timestamped ones, newest first.

    Returns:
        (path, snapshot, problems): path and snapshot are None when there is none; problems
        lists files that exist but could not be loaded.
    """
    snap_dir = Path(snap_dir)
    candidates = [snap_dir / LATEST, *reversed(list_snapshots(snap_dir))]
    problems = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return path, load_snapshot(path), problems
        except SnapshotError as exc:
            problems.append(str(exc))
    return None, None, problems
