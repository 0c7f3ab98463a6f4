"""What the benchmark scripts share: the CPU in words, and a copy of what they print to a file."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (from /proc/cpuinfo; empty elsewhere)."""
    return _cpuinfo()[1]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor name elsewhere)."""
    return _cpuinfo()[0]


def machine() -> str:
    """The CPU in the words every benchmark records, e.g. 'AMD EPYC (AVX-512 with BF16, no AMX;
    2 cores)': its name, its widest vector instructions and AMX (kernels and figures depend on
    them), and its core count."""
    name, flags = _cpuinfo()
    simd = ("AVX-512 with BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
            else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    amx = "AMX" if any(f.startswith("amx") for f in flags) else "no AMX"
    return f"{name} ({simd}, {amx}; {os.cpu_count()} cores)"


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
