#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on your corpus, for `prepare_data.py --tokenizer DIR`.

    python train_tokenizer.py data/tinyshakespeare.txt --vocab_size 4096 --out my_tokenizer
    python train_tokenizer.py "dumps/*.jsonl.zst" --text_field content --vocab_size 32768 \\
        --max_bytes 2e9 --out tok32k
    python train_tokenizer.py roneneldan/TinyStories --vocab_size 8192 --out tok_tinystories

SOURCE is what `prepare_data.py` reads (a file, a glob or a folder of .txt, .jsonl(.gz/.zst),
.parquet, .arrow, or a Hugging Face dataset streamed), several in order. The tokenizer is GPT-2's
kind with its own vocabulary: byte-level (any text round-trips byte for byte), GPT-2's
pre-tokenizer (which llama.cpp knows, so GGUF exports tokenize the same), `<|endoftext|>` as id
0. Training streams the text on every core with bounded memory, and the same source gives
byte-identical files. It prints progress on stderr and a summary: bytes per token on a held-out
sample next to GPT-2's, the time and the peak memory. See corpus/tokenizer_training.py (how) and
docs/data.md (how to use the folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.cli import OneLineParser, count, number  # noqa: E402
from corpus.shards import DataError  # noqa: E402
from prepare_data import add_source_flags, open_source  # noqa: E402


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="train_tokenizer.py", description=__doc__.split("\n\n")[0],
                      epilog="Examples and how to use the folder: docs/data.md.")
    p.add_argument("source", metavar="SOURCE", nargs="+",
                   help="local files (file, glob, folder) or a Hugging Face dataset name; "
                        "several are read in order")
    p.add_argument("--vocab_size", type=count, required=True, metavar="N",
                   help="tokens in all: 256 bytes, the special tokens and the merges (e.g. 4096)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="the tokenizer folder to write (new or empty; --force replaces one)")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    add_source_flags(p.add_argument_group("source"))
    t = p.add_argument_group("training")
    t.add_argument("--special_tokens", nargs="+", default=[], metavar="TOKEN",
                   help="special tokens after <|endoftext|> (id 0), e.g. <|im_start|> <|im_end|>")
    t.add_argument("--max_bytes", type=count, default=None,
                   help="read at most about this many bytes of text (e.g. 5e8; default: all)")
    t.add_argument("--held_out", type=number("--held_out", 0, 0.5), default=0.05,
                   help="share of the text kept out of training to measure bytes per token "
                        "(default 0.05; 0: none)")
    t.add_argument("--held_out_mb", type=number("--held_out_mb", 0, low_open=True),
                   default=8.0, help="at most this many MB held out (default 8)")
    t.add_argument("--no_progress", action="store_true", help="no progress on stderr")
    return p


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out} exists and is not empty; pass --force to replace it")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_or_status(argv)
    if isinstance(args, int):
        return args
    try:
        from corpus.tokenizer_training import TokenizerTrainConfig, check_config, train_tokenizer

        out = Path(args.out)
        cfg = TokenizerTrainConfig(
            sources=[], out=out, vocab_size=args.vocab_size,
            special_tokens=tuple(args.special_tokens), held_out=args.held_out,
            held_out_max_bytes=int(args.held_out_mb * 1e6), max_bytes=args.max_bytes,
            utf8=args.utf8, progress=not args.no_progress)
        check_config(cfg)  # the settings first: nothing is read for a vocabulary that cannot be
        _check_out(out, args.force)
        cfg.sources = [open_source(spec, args) for spec in args.source]
        summary = train_tokenizer(cfg)
    except DataError as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_tokenizer.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # a read error, a full disk: the folder is written whole or not at all
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"train_tokenizer.py: error: {exc.strerror or exc}{where}; nothing was written",
              file=sys.stderr)
        return 2
    try:
        print("\n".join(summary.lines()), flush=True)
    except BrokenPipeError:  # the reader went away (`| head`): the folder is written; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
