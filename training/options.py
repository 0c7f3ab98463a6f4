"""`train_lm.py`'s command line: flags, presets, the flags given, device and precision choice.

`parse_args` returns the argparse namespace (defaults, then the preset, then the command line)
and the names of the flags given; `training.config.resolve_config` turns them into the run's
typed configuration (the one reader of the namespace).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from common.cli import OneLineParser
from common.cli import nonneg_float as _nonneg_float
from common.cli import positive_int as _positive_int
from common.cli import seed as _seed
from corpus.datasets import add_data_args
from model.config import ARCHITECTURES
from training.errors import UsageError
from training.loggers import LOG_TO
from training.optim import OPTIMIZERS, SCHEDULES

__all__ = ["PRESETS", "UsageError", "build_parser", "parse_args", "max_steps_cap",
           "windows_per_eval", "resolve_dtype", "cpu_has_bf16", "DTYPE_NAMES"]

MAX_STEPS_ENV = "LM_MAX_STEPS"
MAX_EVAL_WINDOWS_ENV = "LM_MAX_EVAL_WINDOWS"

# Presets set defaults; flags given on the command line win. Their figures come from
# `bench/training.py` and from running these presets (docs/benchmarks.md, docs/training.md).
PRESETS: dict[str, dict[str, Any]] = {
    # About 2 minutes on a 2-core CPU: Shakespeare-shaped samples (names, verse lines) after it.
    # The modern blocks and a 2,048-token BPE trained on the training split (--train_tokenizer):
    # with GPT-2's 50,257 head columns a step of this model took 4.6x as long, so the same two
    # minutes buy 900 steps instead of 300 (about five passes, dropout 0.1 against overfitting).
    # Muon + AdamW with a warmup-stable-decay schedule (see docs/training.md, "Training recipe").
    # Before and after: bench/results/quality_demo_cpu_2core.txt.
    "demo": dict(d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=128, dropout=0.1,
                 batch_size=16, optimizer="muon", muon_lr=0.02, lr=2e-3, min_lr=0.0,
                 schedule="wsd", cooldown=0.3, warmup_steps=30, max_steps=900,
                 eval_interval=300, eval_windows=100, sample_tokens=80, arch="modern",
                 train_tokenizer=2048),
    # The lowest validation bits per byte we found in a 10-minute budget (--time_budget) of a
    # 2-core CPU, on text data: the modern blocks (RoPE, RMSNorm, QK-norm, ReLU², an untied
    # soft-capped head) and a 2,048-token BPE trained on the training split (--train_tokenizer;
    # its small head makes a step cheaper than GPT-2's 50,257 columns), on a model small enough
    # to make about 3,500 steps, some 20 passes (128 wide: 256 or 192 wide, or deeper, scored
    # worse in the same time), dropout 0.05; its training windows re-segmented (--split_tokens
    # 0.05: a token split into its BPE merge's two tokens one time in twenty, so twenty passes
    # do not memorise one segmentation; 0.03, 0.1 and 0.2 scored worse); Muon 0.03 with weight
    # decay 0.1 and AdamW 6e-3, a 10-step warm-up and a 60% cool-down, and an average of the
    # weights (EMA 0.99) as what is evaluated and saved. What each ingredient bought:
    # bench/results/quality_ingredients_cpu_2core.txt and quality_split_cpu_2core.txt
    # (docs/benchmarks.md); the runs behind the other settings: docs/training.md ("Training
    # recipe"), bench/results/quality_history.md.
    "cpu-10min": dict(d_model=128, num_heads=2, num_layers=4, d_ff=512, max_seq_len=128,
                      dropout=0.05, batch_size=16, optimizer="muon", muon_lr=0.03, lr=6e-3,
                      min_lr=0.0, schedule="wsd", cooldown=0.6, warmup_steps=10,
                      muon_weight_decay=0.1, ema=0.99, time_budget=10.0, eval_interval=150,
                      eval_windows=0, unseen_tokens="shared", arch="modern",
                      train_tokenizer=2048, split_tokens=0.05),
    # GPT-2 small (124M) on GPUs: 64 sequences of 1,024 tokens per step per process.
    "gpt2-124m": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024,
                      dropout=0.0, batch_size=16, grad_accum=4, lr=6e-4, min_lr=6e-5,
                      warmup_steps=200, weight_decay=0.1, eval_interval=250, eval_windows=200),
    # Fine-tuning with --init_from (as nanoGPT's Shakespeare fine-tune of GPT-2): a small peak
    # rate decaying to a tenth, a short warmup, weight decay on matrices only (never LayerNorm
    # or biases; see training/optim.py). The model's shape comes from --init_from.
    "finetune": dict(lr=6e-5, min_lr=6e-6, warmup_steps=10, weight_decay=0.1, max_steps=200,
                     batch_size=8, eval_interval=50, eval_windows=100),
}


_TIME_RE = re.compile(r"\s*([0-9.e+-]+)\s*(s|sec|m|min|h)?\s*")
_MINUTES_PER = {"s": 1 / 60, "sec": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}


def _minutes(text: str) -> float:
    """`--time_budget`: minutes, as a plain number (10) or with a unit (90s, 10min, 1.5h)."""
    m = _TIME_RE.fullmatch(text.lower())
    try:
        value = float(m.group(1)) * _MINUTES_PER[m.group(2) or "m"] if m else math.nan
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive time in minutes (10, or with a "
                                         f"unit: 90s, 10min, 1.5h), got {text!r}")
    return value


def build_parser() -> OneLineParser:
    """The full parser with every flag and its default (before presets)."""
    p = OneLineParser(
        prog="train_lm.py",
        description="Train a GPT-style language model. Snapshots go to "
                    "lm_<dataset>/snapshots/ (latest.pt, best.pt, snapshot_*.pt).",
        epilog=f"Environment: {MAX_STEPS_ENV}=N stops after N optimizer steps in total, keeping "
               "the learning-rate schedule of the full run (for smoke tests and docs); a "
               f"snapshot is written when it stops. {MAX_EVAL_WINDOWS_ENV}=N caps the windows of "
               "each evaluation (--eval_windows, 0 = all) at N. Both caps apply under "
               f"--time_budget: {MAX_STEPS_ENV} stops the planned run early (its plan and "
               "schedule unchanged) and the plan is made with the capped evaluations. "
               "Multi-GPU / multi-process: "
               "torchrun --nproc_per_node=N training/train_lm.py ...",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a tested recipe; other flags override its values. demo: ~2 minutes on "
                        "a CPU; cpu-10min: best bits per byte in 10 CPU minutes; gpt2-124m: "
                        "GPT-2 small; finetune: a small learning rate, to train on from "
                        "--init_from weights")
    p.add_argument("--explain", action="store_true",
                   help="print what this command would do (sizes, time, memory, paths) and exit")
    add_data_args(p, train_tokenizer=True)
    _add_model_flags(p)
    _add_training_flags(p)
    _add_speed_flags(p)
    _add_output_flags(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (LanguageModel arguments)")
    m.add_argument("--vocab_size", type=_positive_int, default=None,
                   help="default: the tokenizer's vocabulary (50257 for gpt2)")
    m.add_argument("--d_model", type=_positive_int, default=128)
    m.add_argument("--num_heads", type=_positive_int, default=4)
    m.add_argument("--num_layers", type=_positive_int, default=4)
    m.add_argument("--d_ff", type=_positive_int, default=512)
    m.add_argument("--max_seq_len", type=_positive_int, default=128,
                   help="context length of the model")
    m.add_argument("--dropout", type=_nonneg_float, default=0.1)
    m.add_argument("--arch", choices=list(ARCHITECTURES), default=None,
                   help="the blocks of a new model: gpt2 (learned positions, LayerNorm, GELU), "
                        "llama (RoPE, RMSNorm, SwiGLU, no biases) or modern (RoPE, RMSNorm "
                        "without weights, QK-norm, ReLU², untied head, logit soft-cap 15). "
                        "Default: gpt2, or the blocks of --init_from / --resume")
    m.add_argument("--num_kv_heads", type=_positive_int, default=None,
                   help="key/value heads (grouped-query attention; must divide --num_heads). "
                        "Default: --num_heads")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--seq_len", type=_positive_int, default=None,
                   help="tokens per training sequence (default: max_seq_len)")
    t.add_argument("--batch_size", type=_positive_int, default=16,
                   help="sequences per micro-batch per process")
    t.add_argument("--grad_accum", "--gradient_accumulation_steps", dest="grad_accum",
                   type=_positive_int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--split_tokens", type=_nonneg_float, default=0.0, metavar="P",
                   help="re-segment the training text: split each token into the two tokens of "
                        "the BPE merge that made it with probability P, and each part again "
                        "with P (a new segmentation of the same text every time; validation "
                        "stays canonical). 0: off")
    t.add_argument("--max_steps", type=_positive_int, default=None,
                   help="optimizer steps in the whole run (default: --epochs worth)")
    t.add_argument("--time_budget", type=_minutes, default=None, metavar="MINUTES",
                   help="train for this wall-clock time instead of a step count: the run times "
                        "a step, an evaluation and a snapshot here first and plans its steps so "
                        "that the whole command ends within the budget, its schedule included "
                        "(10 = ten minutes; also 90s, 1.5h). The plan is printed and kept by "
                        "--resume. Not with --max_steps or --epochs; either replaces a preset's "
                        "budget")
    t.add_argument("--epochs", type=_nonneg_float, default=5.0,
                   help="passes over the training data when --max_steps is not given (an "
                        "explicit --epochs also replaces a preset's step count)")
    t.add_argument("--lr", "--learning_rate", dest="lr", type=_nonneg_float, default=2e-3,
                   help="peak learning rate (0: the weights never change, e.g. to measure a "
                        "starting point)")
    t.add_argument("--min_lr", type=_nonneg_float, default=None,
                   help="final learning rate of the cosine decay (default: lr / 10)")
    t.add_argument("--warmup_steps", type=int, default=30)
    t.add_argument("--weight_decay", type=_nonneg_float, default=0.1,
                   help="AdamW's decoupled weight decay (matrices and embeddings only)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw: AdamW on everything; muon: Muon on the blocks' matrices, AdamW "
                        "(--lr) on embeddings, LayerNorms and biases")
    t.add_argument("--muon_lr", type=_nonneg_float, default=0.02,
                   help="Muon's peak learning rate (--optimizer muon)")
    t.add_argument("--muon_momentum", type=_nonneg_float, default=0.95,
                   help="Muon's Nesterov momentum")
    t.add_argument("--muon_weight_decay", type=_nonneg_float, default=0.0,
                   help="Muon's decoupled weight decay")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning-rate schedule after the warm-up: cosine decay to --min_lr, or "
                        "wsd (warmup-stable-decay: constant, then a linear cool-down to --min_lr "
                        "over the last --cooldown of the run)")
    t.add_argument("--cooldown", type=_nonneg_float, default=0.2,
                   help="wsd: the fraction of the steps spent cooling down, in (0, 1]")
    t.add_argument("--ema", type=_nonneg_float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay "
                        "(e.g. 0.99); evaluation and every snapshot's weights use it (0: off)")
    t.add_argument("--beta1", type=_nonneg_float, default=0.9)
    t.add_argument("--beta2", type=_nonneg_float, default=0.95)
    t.add_argument("--grad_clip", type=_nonneg_float, default=1.0,
                   help="clip the global gradient norm to this (0: off)")
    t.add_argument("--seed", type=_seed, default=1337)


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speed")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast precision (auto: bfloat16 where the hardware has it, float16 "
                        "with loss scaling on older GPUs, else float32)")
    s.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    s.add_argument("--no_fused_loss", action="store_true",
                   help="compute the loss from full logits (model(idx, targets)) instead of the "
                        "chunked fused LM-head + cross-entropy")
    s.add_argument("--unseen_tokens", choices=("full", "shared"), default="full",
                   help="shared: the token ids that never occur in the training split start "
                        "with equal embedding rows, which training keeps equal, so the LM head's "
                        "loss computes one column for all of them (the same loss, a fraction of "
                        "the head's cost on a small corpus; a new run only, not --init_from). "
                        "full: every row computed")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("evaluation, logging, snapshots")
    e.add_argument("--eval_interval", type=_positive_int, default=100,
                   help="validate every N steps (and at the end)")
    e.add_argument("--eval_windows", type=int, default=200,
                   help="validation windows per evaluation, spread over the split (0: all)")
    e.add_argument("--eval_batch_size", type=_positive_int, default=None,
                   help="default: --batch_size")
    e.add_argument("--log_interval", type=_positive_int, default=10,
                   help="log training loss every N steps")
    e.add_argument("--save_interval", type=_positive_int, default=None,
                   help="write a snapshot every N steps (default: --eval_interval)")
    e.add_argument("--keep_last", type=_positive_int, default=5,
                   help="timestamped snapshots to keep (best.pt's source is always kept)")
    e.add_argument("--out_dir", default=None, help="run directory (default: lm_<dataset>)")
    e.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the run directory's latest snapshot, or from PATH")
    e.add_argument("--init_from", default=None, metavar="SOURCE",
                   help="start a new run (step 0, fresh optimizer) from the weights of SOURCE: "
                        "a checkpoint, run or snapshots directory, .safetensors file, Hugging "
                        "Face GPT-2 folder, or hub name such as gpt2 (from the local Hugging "
                        "Face cache); the model's shape and tokenizer come from it")
    e.add_argument("--sample_tokens", type=int, default=0,
                   help="print a sample of N tokens at each evaluation (0: none)")
    e.add_argument("--sample_prompt", default="\n", help="prompt for those samples")
    e.add_argument("--eval_tasks", default=None, metavar="A,B",
                   help="also score these lm-evaluation-harness tasks (hellaswag,arc_easy,...) at "
                        "each evaluation, on rank 0: progress line, metrics, best.pt (needs "
                        'pip install "lm-eval==0.4.13")')
    e.add_argument("--eval_tasks_limit", type=_positive_int, default=200, metavar="N",
                   help="examples per task and evaluation for --eval_tasks")
    e.add_argument("--eval_tasks_path", default=None, metavar="DIR",
                   help="a task folder in the harness's format (YAML + local JSONL) for "
                        "--eval_tasks, e.g. offline")
    e.add_argument("--no_plot", action="store_true", help="do not draw loss_curve.png")
    e.add_argument("--log_to", type=_log_targets, default="csv", metavar="csv,tensorboard,wandb",
                   help="where the scalars go, comma-separated: csv (metrics.csv, the default; "
                        "the loss plot reads it), tensorboard (<run dir>/tensorboard), wandb "
                        "(offline unless an API key is set up)")


def _log_targets(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in LOG_TO]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(LOG_TO)} separated by "
                                         f"commas, got {text!r}")
    return ",".join(dict.fromkeys(names))


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the user set on the command line (defaults suppressed)."""
    quiet = OneLineParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                quiet.add_argument(*action.option_strings, action="store_true", **kwargs)
            else:
                quiet.add_argument(*action.option_strings, **kwargs)
    ns, _ = quiet.parse_known_args(argv)
    return set(vars(ns))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse flags with the chosen preset's defaults; return (args, explicitly given dests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)  # usage errors in --preset exit here
    if pre.preset:
        parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)
    if pre.preset and "epochs" in explicit and "max_steps" not in explicit:
        args.max_steps = None  # an explicit --epochs sets the length, not the preset's steps
    _length_flags(args, explicit)
    return args, explicit


