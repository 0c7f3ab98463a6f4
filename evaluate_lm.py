#!/usr/bin/env python
"""Perplexity of a checkpoint on a dataset split or any text file.

    python evaluate_lm.py --checkpoint lm_shakespeare/snapshots/latest.pt            # val split
    python evaluate_lm.py --checkpoint lm_wikitext --dataset wikitext --data_dir wikitext-2 \
        --split test --stride 128
    python evaluate_lm.py --checkpoint latest.pt --file my_text.txt --json
    python evaluate_lm.py --checkpoint lm_tinystories --data data/tinystories   # its val shards
    python evaluate_lm.py --checkpoint lm_x --tasks hellaswag,arc_easy --limit 200   # downstream
    python evaluate_lm.py --checkpoint lm_x --tasks my_task --include_path my_tasks/
    python evaluate_lm.py --tasks hellaswag,arc_easy --save_tasks pinned/       # no model

Downstream tasks (`--tasks`) run through lm-evaluation-harness (`downstream/`, an optional
dependency: pip install "lm-eval==0.4.13") and print the harness's table; `--output_path` writes
its results JSON. `--save_tasks DIR` saves tasks (online: their data from the hub) to a task
folder with the sha256 of its data, which later runs check before scoring (`downstream/save.py`).

Windows follow Hugging Face's perplexity guide (see training/evaluation.py): `--stride` equal to
the context length (the default) gives non-overlapping windows; a smaller stride scores every
token once with up to `seq_len - stride` tokens of context, which lowers perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from common.cli import OneLineParser, Runtime, add_runtime_flags
from corpus.datasets import DataArgs, DataError, add_data_args, load_split, no_bytes_note

SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: usage errors are instant)."""
    p = OneLineParser(
        prog="evaluate_lm.py",
        description="Perplexity, mean loss and bits per byte of a checkpoint, with sliding "
        "windows as in Hugging Face's perplexity guide.",
    )
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file, run folder (lm_x/) or .safetensors export (required, "
                        "except with --save_tasks)")
    add_data_args(p)
    # The checkpoint's own tokenizer unless --tokenizer says otherwise.
    p.set_defaults(tokenizer=None)
    p._option_string_actions["--tokenizer"].help = (
        "tokenizer name or folder (default: the one recorded in the checkpoint, else gpt2)"
    )
    p.add_argument("--file", metavar="PATH", default=None,
                   help="evaluate this whole UTF-8 text file instead of a dataset split")
    p.add_argument("--split", choices=SPLITS, default=None, help="dataset split (default: val)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="window length in tokens (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: seq_len, no overlap)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    add_runtime_flags(p, tokenizer=False,  # --tokenizer: add_data_args has it
                      dtype_help="autocast dtype for the forward pass (the loss is summed in "
                                 "float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", default=None, metavar="A,B",
                   help="score these harness tasks (hellaswag,arc_easy,...) instead of perplexity")
    g.add_argument("--limit", type=float, default=None, metavar="N",
                   help="examples per task (an integer), or a fraction of each task below 1")
    g.add_argument("--include_path", default=None, metavar="DIR",
                   help="a task folder in the harness's format (YAML + local JSONL/Parquet)")
    g.add_argument("--num_fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per prompt (default: each task's own)")
    g.add_argument("--output_path", default=None, metavar="FILE",
                   help="write the harness's results JSON here")
    g.add_argument("--log_samples", action="store_true",
                   help="keep every example's prompts and answers in the --output_path JSON")
    g.add_argument("--save_tasks", default=None, metavar="DIR",
                   help="save the --tasks to a new task folder (the harness's YAML, their data "
                        "as Parquet and the sha256 of each file) instead of scoring: run it "
                        "online, then score offline with --include_path DIR; no --checkpoint")
    return p


DATA_FLAGS = ("file", "split", "train_file", "val_file", "test_file", "data_dir", "data", "seq_len",
              "stride")
TASK_FLAGS = ("limit", "include_path", "num_fewshot", "output_path")


def check_task_args(args: argparse.Namespace) -> None:
    """Usage errors of --tasks and its flags (ValueError, one line)."""
    if args.save_tasks is not None:
        extra = [f"--{n}" for n in ("checkpoint", "limit", "num_fewshot", "output_path")
                 if getattr(args, n) is not None] + (["--log_samples"] if args.log_samples else [])
        if args.tasks is None:
            raise ValueError("--save_tasks DIR saves the tasks named by --tasks; add --tasks "
                             "NAMES")
        if extra:
            raise ValueError(f"--save_tasks saves whole tasks and scores nothing; drop "
                             f"{', '.join(extra)}")
    elif args.checkpoint is None:
        raise ValueError("--checkpoint PATH is required (only --save_tasks works without a "
                         "model)")
    if args.tasks is None:
        extra = [f"--{n}" for n in TASK_FLAGS if getattr(args, n) is not None]
        if args.log_samples:
            extra.append("--log_samples")
        if extra:
            raise ValueError(f"{', '.join(extra)} go with --tasks; add --tasks NAMES or drop them")
        return
    clash = [f"--{n}" for n in DATA_FLAGS if getattr(args, n, None) is not None]
    if clash:
        raise ValueError(f"--tasks scores downstream tasks, not text; drop {', '.join(clash)}")
    if args.limit is not None and not (args.limit >= 1 and args.limit == int(args.limit)
                                       or 0 < args.limit < 1):
        raise ValueError(f"--limit must be a whole number of examples >= 1 or a fraction "
                         f"between 0 and 1, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.log_samples and args.output_path is None:
        raise ValueError("--log_samples writes into the results JSON; add --output_path FILE")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include_path {args.include_path}: no such folder")


def run_tasks(args: argparse.Namespace) -> dict:
    """Score downstream tasks as the parsed arguments say; returns the harness's results."""
    from downstream.harness import SmallLM
    from downstream.tasks import clean_json, load_tasks, parse_task_names
    from downstream.tasks import run_tasks as run_harness

    names = parse_task_names(args.tasks)
    tasks = load_tasks(names, include_path=args.include_path)  # before the model: errors first
    lm = SmallLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer, device=args.device,
                 quantize=args.quantize, dtype=args.dtype, batch_size=args.batch_size)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = run_harness(lm, tasks, limit=limit, num_fewshot=args.num_fewshot,
                          log_samples=args.log_samples)
    stats = lm.stats
    results["small_lm"] = {"checkpoint": args.checkpoint, "context": lm.max_length,
                           "scoring": dict(vars(stats))}
    if tasks.pins:  # a pinned folder: the files scored, checked against its manifest
        scored = set(results.get("results", {}))
        results["small_lm"]["pinned_tasks"] = {
            "folder": str(args.include_path),
            "tasks": {t: pin for t, pin in tasks.pins.items() if t in scored}}
        files = sum(len(p["data"]) + len(p["code"]) for p in tasks.pins.values())
        print(f"note: task folder {args.include_path}: {files} file(s) match the sha256 in its "
              "manifest.json", file=sys.stderr)
    for count, what in ((stats.truncated, "log-likelihood requests had their context cut on "
                                          "the left"),
                        (stats.endings_cut, "log-likelihood requests had an ending longer than "
                                            "the context (its last tokens scored)"),
                        (stats.gen_truncated, "generation prompts were cut on the left")):
        if count:
            total = stats.generated if "generation" in what else stats.requests
            print(f"note: {count} of {total} {what} to fit the model's context of "
                  f"{lm.max_length} tokens (as the harness's hf backend does)", file=sys.stderr)
    clean = clean_json(results)
    if args.output_path is not None:
        Path(args.output_path).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return clean


def check_args(args: argparse.Namespace) -> None:
    """Usage errors found without loading anything (ValueError, one line)."""
    for name in ("batch_size", "seq_len", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError("--seq_len must be at least 2 (a token needs context to be scored)")
    if args.seq_len is not None and args.stride is not None and args.stride > args.seq_len:
        raise ValueError(f"--stride {args.stride} is larger than --seq_len {args.seq_len}")
    if args.quantize != "none" and args.dtype != "float32":
        raise ValueError(f"--quantize {args.quantize} sets the weight format itself; drop "
                         f"--dtype {args.dtype}")
    if args.file is not None:
        clash = [f"--{n}" for n in ("split", "train_file", "val_file", "test_file", "data_dir",
                                    "data") if getattr(args, n, None) is not None]
        if clash:
            raise ValueError(f"--file evaluates the whole file; drop {', '.join(clash)}")
        if not Path(args.file).is_file():
            raise ValueError(f"--file {args.file}: no such file")


def read_text_file(path: str | Path, tokenizer) -> tuple:
    """Tokenize a whole UTF-8 text file: (int64 token array, number of bytes)."""
    import numpy as np

    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--file {path} is not UTF-8 text (byte {exc.start}); convert it first") \
            from None
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"--file {path} holds {len(ids)} token(s); need at least 2 to evaluate")
    return np.asarray(ids, dtype=np.int64), len(raw)


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed arguments say; returns the report as a dict."""
    check_task_args(args)
    check_args(args)
    if args.save_tasks is not None:
        from downstream.save import save_tasks
        from downstream.tasks import parse_task_names

        names = parse_task_names(args.tasks)
        return {"saved": save_tasks(names, args.save_tasks, include_path=args.include_path),
                "out": args.save_tasks}
    if args.tasks is not None:
        return run_tasks(args)
    from model.checkpoint import pick_device
    from model.loading import load_for_inference
    from model.tokenizer import TokenizerLoadError, tokenizer_source
    from training.byte_counts import byte_table
    from training.evaluation import evaluate_tokens

    runtime = Runtime.from_args(args)
    device = pick_device(runtime.device)  # before reading a large file
    if runtime.quantize != "none" and device.type != "cpu":
        raise ValueError(f"--quantize {runtime.quantize} is for the CPU, but the device is "
                         f"{device}; use --dtype bfloat16 on a GPU, or pass --device cpu")
    try:  # (the loader checks that the tokenizer's vocabulary is the model's)
        loaded = load_for_inference(args.checkpoint, device=device, weights=runtime.quantize,
                                    tokenizer=runtime.tokenizer)
    except TokenizerLoadError as exc:
        raise DataError(str(exc)) from None
    model, tokenizer, checkpoint = loaded.model, loaded.tokenizer, loaded.checkpoint
    if args.file is not None:
        tokens, num_bytes = read_text_file(args.file, tokenizer)
        data = f"file {args.file}"
    else:
        split = args.split or "val"
        # load_split checks --data's tokenizer against it, or prepares the built-in data with it
        args.tokenizer = runtime.tokenizer or tokenizer_source(checkpoint)
        ckpt_path = Path(checkpoint["_path"])
        flags = dict(vars(args))  # the data flags and the tokenizer: a `DataArgs`
        if not args.cache_dir and ckpt_path.parent.name == "snapshots":
            flags["out_dir"] = str(ckpt_path.parent.parent)  # share the training run's token cache
        # --data: checks the checkpoint's tokenizer
        tokens, num_bytes = load_split(DataArgs.from_dict(flags), split)
        data = f"{tokens.description}, {split} split"
        if num_bytes is None:
            print(no_bytes_note(tokens, split), file=sys.stderr)
    # Bits per byte counts the bytes of the scored tokens: exactly, with a byte-level tokenizer.
    table = byte_table(tokenizer, tokens, num_bytes, model.config.vocab_size)
    result = evaluate_tokens(
        model, tokens, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
        device=device, dtype=None if args.dtype == "float32" else args.dtype, progress=True,
        num_bytes=num_bytes, token_bytes=table,
    )
    return {
        "checkpoint": checkpoint["_path"],
        "data": data,
        "num_tokens": int(len(tokens)),
        "num_bytes": None if num_bytes is None else int(num_bytes),
        **result.to_dict(),
        "bytes_scored_exact": table is not None,
        "device": str(device),
        "dtype": args.dtype,
        "quantize": args.quantize,
    }


def format_report(report: dict) -> str:
    """The human-readable report."""
    size = ("byte count unknown" if report["num_bytes"] is None
            else f"{report['num_bytes']:,} bytes")
    bpb, counted = report["bits_per_byte"], report["bytes_scored"]
    scored_bytes = ("" if counted is None else
                    f" ({'' if report['bytes_scored_exact'] else 'about '}{counted:,.0f} bytes)")
    lines = [
        f"checkpoint:    {report['checkpoint']}",
        f"data:          {report['data']} ({report['num_tokens']:,} tokens, {size})",
        f"windows:       {report['windows']:,} (seq_len {report['seq_len']}, "
        f"stride {report['stride']})",
        f"tokens scored: {report['tokens_scored']:,}{scored_bytes}",
        f"loss:          {report['loss']:.4f} nats/token",
        f"perplexity:    {report['perplexity']:.4f}",
        "bits per byte: " + ("unavailable (the text's byte count is unknown)" if bpb is None
                             else f"{bpb:.4f}"),
    ]
    if report["quantize"] != "none":
        lines.insert(4, f"weights:       {report['quantize']} (--quantize)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("evaluate_lm.py: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # DataError, CheckpointError, DeviceError, bad values
        text = str(exc).strip()
        print(f"evaluate_lm.py: error: {text.splitlines()[0] if text else type(exc).__name__}",
              file=sys.stderr)
        return 2
    if args.save_tasks is not None:
        from downstream.save import format_saved

        text = json.dumps(report["saved"]) if args.json else format_saved(report["saved"],
                                                                          report["out"])
    elif args.tasks is not None:
        from downstream.tasks import format_table

        text = json.dumps(report) if args.json else format_table(report)
    elif args.json:
        # An infinite perplexity is not valid JSON; write it as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in report.items()}
        text = json.dumps(clean)
    else:
        text = format_report(report)
    try:
        print(text, flush=True)
    except OSError as exc:  # e.g. redirected to a full disk
        print(f"evaluate_lm.py: error: cannot write the report ({exc.strerror or exc})",
              file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
