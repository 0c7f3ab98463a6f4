#!/usr/bin/env python
"""Data preparation and the loader: ours next to nanoGPT's method and the tokenizer alone.

    python bench/data.py --build_only                      # make the corpora (not timed)
    python bench/data.py                                   # the measurement (500 MB + 2 GB)
    python bench/data.py --size_mb 20 --rss_size_mb 40     # a quick trial
    python bench/data.py --only loader                     # the loader part alone
    python bench/data.py --only speed --tokenizer gpt2-rust   # GPT-2 through `tokenizers`

The corpora are JSONL files (`{"text": ...}` per line) made from the real text this repo and
../shared hold: Tiny Shakespeare cut into passages of 5-40 speeches, the WikiText-2 validation
and test articles (../shared/data/wikitext-2), and the sections of README.md,
GENERATION_GUIDE.md and docs/*.md (about 2.4 MB of distinct text, 1,900 documents; the
recorded runs were made when that prose lived in the first two files). The documents are shuffled
(seeded) and written again and again, each pass in a new order, until the file reaches the size.
Encoding is per document and neither tokenizer caches across calls, so repetition does not speed
up the encoding; it is still text with the word statistics of real text.

What runs, each as its own process, one after the other, on the same cores:
- tokenizer alone: tiktoken's GPT-2 encoding of every document, one process per core, the
  documents already in memory (the limit: preparation cannot beat this);
- nanoGPT's method (its data/openwebtext/prepare.py): `datasets.load_dataset("json")` (an Arrow
  cache), `train_test_split(test_size=0.0005)`, `map(num_proc=cores)` with tiktoken's
  `encode_ordinary` + EOT, then one uint16 memmap per split written in 1,024 slices (fewer for
  a split of fewer than 1,024 documents: its validation split here; tiktoken's GPT-2 built from
  the bundled files: the same ids, no download);
- ours: `python prepare_data.py CORPUS --out DIR` (default settings: all cores);
With `--tokenizer FOLDER` (a Hugging Face tokenizer folder, with tokenizer.json) both the
tokenizer alone and ours encode with that tokenizer's Rust backend (`tokenizers`, a batch per
call, one thread per process) instead of tiktoken, and nanoGPT's method is left out;
`--tokenizer gpt2-rust` first saves the bundled GPT-2 tokenizer as such a folder (same ids as
tiktoken's, so the id check still holds).
- ours again on the larger corpus, for its peak memory.
Peak RSS is the sum of the resident memory of the process and all its children, sampled every
50 ms. Then the loader: batches per second that `EpochBatches` draws from the prepared shards at
the demo and gpt2-124m shapes, next to the same over one memmap of the same tokens (the old
path), and next to the training step rate measured here (one micro-batch forward and backward;
for gpt2-124m at batch 1, scaled to 16).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.record import machine  # noqa: E402

SHARED = REPO.parent / "shared"


# -- the corpus ---------------------------------------------------------------------------------


def source_documents() -> list[str]:
    """The distinct documents the corpora repeat."""
    from corpus.sources import split_documents

    rng = random.Random(0)
    docs = []
    speeches = [p for p in (REPO / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
                if p.strip()]
    i = 0
    while i < len(speeches):
        n = rng.randint(5, 40)
        docs.append("\n\n".join(speeches[i:i + n]))
        i += n
    for name in ("valid.txt", "test.txt"):
        path = SHARED / "data" / "wikitext-2" / name
        if path.is_file():
            docs += split_documents(path.read_text(encoding="utf-8"), "wikitext")
    for path in [REPO / "README.md", REPO / "GENERATION_GUIDE.md",
                 *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        docs += [s for s in re.split(r"\n(?=## )", text) if s.strip()]
    return docs


def build_corpus(path: Path, size_mb: float,
                 vary: Callable[[str, int], str] | None = None) -> Path:
    """A JSONL corpus of at least `size_mb` MB (10^6 bytes), made once: the source documents
    again and again, each pass in its own shuffled order; from the second pass on, each
    document through `vary(text, pass)` when given (new words that grow with the corpus)."""
    target = int(size_mb * 1e6)
    if path.is_file() and path.stat().st_size >= target:
        return path
    docs = source_documents()
    tmp = path.with_suffix(".tmp")
    size, rep = 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target:
            order = list(range(len(docs)))
            random.Random(rep).shuffle(order)
            for i in order:
                text = vary(docs[i], rep) if vary is not None and rep else docs[i]
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
            rep += 1
    tmp.replace(path)
    return path


# -- measuring a process tree -------------------------------------------------------------------


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(pid, [])
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run `cmd`; (wall seconds, peak RSS of its process tree, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or os.environ.copy(), cwd=REPO)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return wall, peak[0], out


# -- are the token ids the same? ---------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def doc_digest(tokens, sep: int, piece: int = 1 << 23) -> tuple[int, int]:
    """(documents, digest): the documents are the non-empty runs between `sep` tokens.

    The digest is the sum (mod 2^64) of a hash of each document's token ids in order, so it is
    the same for the same documents whatever their order or where the separators go (nanoGPT
    puts one after every document, we put one between documents) and differs, but for a 2^-64
    chance, when any id of any document differs. `tokens` is anything sliceable (one memmap,
    our `TokenShards`); it is read in pieces cut at separators.
    """
    n, lo, docs, total = len(tokens), 0, 0, np.uint64(0)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(1 << 16, np.uint64(0x100000001B3)), dtype=np.uint64)
        while lo < n:
            t = np.asarray(tokens[lo:min(n, lo + piece)]).astype(np.uint64)
            if lo + len(t) < n:
                cut = np.flatnonzero(t == sep)
                if len(cut):
                    t = t[:cut[-1] + 1]  # end the piece at a separator
            lo += len(t)
            is_sep = t == sep
            seg = np.cumsum(is_sep)[~is_sep]  # which run each non-separator token is in
            vals = t[~is_sep] + np.uint64(1)
            if not len(vals):
                continue
            counts = np.bincount(seg)
            if counts.max() > len(powers):
                powers = np.cumprod(np.full(int(counts.max()), np.uint64(0x100000001B3)),
                                    dtype=np.uint64)
            nonempty = counts[counts > 0]
            starts = np.cumsum(nonempty) - nonempty
            pos = np.arange(len(vals)) - np.repeat(starts, nonempty)
            sums = np.add.reduceat(vals * powers[pos], starts)
            total = total + _mix(sums + nonempty.astype(np.uint64) * _M64).sum(dtype=np.uint64)
            docs += len(nonempty)
    return docs, int(total)


# -- the tokenizer alone ------------------------------------------------------------------------


def _encode_share(path: str, lo: int, hi: int, barrier, queue, tokenizer: str = "gpt2") -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core, as prepare_data's
    from corpus.encoders import load_encoder

    enc = load_encoder(tokenizer)
    with open(path, "rb") as f:
        f.seek(lo)
        raw = f.read(hi - lo)
    texts = [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    barrier.wait()
    t0 = time.perf_counter()
    parts = [enc.encode(t) for t in texts] if tokenizer == "gpt2" else enc.encode_many(texts)
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for a in parts)
    sep = np.array([enc.eot_id], dtype=parts[0].dtype)
    docs, digest = doc_digest(np.concatenate([x for a in parts for x in (a, sep)]), enc.eot_id)
    queue.put((nbytes, tokens, seconds, docs, digest))


def tokenizer_alone(path: Path, procs: int, tokenizer: str = "gpt2") -> dict:
    """Encode every document with one process per core, text already in memory."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, procs):
            f.seek(size * k // procs)
            f.readline()
            cuts.append(f.tell())
    cuts.append(size)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_encode_share, args=(str(path), cuts[k], cuts[k + 1], barrier,
                                                       queue, tokenizer)) for k in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    nbytes = sum(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    wall = max(r[2] for r in results)
    per_core = sum(r[0] / r[2] for r in results) / len(results)
    return {"bytes": nbytes, "tokens": tokens, "seconds": wall, "mb_s_per_core": per_core / 1e6,
            "documents": sum(r[3] for r in results),
            "digest": sum(r[4] for r in results) % 2**64}


# -- nanoGPT's method ---------------------------------------------------------------------------


def nanogpt_prepare(corpus: str, out: str, procs: int) -> None:
    """nanoGPT's data/openwebtext/prepare.py, pointed at a local JSONL file (runs in a child)."""
    import datasets

    from corpus.encoders import load_encoder

    enc = load_encoder("gpt2")._impl  # tiktoken's GPT-2 from the bundled files
    t0 = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=corpus, num_proc=procs,
                                    cache_dir=os.path.join(out, "hf-cache"))
    split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")
    t1 = time.perf_counter()

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split.map(process, remove_columns=["text"], desc="tokenizing", num_proc=procs)
    t2 = time.perf_counter()
    digest_s, docs, digest, tokens = 0.0, 0, 0, 0
    for name, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        arr = np.memmap(os.path.join(out, f"{name}.bin"), dtype=np.uint16, mode="w+",
                        shape=(arr_len,))
        idx = 0
        slices = min(1024, len(dset))  # nanoGPT's 1,024; fewer when a split has fewer documents
        for batch_idx in range(slices):
            batch = dset.shard(num_shards=slices, index=batch_idx, contiguous=True).with_format(
                "numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx:idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        t = time.perf_counter()  # the check is not nanoGPT's: its time is taken off
        n, d = doc_digest(np.memmap(arr.filename, dtype=np.uint16, mode="r"), enc.eot_token)
        docs, digest, tokens = docs + n, (digest + d) % 2**64, tokens + int(arr_len)
        digest_s += time.perf_counter() - t
    t3 = time.perf_counter()
    print(json.dumps({"load_split_s": t1 - t0, "map_s": t2 - t1, "write_s": t3 - t2 - digest_s,
                      "check_s": digest_s, "tokens": tokens, "documents": docs,
                      "digest": digest}))


def _digest_of_ours(out: Path) -> tuple[int, int]:
    from corpus.shards import open_split, read_manifest

    manifest = read_manifest(out)
    docs, digest = 0, 0
    for name in manifest["splits"]:
        n, d = doc_digest(open_split(out, name, manifest), manifest["separator"]["id"])
        docs, digest = docs + n, (digest + d) % 2**64
    return docs, digest


# -- the loader ---------------------------------------------------------------------------------


def loader_rates(out: Path, seconds: float = 3.0) -> list[dict]:
    """Loader micro-batches/s (sharded, one memmap) and training micro-batches/s, per shape."""
    import torch

    from corpus.batches import EpochBatches
    from corpus.shards import open_split
    from model.lm import LanguageModel
    from training.fused_loss import TrainingModule
    from training.options import resolve_dtype
    from training.step import autocast_context

    sharded = open_split(out, "train")
    single_path = out.parent / "single.bin"
    if not single_path.exists() or single_path.stat().st_size != 2 * len(sharded):
        with open(single_path, "wb") as f:
            for arr in sharded.arrays:
                f.write(np.asarray(arr).tobytes())
    single = np.memmap(single_path, dtype=np.uint16, mode="r")
    shapes = {"demo": (dict(d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=128),
                       16, 16),
              "gpt2-124m": (dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072,
                                 max_seq_len=1024), 16, 1)}
    rows = []
    device = torch.device("cpu")
    amp = resolve_dtype("auto", device)
    for name, (shape, batch, timed_batch) in shapes.items():
        seq = shape["max_seq_len"]
        rates = {}
        for label, tokens in (("shards", sharded), ("one memmap", single)):
            b = EpochBatches(tokens, seq, batch, grad_accum=1, seed=1)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                b.get(n // b.steps_per_epoch, n % b.steps_per_epoch, 0)
                n += 1
            rates[label] = n / (time.perf_counter() - t0)
        torch.manual_seed(0)
        model = LanguageModel(vocab_size=50257, dropout=0.0, **shape)
        module = TrainingModule(model, fused_head=True)
        autocast = autocast_context("cpu", amp)
        b = EpochBatches(sharded, seq, timed_batch, seed=1)
        times = []
        for i in range(3 if timed_batch == batch else 2):  # gpt2-124m: ~10 s a step here
            x, y = b.get(0, i, 0)
            t0 = time.perf_counter()
            with autocast():
                loss = module(x, y)
            loss.backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        # After a warm-up step, the fastest; scaled linearly to the batch (per-sample time falls
        # with batch size, so the scaled rate is an underestimate and the ratio an overestimate
        # by that factor, which is small next to the margin).
        step = min(times[1:]) * batch / timed_batch
        rows.append({"shape": name, "batch": batch, "seq_len": seq,
                     "loader_shards": rates["shards"], "loader_memmap": rates["one memmap"],
                     "train_micro_batches_s": 1 / step, "timed_batch": timed_batch})
    return rows


# -- the run ------------------------------------------------------------------------------------


def _ours(corpus: Path, out: Path, procs: int, tokenizer: str = "gpt2") -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "prepare_data.py", str(corpus), "--out", str(out), "--no_progress",
           "--num_proc", str(procs)] + (["--tokenizer", tokenizer] if tokenizer != "gpt2" else [])
    wall, rss, _ = run_measured(cmd)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"seconds": wall, "rss": rss, "tokens": tokens, "command": " ".join(cmd[1:])}