def _length_flags(args: argparse.Namespace, explicit: set[str]) -> None:
    """One flag sets the run's length: `--time_budget`, or `--max_steps` / `--epochs`; the one
    given replaces a preset's (see training/budget.py)."""
    given = [f"--{k}" for k in ("max_steps", "epochs") if k in explicit]
    if "time_budget" in explicit and given:
        raise UsageError(f"--time_budget and {' and '.join(given)} both set the run's length; "
                         "give one of them")
    if "time_budget" in explicit:
        args.max_steps = None  # a preset's step count gives way to the budget
    elif given:
        args.time_budget = None  # ... and a preset's budget to an explicit length


def _env_positive_int(name: str) -> int | None:
    """A positive integer from the environment variable `name`, or None when it is unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{name} must be a positive integer, got {raw!r}")
    return value


def max_steps_cap() -> int | None:
    """The `LM_MAX_STEPS` cap, or None; raises UsageError for a bad value."""
    return _env_positive_int(MAX_STEPS_ENV)


def windows_per_eval(eval_windows: int) -> int:
    """`--eval_windows` (0: all) capped by `LM_MAX_EVAL_WINDOWS` (smoke tests, docs); raises
    UsageError for a bad value. The flag itself is kept as it is, so snapshots keep its value and
    a resume without the cap evaluates as the flag says (as `LM_MAX_STEPS` leaves
    `--max_steps`)."""
    cap = _env_positive_int(MAX_EVAL_WINDOWS_ENV)
    return eval_windows if cap is None else min(eval_windows or cap, cap)


# -- device and precision -----------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        cpu = torch._C._cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `--dtype` on `device` (float32 means no autocast)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError("--dtype float16 needs a CUDA GPU (it uses loss scaling); use bfloat16 "
                         "or float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bfloat16 support; use --dtype float16")
    return dtype


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
