#!/usr/bin/env python
"""Tokenizer training: `train_tokenizer.py` (streamed) next to the `tokenizers` trainer run on
the same text read whole into memory.

    python bench/tokenizer_training.py --size_mb 20     # a quick trial
    python bench/tokenizer_training.py --size_mb 500 \
        --out bench/results/tokenizer_training_cpu_2core.txt

The corpus is a JSONL file (`{"text": ...}` per line) made from the real text this repo and
../shared hold (bench/data.py's documents: Tiny Shakespeare passages, WikiText-2 articles, the
docs' sections; about 2.4 MB of distinct text), written again and again in a new order until it
reaches the size. Repeated text has no new words, while real text keeps bringing new ones (names,
typos, numbers: the word table the trainer keeps grows with them); so from the second pass on,
one word in eight of four letters or more (chosen by a hash of the word and the pass) gets two
letters naming the pass inserted, which adds distinct words in proportion to the size as real
text does.

What runs, each as its own process, one after the other, on the same cores, with the same
tokenizer settings (`corpus.tokenizer_training.new_tokenizer`, the same `BpeTrainer` options and
vocabulary size):
- whole: the documents read into a list in memory, then `Tokenizer.train_from_iterator(list)`;
- ours: `python train_tokenizer.py CORPUS --vocab_size N --out DIR --force --held_out 0` (no
  held-out sample, so both train on the same text; everything else as a user runs it).
Wall time includes each process's start, imports and writing; peak memory is the process's peak
resident set (`os.wait4`'s `ru_maxrss`). Each runs `--repeat` times (default 2), alternating
with the other, and the best time and the largest peak are reported: on a shared machine, a
change of load then hits both. The two vocabularies are compared too: the whole-text
run trains on documents whole, ours on pieces cut where GPT-2's pre-tokenizer splits anyway, so
they should agree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import cpu_name, printed_to  # noqa: E402

_WORD = re.compile(r"[A-Za-z]{4,}")


def _new_words(text: str, rep: int) -> str:
    """`text` with one word in eight (of 4+ letters, chosen by a hash of the word and `rep`)
    given two letters that name `rep`: distinct words that grow with the corpus."""
    tag = chr(97 + rep % 26) + chr(97 + rep // 26 % 26)

    def change(m: re.Match) -> str:
        word = m.group()
        if (zlib.crc32(word.encode()) + rep) % 8:
            return word
        return word[:2] + tag + word[2:]

    return _WORD.sub(change, text)


def build_corpus(path: Path, size_mb: float) -> Path:
    """The JSONL corpus of at least `size_mb` MB (10^6 bytes), made once: `bench/data.py`'s,
    with new words in every pass after the first (a vocabulary that grows with the text)."""
    from bench.data import build_corpus as repeated

    return repeated(path, size_mb, vary=_new_words)


def whole_text(corpus: str, vocab_size: int, out: str) -> None:
    """The comparison: every document read into memory first, then the `tokenizers` trainer
    over that list (run in its own process: `--whole`)."""
    from tokenizers import pre_tokenizers, trainers

    from corpus.tokenizer_training import EOT, new_tokenizer, save_tokenizer

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, Path(out))


def measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, run alone."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, its peak RSS
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): "
                             f"{err.read().strip()[-500:]}")
    return seconds, usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=float, default=500.0, help="corpus size (default 500)")
    p.add_argument("--vocab_size", type=int, default=32768, help="tokens (default 32768)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the corpus (kept and reused) and outputs (default: a "
                        "temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write what is printed here")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of each, alternating; the best time and the largest peak RSS "
                        "are reported (default 2)")
    p.add_argument("--whole", nargs=3, metavar=("CORPUS", "VOCAB", "OUT"),
                   help=argparse.SUPPRESS)  # the comparison's own process
    args = p.parse_args(argv)
    if args.whole:
        whole_text(args.whole[0], int(args.whole[1]), args.whole[2])
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tok-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(work / f"corpus_{args.size_mb:g}MB.jsonl", args.size_mb)
    with printed_to(args.out, "bench/tokenizer_training.py"):
        run(corpus, work, args.vocab_size, args.repeat)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run(corpus: Path, work: Path, vocab_size: int, repeat: int = 1) -> None:
    import tokenizers

    size = corpus.stat().st_size
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; Python "
          f"{sys.version.split()[0]}, tokenizers {tokenizers.__version__}")
    print(f"corpus: {corpus.name} ({size / 1e6:.1f} MB JSONL, built by "
          f"bench/tokenizer_training.py), vocabulary {vocab_size:,} tokens")
    outs = {"whole": work / "tok-whole", "ours": work / "tok-ours"}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    cmds = {
        "whole": [sys.executable, str(REPO / "bench" / "tokenizer_training.py"), "--whole",
                  str(corpus), str(vocab_size), str(outs["whole"])],
        "ours": [sys.executable, "train_tokenizer.py", str(corpus), "--vocab_size",
                 str(vocab_size), "--out", str(outs["ours"]), "--force", "--held_out", "0",
                 "--no_progress"],
    }
    names = {"whole": "tokenizers, the text read whole into memory",
             "ours": "ours: train_tokenizer.py (streamed)"}
    results: dict[str, tuple[float, int]] = {}
    for i in range(repeat):  # alternating, so that a change in the machine's load hits both
        for key, cmd in cmds.items():
            seconds, rss = measured(cmd)
            print(f"run {i + 1} of {repeat}: {key} {seconds:.1f} s, peak RSS "
                  f"{rss / 2**30:.2f} GiB", flush=True)
            best = results.get(key, (float("inf"), 0))
            results[key] = (min(best[0], seconds), max(best[1], rss))
    print(f"\n{'method (best time of ' + str(repeat) + ')':<48}{'seconds':>9}{'MB/s':>8}"
          f"{'peak RSS':>11}")
    for key, (seconds, rss) in results.items():
        print(f"{names[key]:<48}{seconds:9.1f}{size / 1e6 / seconds:8.2f}"
              f"{rss / 2**30:8.2f} GiB")
    (t_whole, _), (t_ours, rss_ours) = results["whole"], results["ours"]
    print(f"\nours / whole, speed: {t_whole / t_ours:.2f}x (target >= 0.5); ours' peak memory: "
          f"{rss_ours / 2**30:.2f} GiB (target <= 1.5 GB at 500 MB)")
    vocabs = [json.loads((outs[k] / "tokenizer.json").read_text())["model"] for k in outs]
    same = len(set(vocabs[0]["vocab"]) & set(vocabs[1]["vocab"]))
    merges = vocabs[0]["merges"] == vocabs[1]["merges"]
    print(f"vocabularies: {same:,} of {vocab_size:,} tokens in both; merges "
          f"{'IDENTICAL' if merges else 'differ'}")


if __name__ == "__main__":
    sys.exit(main())