def _header(procs: int) -> None:
    import tiktoken
    import tokenizers

    print(f"device: {machine()}, {procs} processes; Python {platform.python_version()}, tiktoken "
          f"{tiktoken.__version__}, tokenizers {tokenizers.__version__}, numpy {np.__version__}")


def _corpus_line(path: Path) -> None:
    print(f"corpus: {path} ({path.stat().st_size / 1e6:,.1f} MB JSONL; built by bench/data.py "
          "from the repo's and ../shared's text, documents shuffled and repeated)")


def speed(corpus: Path, work: Path, procs: int, nanogpt: bool, tokenizer: str = "gpt2") -> None:
    """Throughput (tokenizer alone, nanoGPT's method, ours) and the loader, on `corpus`."""
    import shutil

    _header(procs)
    _corpus_line(corpus)
    mb = corpus.stat().st_size / 1e6
    alone = tokenizer_alone(corpus, procs, tokenizer)
    which = "tiktoken" if tokenizer == "gpt2" else f"tokenizers, {tokenizer}"
    alone_rate = alone["tokens"] / alone["seconds"]
    print(f"tokenizer alone: {alone['tokens']:,} tokens of {alone['bytes'] / 1e6:,.1f} MB text "
          f"in {alone['seconds']:.1f} s on {procs} processes = {alone_rate / 1e6:.2f}M tokens/s, "
          f"{alone['bytes'] / alone['seconds'] / 1e6:.1f} MB/s ({alone['mb_s_per_core']:.1f} "
          "MB/s per core)")
    rows = [(f"tokenizer alone ({which}, text in memory)", alone["seconds"], alone["tokens"],
             None)]
    nano = None
    if nanogpt:
        out = work / "nanogpt"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        wall, rss, text = run_measured([sys.executable, __file__, "--num_proc", str(procs),
                                        "--nanogpt_child", str(corpus), str(out)])
        nano = json.loads(text.strip().splitlines()[-1])
        nano["seconds"] = wall - nano["check_s"]
        rows.append(("nanoGPT's method (datasets map + tiktoken + memmap)", nano["seconds"],
                     nano["tokens"], rss))
        print(f"nanoGPT's method: load + split {nano['load_split_s']:.1f} s, map "
              f"{nano['map_s']:.1f} s, write {nano['write_s']:.1f} s (its process start and "
              f"imports the rest; the {nano['check_s']:.1f} s of our id check taken off)")
        shutil.rmtree(out, ignore_errors=True)
    ours = _ours(corpus, work / "ours", procs, tokenizer)
    rows.append((f"ours: {ours['command']}", ours["seconds"], ours["tokens"], ours["rss"]))
    print()
    print(f"{'method':<62} {'seconds':>8} {'M tokens/s':>11} {'MB/s':>7} {'peak RSS':>9}")
    for name, seconds, tokens, rss in rows:
        rss_text = f"{rss / 2**30:.2f} GiB" if rss else "-"
        print(f"{name[:62]:<62} {seconds:8.1f} {tokens / seconds / 1e6:11.2f} "
              f"{mb / seconds:7.1f} {rss_text:>9}")
    rate = ours["tokens"] / ours["seconds"]
    print(f"\nours / tokenizer alone: {rate / alone_rate:.2f}x (target >= 0.5)")
    if nano:
        print(f"ours / nanoGPT's method: {rate / (nano['tokens'] / nano['seconds']):.2f}x "
              "(target >= 4)")
    docs, digest = _digest_of_ours(work / "ours")
    checks = [("tokenizer alone", alone["documents"], alone["digest"])]
    if nano:
        checks.append(("nanoGPT's method", nano["documents"], nano["digest"]))
    same = all(d == docs and g == digest for _, d, g in checks)
    print(f"token ids: {'IDENTICAL' if same else 'DIFFERENT'}: every document's ids, ours vs "
          + ", ".join(f"{name} ({d:,} documents, digest {g:016x})" for name, d, g in checks)
          + f"; ours {docs:,} documents, digest {digest:016x}")
    print_loader(work / "ours")
    if not same:
        raise SystemExit("the token ids differ")


