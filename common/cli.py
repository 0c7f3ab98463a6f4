"""The command-line layer the scripts share: one parser, range-checked argument types, the runtime
flags. No torch import here, so `--help` and usage errors stay fast.

- `OneLineParser`: argparse, but a usage error is one line, `<prog>: error: <message> (see
  --help)`, with exit status 2.
- Argument types that check a range and say what they expected: `number(flag, low, high, ...)`
  (the generation and serving flags) and `positive_int`, `count`, `seed`, `nonneg_float`,
  `fraction` (training and data preparation).
- `add_runtime_flags(parser)` declares `--device`, `--dtype`, `--quantize` and `--tokenizer`
  once for `generate_lm.py`, `serve_lm.py` and `evaluate_lm.py`; `Runtime.from_args(args)` reads
  them back as typed values for `model.loading`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

DTYPES = ("float32", "bfloat16", "float16")
# model.quant.FORMATS, named here without importing torch
QUANTIZE = ("none", "bf16", "int8", "int4")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print `<prog>: error: <message> (see --help)` on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_or_status(self, argv: list[str]) -> argparse.Namespace | int:
        """The parsed flags, or the exit status argparse chose instead (0 after `--help`, 2
        after a usage error, already printed): what a script's `main(argv)` returns then."""
        try:
            return self.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2


# -- range-checked argument types -----------------------------------------------------------------


def number(flag: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, cast: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse type that parses `cast(text)` and checks `low <= value <= high`.

    Args:
        flag: the flag's name, shown by argparse in its messages.
        low: the smallest value (None: no bound).
        high: the largest value (None: no bound).
        low_open: `low` itself is refused (`value > low`).
        cast: `int` or `float` (floats must be finite).

    Returns:
        The type function; its errors read "must be in [0, 1], got 2".
    """

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if cast is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if high is not None:
            rng = f"in {'(' if low_open else '['}{low}, {high}]"
        else:
            rng = f"> {low}" if low_open else f">= {low}"
        if (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return value

    parse.__name__ = flag  # argparse shows this name in its own messages
    return parse


def _expected(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise _expected("a positive integer", text) from None
    if value < 1:
        raise _expected("a positive integer", text)
    return value


def count(text: str) -> int:
    """An integer >= 1, also written in scientific notation (`1e8`)."""
    try:
        value = int(float(text)) if re.fullmatch(r"[\d.]+e\d+", text) else int(text)
    except ValueError:
        raise _expected("a positive integer", text) from None
    if value < 1:
        raise _expected("a positive integer", text)
    return value


def seed(text: str) -> int:
    """A training seed: an integer in [0, 2**63), what numpy's and torch's generators both
    accept."""
    try:
        value = int(text)
    except ValueError:
        raise _expected("an integer", text) from None
    if not 0 <= value < 2**63:
        raise _expected("an integer in [0, 2**63)", text)
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise _expected("a number", text) from None
    if not value >= 0 or value == float("inf"):
        raise _expected("a finite number >= 0", text)
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise _expected("a number in (0, 1)", text) from None
    if not 0 < value < 1:
        raise _expected("a number in (0, 1)", text)
    return value


# -- the runtime flags ----------------------------------------------------------------------------


def add_runtime_flags(parser: argparse.ArgumentParser | Any, *, tokenizer: bool = True,
                      dtype_help: str | None = None) -> None:
    """Declare `--device`, `--dtype`, `--quantize` and `--tokenizer` on a parser or group.

    Args:
        parser: an `argparse.ArgumentParser` or one of its argument groups.
        tokenizer: False for a parser that declares `--tokenizer` already.
        dtype_help: `--dtype`'s help, for a script that computes otherwise than decoding does
            (`evaluate_lm.py` autocasts on the CPU too).
    """
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="auto, cpu, cuda, cuda:N or mps (default: auto = cuda, mps, then "
                             "cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help=dtype_help or (
                            "compute dtype: float32, or bfloat16/float16 autocast on a GPU; on "
                            "CPU, bfloat16 means --quantize bf16 and float16 is autocast, which "
                            "is slower than float32 there (default: float32)"))
    parser.add_argument("--quantize", default="none", choices=QUANTIZE,
                        help="CPU weight format for decoding: none (float32), bf16, int8 "
                             "(per-channel int8 weights) or int4 (llama.cpp's Q4_0 scheme); "
                             "checkpoints are not changed (default: none)")
    if tokenizer:
        parser.add_argument("--tokenizer", metavar="NAME",
                            help="gpt2 (the bundled copy), a local tokenizer folder or a hub "
                                 "name (default: the checkpoint's tokenizer, else gpt2)")


def device_error(device: str) -> str | None:
    """The usage error for a `--device` value that cannot name a device, or None (checked
    without torch, so a typo fails at once)."""
    if DEVICE_RE.match(device.strip().lower()):
        return None
    return f"--device: unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Runtime:
    """The runtime flags as typed values (`Runtime.from_args(parser.parse_args())`).

    Attributes:
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: float32, bfloat16 or float16.
        quantize: the CPU weight format: none, bf16 or int8.
        tokenizer: a tokenizer name or folder; None: the checkpoint's, else gpt2.
    """

    device: str = "auto"
    dtype: str = "float32"
    quantize: str = "none"
    tokenizer: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Runtime:
        """The values `add_runtime_flags` declared, from parsed arguments."""
        return cls(device=args.device, dtype=args.dtype, quantize=args.quantize,
                   tokenizer=args.tokenizer)
