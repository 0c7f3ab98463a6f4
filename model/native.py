"""Our own batch-1 decode products in C (`model/native.c`), built for this CPU on first use.

Decoding one token at a time multiplies one input row by every weight, so it runs at the
speed the weights stream from memory. PyTorch's CPU kernels for that shape stream them well
below this machine's read bandwidth (Hugging Face's float32 GPT-2 124M at 14.3 GB/s of 30.4 on
a 2-core Zen 5 EPYC); a plain dot product per output row, vectorized by the compiler for the CPU
at hand and split over PyTorch's OpenMP threads, reaches about all of it (26-34 GB/s there:
`bench/results/decode_matmuls_zen5_cpu_2core.txt`). `model.quant`'s float32, bf16 and int8
weight copies use it for one row on CPU; larger batches keep oneDNN's and fbgemm's kernels.

The library is compiled once per CPU kind with the system's C compiler (`$CC`, else `cc`,
`-O3 -march=native -fopenmp`: well under a second) into a cache folder
(`$SMALL_LM_NATIVE_DIR`, default `~/.cache/small-lm/native`, named by a hash of the source, the
compiler and the CPU's flags), then checked once against `F.linear`. Without a compiler, on
another OS or architecture, or with `SMALL_LM_NATIVE=0`, it is skipped and PyTorch's kernels
run as before: `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Set to False (or SMALL_LM_NATIVE=0 in the environment) to use PyTorch's kernels only.
ENABLED = os.environ.get("SMALL_LM_NATIVE", "1") != "0"
# The kernel of each weight dtype (int8: with a float32 scale per row).
_KERNELS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.int8: "gemv_int8"}
_why_not = ""


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")


def _cache_dir() -> Path:
    root = os.environ.get("SMALL_LM_NATIVE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "small-lm" / "native"


def _build(compiler: str) -> Path:
    """The compiled library for this source, compiler and CPU: from the cache, or built now
    (into a private file, then renamed: processes building at once each leave a whole file)."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(),
                                     " ".join(FLAGS).encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="small-lm-native-"))
    lib = folder / f"native-{key}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in _KERNELS.values():
        fn = getattr(lib, name)
        fn.argtypes = [p, i64, p, p, i64, p, p, i32]  # x, k, w, scale, n, bias, y, threads
        fn.restype = None
    lib.native_lanes.argtypes, lib.native_lanes.restype = [], i32
    return lib


def _agrees(lib: ctypes.CDLL) -> bool:
    """Each kernel against F.linear on a width with a vector tail, with a bias."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 203, generator=g), torch.randn(1, 203, generator=g)
    b = torch.randn(37, generator=g)
    q = torch.randint(-127, 128, (37, 203), generator=g, dtype=torch.int8)
    scale = torch.rand(37, generator=g) / 100
    cases = [(_call(lib, x, w, b), F.linear(x, w, b)),
             (_call(lib, x, w.bfloat16(), b), F.linear(x, w.bfloat16().float(), b)),
             (_call(lib, x, q, b, scale), F.linear(x, q.float() * scale[:, None], b))]
    return all(torch.allclose(y, ref, rtol=1e-4, atol=1e-4) for y, ref in cases)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built and checked library, or None where it cannot be had (see `status`)."""
    global _why_not
    if not ENABLED:
        _why_not = "turned off (SMALL_LM_NATIVE=0)"
        return None
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64",
                                                                                   "amd64"):
        _why_not = f"not built on {sys.platform}/{platform.machine()} (measured on x86-64 Linux)"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _why_not = "no C compiler (set CC, or install gcc)"
        return None
    try:
        lib = _load(_build(compiler))
    except (OSError, subprocess.SubprocessError) as exc:
        _why_not = f"build failed with {compiler}: {str(exc).splitlines()[0][:200]}"
        return None
    if lib.native_lanes() == 0:
        _why_not = "this CPU has neither AVX-512 nor AVX2 with FMA: PyTorch's kernels are faster"
        return None
    if not _agrees(lib):
        _why_not = "built, but disagreed with F.linear: not used"
        return None
    return lib


def status() -> str:
    """One line: whether the native products are in use here, and if not why."""
    return "in use" if library() is not None else f"not in use: {_why_not}"


def usable(w: torch.Tensor) -> bool:
    """Whether `linear_row` takes this weight: a contiguous (out, in) float32, bf16 or int8
    matrix on the CPU, with the library available."""
    return (w.device.type == "cpu" and w.dtype in _KERNELS and w.dim() == 2
            and w.is_contiguous() and library() is not None)


def _call(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
          scale: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.reshape(-1).float().contiguous()  # (in,)
    n = w.size(0)
    if xf.numel() != w.size(1) or (bias is not None and bias.numel() != n):
        raise ValueError(f"linear_row: one row of {w.size(1)} inputs (and {n} biases) needed, "
                         f"got x {tuple(x.shape)}")
    y = torch.empty(*x.shape[:-1], n)
    bf = None if bias is None else bias.detach().float().contiguous()
    b_ptr = None if bf is None else bf.data_ptr()
    s_ptr = None
    if w.dtype == torch.int8:
        if scale is None or scale.dtype != torch.float32 or scale.numel() != n:
            raise ValueError("linear_row: int8 weights need their float32 scale per row")
        s_ptr = scale.data_ptr()
    getattr(lib, _KERNELS[w.dtype])(xf.data_ptr(), xf.numel(), w.data_ptr(), s_ptr, n, b_ptr,
                                    y.data_ptr(), torch.get_num_threads())
    return y


def linear_row(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` for an x (..., in) of one row, in float32 (x's values taken as
    float32, so a bf16 x is exact); `w` as `usable` requires; an int8 `w` stands for
    `w * scale[:, None]` (`scale`: (out,) float32). Returns (..., out) float32.

    Raises:
        ValueError: x is not one row of w's width, or the bias or scale do not fit.
    """
    return _call(library(), x, w, bias, scale)
