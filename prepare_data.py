#!/usr/bin/env python
"""Tokenize a corpus of any size into token shards that `train_lm.py --data DIR` trains on.

    python prepare_data.py roneneldan/TinyStories --val_split validation --out data/tinystories
    python prepare_data.py HuggingFaceFW/fineweb-edu --config sample-10BT --out data/fineweb10B
    python prepare_data.py "dumps/*.jsonl.zst" --text_field content --out data/mine
    python prepare_data.py books/ --docs file --val_docs 50 --out data/books
    python prepare_data.py hf:json --data_files "dumps/*.jsonl" --out data/mine   # via datasets

SOURCE is local files (a file, a glob or a folder of .txt, .jsonl, .jsonl.gz, .jsonl.zst,
.parquet, .arrow) or a Hugging Face dataset name (read with streaming=True: nothing is
downloaded twice or held whole; `hf:` forces a name to be read as one). Tokenization runs on
every core; memory stays bounded whatever the corpus size; the same command after a crash, a
kill -9 or a full disk keeps the complete shards and continues. The folder gets `manifest.json`
(tokenizer and its files' hash, separator, shards, documents/tokens/bytes, the source, how
validation was split, this command) and `train_NNNNNN.bin`, `val_NNNNNN.bin` shards; see
corpus/prepare.py (how), corpus/shards.py (the format), corpus/sources.py (the readers).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402

from common.cli import OneLineParser, count, fraction  # noqa: E402
from corpus.shards import DataError, file_crc32, read_header, read_manifest  # noqa: E402
from corpus.sources import (  # noqa: E402
    DOC_MODES,
    RECORD_EXTS,
    TEXT_EXTS,
    UTF8_POLICIES,
    HubDataset,
    local_files,
    resolve_local,
)

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0],
                      epilog="Examples and the format: docs/data.md.")
    p.add_argument("source", metavar="SOURCE", nargs="?",
                   help="local files (file, glob, folder) or a Hugging Face dataset name")
    p.add_argument("--out", metavar="DIR", help="the folder to write (new or empty, or the same "
                   "folder of an interrupted run)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder (headers, sizes and "
                   "checksums of every shard) and exit")
    add_source_flags(p.add_argument_group("source"))
    v = p.add_argument_group("validation (documents held out; default --val_fraction 0.0005)")
    v.add_argument("--val_fraction", type=fraction, default=None,
                   help="hold out this share of the documents (seeded, spread over the source)")
    v.add_argument("--val_docs", type=count, default=None,
                   help="hold out exactly N documents (seeded, spread over the source)")
    v.add_argument("--val_source", default=None, metavar="SOURCE",
                   help="take validation from another source instead")
    v.add_argument("--val_split", default=None, metavar="NAME",
                   help="hub datasets: take validation from this split (e.g. validation)")
    v.add_argument("--test_source", default=None, metavar="SOURCE", help="a test split source")
    v.add_argument("--test_split", default=None, metavar="NAME", help="hub: a test split")
    v.add_argument("--seed", type=int, default=0, help="seeds the validation choice")
    o = p.add_argument_group("output")
    o.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (bundled, encoded with tiktoken) or a tokenizer folder / hub name")
    o.add_argument("--shard_tokens", type=count, default=100_000_000,
                   help="tokens per shard (default 100M: 200 MB of uint16)")
    o.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token type: auto is uint16 when the vocabulary fits, else uint32")
    o.add_argument("--num_proc", type=count, default=len(os.sched_getaffinity(0)),
                   help="tokenizer processes (default: every core)")
    o.add_argument("--unit_mb", type=float, default=8.0,
                   help="MiB of text per unit of work (memory per worker is ~15x this)")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def add_source_flags(s) -> None:
    """Declare the flags that say how to read a SOURCE (hub dataset options, the text field, what
    a document is, invalid UTF-8) on a parser or group; `train_tokenizer.py` reads the same."""
    s.add_argument("--config", default=None, help="hub dataset configuration (e.g. sample-10BT)")
    s.add_argument("--split", default="train", help="hub dataset split to read (default: train)")
    s.add_argument("--data_files", nargs="+", default=None, metavar="PATTERN",
                   help="with a builder name (hf:json, hf:parquet, hf:text): the local files "
                        "it reads through `datasets`")
    s.add_argument("--revision", default=None, help="hub dataset revision (a commit or tag)")
    s.add_argument("--text_field", default="text", help="field or column holding the text")
    s.add_argument("--docs", choices=DOC_MODES, default=None,
                   help="what a document is: record (each JSON line / row; the default for "
                        "records), file (each .txt file; the default for .txt), blank_lines "
                        "(paragraphs between blank lines), wikitext (WikiText articles)")
    s.add_argument("--utf8", choices=UTF8_POLICIES, default="refuse",
                   help="invalid UTF-8: refuse (one line, exit 2; the default) or replace it with "
                        "U+FFFD, counting the replacements in the manifest")


def open_source(spec: str, args: argparse.Namespace, split: str | None = None):
    """A local source when `spec` names files, else a hub dataset (read with the flags of
    `add_source_flags`)."""
    if spec.startswith("hf:"):
        return _hub(spec[3:], args, split)
    files = local_files(spec)
    if files is not None:
        if args.data_files:
            raise DataError("--data_files goes with a builder name such as hf:json")
        return resolve_local(spec, args.docs, args.text_field)
    if split is None and _HUB_NAME.fullmatch(spec) and not spec.startswith((".", "/")) and \
            not spec.lower().endswith((*TEXT_EXTS, *RECORD_EXTS)):  # a file name: a typo
        return _hub(spec, args, split)
    raise DataError(f"{spec}: no such file, folder or glob (a Hugging Face dataset name looks "
                    "like owner/name; prefix hf: to force one)")


def _hub(name: str, args: argparse.Namespace, split: str | None):
    docs = args.docs or "record"
    if docs == "file":
        raise DataError("--docs file is for local .txt files")
    return HubDataset(name, args.config, split or args.split, args.text_field, docs,
                      args.data_files, args.revision)


def build_config(args: argparse.Namespace, argv: list[str]):
    """The `PrepareConfig` these flags describe."""
    from corpus.prepare import PrepareConfig, Stream

    if not args.source or not args.out:
        raise DataError("give SOURCE and --out DIR (or --verify DIR)")
    rules = [n for n in ("val_fraction", "val_docs", "val_source", "val_split")
             if getattr(args, n) is not None]
    if len(rules) > 1:
        raise DataError(f"choose one validation rule, not --{' and --'.join(rules)}")
    main = open_source(args.source, args)
    streams = []
    val_fraction = args.val_fraction
    if args.val_source or args.val_split:
        streams.append(Stream("train", main))
        streams.append(Stream("val", open_source(args.val_source, args) if args.val_source else
                              _split_of(main, args.val_split, args)))
    else:
        if val_fraction is None and args.val_docs is None:
            val_fraction = 0.0005
        streams.append(Stream("train", main, hold_out=True))
    if args.test_source or args.test_split:
        streams.append(Stream("test", open_source(args.test_source, args) if args.test_source else
                              _split_of(main, args.test_split, args)))
    return PrepareConfig(
        out=Path(args.out), streams=streams, tokenizer=args.tokenizer,
        shard_tokens=args.shard_tokens, dtype=args.dtype, val_fraction=val_fraction,
        val_docs=args.val_docs, seed=args.seed, utf8=args.utf8, num_proc=args.num_proc,
        unit_bytes=max(1, int(args.unit_mb * 2**20)),
        command=shlex.join(["python", "prepare_data.py", *argv]), progress=not args.no_progress)


def _split_of(main, split: str, args: argparse.Namespace):
    if not isinstance(main, HubDataset):
        raise DataError("--val_split/--test_split name splits of a hub dataset; for local files "
                        "use --val_source/--test_source")
    return _hub(main.name, args, split)


def verify(directory: str) -> int:
    """Check every shard of a prepared folder against its manifest; print one line."""
    manifest = read_manifest(directory)
    count = tokens = 0
    for name, info in manifest["splits"].items():
        for record in info["shards"]:
            path = Path(directory) / record["file"]
            header = read_header(path)
            if (header.num_tokens, header.crc32) != (record["tokens"], record["crc32"]) or (
                    file_crc32(path) != record["crc32"]):
                raise DataError(f"{path}: its tokens do not match their checksum; the shard is "
                                "damaged: prepare the folder again")
            count += 1
            tokens += header.num_tokens
        del name
    print(f"{directory}: {count} shards, {tokens:,} tokens: all headers, sizes and checksums "
          "match the manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_or_status(argv)
    if isinstance(args, int):
        return args
    try:
        if args.verify:
            return verify(args.verify)
        from corpus.prepare import prepare

        prepare(build_config(args, argv))
        return 0
    except DataError as exc:
        print(f"prepare_data.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; the complete shards are kept: run the same command "
              "again to continue", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read error: what was checkpointed is kept
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"prepare_data.py: error: {exc.strerror or exc}{where}; the complete shards and "
              "the progress record are kept: fix that and run the same command again to "
              "continue", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