def print_loader(out: Path) -> None:
    """The loader's rates over the preparation in `out`, next to the training step's."""
    print("\nloader (EpochBatches over the prepared shards vs one memmap of the same tokens; "
          "micro-batches/s) vs the training step on this CPU:")
    print(f"{'shape':<10} {'batch x seq':>12} {'shards':>10} {'one memmap':>11} "
          f"{'train':>9} {'loader / train':>15}")
    for r in loader_rates(out):
        print(f"{r['shape']:<10} {r['batch']:>5} x {r['seq_len']:<5} {r['loader_shards']:10,.0f} "
              f"{r['loader_memmap']:11,.0f} {r['train_micro_batches_s']:9.3f} "
              f"{r['loader_shards'] / r['train_micro_batches_s']:14,.0f}x")
    print("train: one forward + backward of a micro-batch (bf16 autocast where the CPU has it, "
          "else float32); gpt2-124m timed at batch 1 and scaled to 16. Target: loader >= 20x.")


def memory(corpora: list[Path], work: Path, procs: int) -> None:
    """Peak RSS of our preparation on corpora of growing size."""
    _header(procs)
    print(f"{'corpus':<48} {'seconds':>8} {'M tokens/s':>11} {'peak RSS':>9}")
    for corpus in corpora:
        r = _ours(corpus, work / "ours_memory", procs)
        print(f"{f'{corpus.name} ({corpus.stat().st_size / 1e6:,.0f} MB)':<48} "
              f"{r['seconds']:8.1f} {r['tokens'] / r['seconds'] / 1e6:11.2f} "
              f"{r['rss'] / 2**30:6.2f} GiB")
    print(f"command: {r['command']}; peak RSS: the process and its workers together, sampled "
          "every 50 ms. Target: <= 1.5 GiB, not growing with the corpus.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=float, default=500, help="corpus for throughput (MB)")
    p.add_argument("--rss_size_mb", type=float, default=2000, help="second corpus, for memory")
    p.add_argument("--work", default="/tmp/bench-data", help="where corpora and outputs go")
    p.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--only", choices=("speed", "memory", "loader"),
                   help="only the throughput + loader part, the memory part, or the loader "
                        "(over the preparation of the last run, or a new one)")
    p.add_argument("--build_only", action="store_true", help="make the corpora and stop")
    p.add_argument("--skip_nanogpt", action="store_true", help="leave out nanoGPT's method")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (tiktoken), gpt2-rust (GPT-2 through tokenizers) or a Hugging "
                        "Face tokenizer folder, for the tokenizer alone and ours (nanoGPT's "
                        "method is left out)")
    p.add_argument("--nanogpt_child", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nanogpt_child:
        nanogpt_prepare(*args.nanogpt_child, args.num_proc)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tokenizer == "gpt2-rust":  # GPT-2 as a tokenizer.json folder: the Rust backend
        from model.tokenizer import load_tokenizer

        args.tokenizer = str(work / "gpt2-rust")
        load_tokenizer("gpt2").save_pretrained(args.tokenizer)
    small = build_corpus(work / f"corpus_{args.size_mb:g}MB.jsonl", args.size_mb)
    large = (build_corpus(work / f"corpus_{args.rss_size_mb:g}MB.jsonl", args.rss_size_mb)
             if args.only in (None, "memory") else None)
    if args.build_only:
        for path in (small, large):
            if path:
                print(f"corpus: {path} ({path.stat().st_size / 1e6:,.0f} MB)")
        return 0
    if args.only == "loader":
        _header(args.num_proc)
        _corpus_line(small)
        if not (work / "ours" / "manifest.json").is_file():
            _ours(small, work / "ours", args.num_proc)
        print_loader(work / "ours")
        return 0
    if args.only != "memory":
        speed(small, work, args.num_proc, not args.skip_nanogpt and args.tokenizer == "gpt2",
              args.tokenizer)
    if args.only != "speed":
        if args.only is None:
            print()
        memory([small, large], work, args.num_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
