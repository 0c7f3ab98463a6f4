"""common/cli.py: the one parser, the range-checked types and the runtime flags of the scripts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import (
    OneLineParser,
    Runtime,
    add_runtime_flags,
    count,
    device_error,
    fraction,
    nonneg_float,
    number,
    positive_int,
    seed,
)

REPO = Path(__file__).resolve().parents[2]


def test_a_usage_error_is_one_prefixed_line_with_exit_2(capsys):
    p = OneLineParser(prog="tool.py")
    p.add_argument("--n", type=number("--n", 1, cast=int))
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--n", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("tool.py: error: argument --n: must be >= 1, got 0 "
                                       "(see --help)\n")


@pytest.mark.parametrize("kind, text, message", [
    (number("--t", 0.0), "-1", "must be >= 0.0, got -1"),
    (number("--t", 0.0), "nan", "must be a finite number, got 'nan'"),
    (number("--p", 0.0, 1.0, low_open=True), "0", "must be in (0.0, 1.0], got 0"),
    (number("--k", 1, cast=int), "ten", "must be an integer, got 'ten'"),
    (number("--r", 0.0, low_open=True), "0", "must be > 0.0, got 0"),
    (positive_int, "0", "expected a positive integer, got '0'"),
    (count, "x", "expected a positive integer, got 'x'"),
    (seed, str(2**63), f"expected an integer in [0, 2**63), got '{2**63}'"),
    (nonneg_float, "inf", "expected a finite number >= 0, got 'inf'"),
    (fraction, "1", "expected a number in (0, 1), got '1'"),
])
def test_types_name_what_they_expected(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        kind(text)
    assert str(info.value) == message


def test_types_accept_their_ranges():
    assert number("--p", 0.0, 1.0, low_open=True)("1") == 1.0
    assert number("--seed", 0, 2**64 - 1, cast=int)(str(2**64 - 1)) == 2**64 - 1
    assert count("1e8") == 100_000_000 and positive_int("3") == 3
    assert seed("0") == 0 and nonneg_float("0") == 0.0 and fraction("0.5") == 0.5


def test_runtime_flags_are_declared_once_and_read_back_typed():
    p = OneLineParser(prog="x")
    add_runtime_flags(p)
    assert Runtime.from_args(p.parse_args([])) == Runtime()
    args = p.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--quantize", "int8",
                         "--tokenizer", "gpt2"])
    assert Runtime.from_args(args) == Runtime("cpu", "bfloat16", "int8", "gpt2")
    q = OneLineParser(prog="y")
    q.add_argument("--tokenizer")
    add_runtime_flags(q, tokenizer=False, dtype_help="autocast")
    assert q._option_string_actions["--dtype"].help == "autocast"


def test_device_error():
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps", " CPU "):
        assert device_error(ok) is None
    assert device_error("tpu") == ("--device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N "
                                   "or mps")


def test_the_cli_layer_imports_no_torch():
    code = "import sys, common.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_generate_seeds_are_the_sampling_range():
    import generate_lm
    from model.sampling import SEED_LIMIT

    assert generate_lm.SEED_MAX == SEED_LIMIT - 1
    parser = generate_lm.build_parser()
    assert parser.parse_args(["--seed", str(SEED_LIMIT - 1)]).seed == SEED_LIMIT - 1
    assert parser.parse_args(["--seed", "0"]).seed == 0
    for bad in ("-1", str(SEED_LIMIT)):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seed", bad])
    proc = subprocess.run([sys.executable, "generate_lm.py", "--prompt", "x", "--seed",
                           str(SEED_LIMIT - 1), "--num_samples", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --seed ") and proc.stderr.count("\n") == 1
