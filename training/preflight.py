"""Checks `train_lm.py` makes before it allocates or writes anything.

A run that cannot fit in memory, or cannot write where it is told to, should say so in one line
at once, not with an allocator traceback minutes in or a `NotADirectoryError` after the data
was tokenized. Both checks raise `UsageError` (exit 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from corpus.datasets import DataArgs, default_cache_dir
from model.lm import LMConfig
from training.errors import UsageError
from training.explain import human_bytes, memory_estimate

# -- output paths ------------------------------------------------------------------------------


def _writable_dir(path: Path, flag: str, probed: dict[Path, None]) -> None:
    """`path` is, or can become, a directory we can write in."""
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "the path itself" if existing == path else f"{existing}, on the way,"
        raise UsageError(f"{flag} {path}: {what} is a file, not a directory; remove it or pick "
                         f"another {flag}")
    if existing in probed:
        return
    try:  # a real probe: permissions, a read-only filesystem, ACLs, root squash all show here
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({reason}); pick another "
                         f"{flag}") from None
    probed[existing] = None


def check_output_paths(out_dir: str | Path, data: DataArgs) -> None:
    """Every directory and file the run writes is usable: one `UsageError` line if not.

    Covers `--out_dir`, its `snapshots/`, the token cache (`--cache_dir` of `data`),
    `metrics.csv` and `loss_curve.png`: a file where a directory should be (or the reverse), no
    permission, a read-only filesystem.
    """
    out = Path(out_dir)
    probed: dict[Path, None] = {}
    for flag, path in (("--out_dir", out), ("--out_dir", out / "snapshots"),
                       ("--cache_dir" if data.cache_dir else "--out_dir",
                        default_cache_dir(data))):
        _writable_dir(path, flag, probed)
    for path in (out / "metrics.csv", out / "loss_curve.png", out / "snapshots" / "latest.pt",
                 out / "snapshots" / "best.pt"):
        if path.is_dir():
            raise UsageError(f"--out_dir {out}: {path} is a directory, but the run writes a file "
                             "there; remove it or pick another --out_dir")


# -- memory ------------------------------------------------------------------------------------


def _meminfo_bytes(*keys: str) -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in keys and rest.split():
            values[name] = int(rest.split()[0]) * 1024  # reported in kB
    return sum(values.values()) if len(values) == len(keys) else None


def _cgroup_room() -> int | None:
    """What the cgroup (v2) memory limit still allows, if there is one (containers, CI)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def memory_limit(device: torch.device) -> tuple[int, str] | None:
    """Bytes this process may still allocate on `device`, and how that was found; None if unknown.

    CUDA: the device's free memory. CPU (Linux): available memory plus free swap, capped by the
    cgroup limit. Elsewhere (MPS, other systems): unknown, so nothing is checked.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return None
    room = _meminfo_bytes("MemAvailable", "SwapFree")
    cgroup = _cgroup_room()
    if cgroup is not None and (room is None or cgroup < room):
        return cgroup, "left under this container's memory limit"
    return (room, "of available memory and swap") if room is not None else None


def check_memory(cfg: LMConfig, batch_size: int, seq_len: int, amp: torch.dtype,
                 fused_loss: bool, device: torch.device, processes: int = 1) -> None:
    """Refuse, before allocating, a run whose estimate (as `--explain` prints it) exceeds the
    memory the device has free.

    Args:
        processes: how many processes share this memory (DDP ranks on one CPU machine).

    Raises:
        UsageError: saying the estimate and the limit.
    """
    limit = memory_limit(device)
    if limit is None:
        return
    state, acts = memory_estimate(cfg, batch_size, seq_len, amp, fused_loss)
    if (state + acts) * processes <= limit[0]:
        return
    each = f" for each of {processes} processes" if processes > 1 else ""
    raise UsageError(
        f"this run needs about {human_bytes(state + acts)} of memory{each} ({human_bytes(state)} "
        f"for weights, gradients and AdamW state, {human_bytes(acts)} of activations for "
        f"--batch_size {batch_size} x {seq_len} tokens) but there is {human_bytes(limit[0])} "
        f"{limit[1]}; use a smaller model or --batch_size (see --explain)")
