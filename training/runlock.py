"""One trainer per run directory: an advisory lock on `<out_dir>/train.lock`.

Two trainers writing the same snapshots, metrics and token cache would interleave them. The
lock is `fcntl.flock`, which the operating system drops when the process ends in any way
(`kill -9` and crashes included), so a dead run never leaves a stuck lock: the file may stay
behind, but an unlocked file means nothing. Where `fcntl` does not exist (Windows) there is
no lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from training.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"


def lock_run_dir(out_dir: str | Path) -> IO | None:
    """Take the run directory's lock (creating the directory), or refuse in one line.

    Returns:
        The open lock file: the lock lasts while it stays open (keep a reference until the run
        ends) and ends with the process in any case. None where locks are unsupported.

    Raises:
        UsageError: another live process holds the lock.
    """
    if fcntl is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: somebody else holds it
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise UsageError(f"another trainer{who} is already writing to {out_dir}; wait for it to "
                         "finish (or stop it), or pick another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")  # only to name the holder in the message above
    f.flush()
    return f
