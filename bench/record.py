"""What the benchmark scripts share: the CPU's name, and a copy of what they print to a file."""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Tee:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return sys.__stdout__.write(text)

    def flush(self) -> None:
        sys.__stdout__.flush()


@contextmanager
def printed_to(out: Path | None, script: str) -> Iterator[None]:
    """Print as usual; with `out`, also write everything printed, after a `$ python SCRIPT ARGS`
    line, to `out` when the block ends (atomically, even when it fails)."""
    if out is None:
        yield
        return
    tee = _Tee()
    sys.stdout = tee
    try:
        print(f"$ python {script} " + " ".join(sys.argv[1:]))
        yield
    finally:
        sys.stdout = sys.__stdout__
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(tee.lines))
        tmp.replace(out)
