#!/usr/bin/env python
"""Downstream-task speed: our lm-evaluation-harness backend vs the harness's `hf` backend.

Both score the same multiple-choice task on the same weights, on the same CPU, one after the
other in one invocation: a random-weight model of a named shape (ours), and its
`convert.py --to_hf` export run by the harness's `hf` backend (`transformers`' model). Each
backend runs at every batch size asked for (best of `--repeats`); the table gives wall-clock
seconds per backend and batch size (the model loaded before the clock starts; tokenizing,
building the requests and scoring timed), the best of each and their ratio, and where the time goes:
tokens through the network (ours computes each question's context once for its endings; `hf`
runs context + ending for every ending) and positions through the LM head (ours: only where an
ending's token is predicted; `hf`: every position). Accuracies must agree (the same weights).

The task is built here, offline, in the harness's format (`--make_task DIR` writes only it):
"shakespeare_mc", which of four continuations follows a passage of Tiny Shakespeare's last
tenth (the true one, or one of three taken from elsewhere), about HellaSwag's shape (a passage
of ~60 tokens, endings of ~20).

    python bench/downstream.py --make_task shakespeare_tasks   # the task folder only
    python bench/downstream.py --shape default --limit 200     # the repo's default model
    python bench/downstream.py --shape gpt2 --limit 200 --batch_sizes 8,16,32 \
        --out bench/results/downstream_cpu_2core.txt

`--time_tasks CHECKPOINT` times instead what `train_lm.py --eval_tasks shakespeare_mc` adds to
each evaluation of that run (`--limit` examples, its evaluation batch size and bf16 autocast
when `--dtype bfloat16`), wall-clock and CPU seconds, three times.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import machine  # noqa: E402

SHAPES = {  # LanguageModel arguments
    "default": {},  # LMConfig's defaults: 4 layers of 256, context 256
    "gpt2": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024),
}
TASK = "shakespeare_mc"


def make_task(folder: Path, examples: int = 400, seed: int = 0) -> Path:
    """Write the shakespeare_mc task (YAML + JSONL, absolute data path) into `folder`."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    words = text[int(len(text) * 0.9):].split()
    rnd = random.Random(seed)
    rows = []
    for _ in range(examples):
        start = rnd.randrange(0, len(words) - 80)
        context = " ".join(words[start:start + 40])
        endings = [" ".join(words[start + 40:start + 55])]
        while len(endings) < 4:
            other = rnd.randrange(0, len(words) - 20)
            if abs(other - start) > 100:
                endings.append(" ".join(words[other:other + 15]))
        label = rnd.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        rows.append({"context": context, "endings": endings, "label": label})
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{TASK}.jsonl").resolve()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{endings}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return folder


def _timed(run) -> tuple[float, dict]:
    """(wall seconds, results) of run(); the CPU seconds go to `_timed.cpu`."""
    start, cpu = time.perf_counter(), time.process_time()
    results = run()
    _timed.cpu = time.process_time() - cpu
    return time.perf_counter() - start, results


def _accuracy(results: dict) -> tuple[float, float]:
    r = results["results"][TASK]
    return r["acc,none"], r["acc_norm,none"]


def _work(tasks, tokenizer, limit: int) -> tuple[int, int]:
    """Tokens the hf backend runs and the positions its LM head computes (the same: every
    position of context + ending, each ending separately), for the task's first `limit`."""
    task = next(iter(tasks.manager.load(list(tasks.items))["tasks"].values()))
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    total = 0
    for inst in task.instances:
        context, ending = inst.args
        total += len(tokenizer.encode(context + ending)) - 1
    return total, total


def time_tasks(checkpoint: str, limit: int, batch_size: int, dtype: str,
               out: str | None) -> int:
    """Time what --eval_tasks adds to one evaluation of a run (see the module docstring)."""
    import torch

    from downstream.tasks import TaskRunner
    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    model, _ = load_model(checkpoint, device="cpu", tokenizer=load_tokenizer())
    runner = TaskRunner([TASK], limit=limit,
                        include_path=make_task(Path(tempfile.mkdtemp()) / "tasks"))
    lines = [f"--eval_tasks {TASK} --eval_tasks_limit {limit}: one evaluation of {checkpoint} "
             f"({model.num_params(non_embedding=False) / 1e6:.1f}M parameters), batch "
             f"{batch_size}, {dtype}", f"machine: {machine()}, torch {torch.__version__}"]
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        metrics, _ = runner.run(model, model.tokenizer, batch_size=batch_size,
                                dtype=None if dtype == "float32" else torch.bfloat16)
        lines.append(f"wall {time.perf_counter() - wall:.2f} s, cpu "
                     f"{time.process_time() - cpu:.2f} s: {metrics}")
        print(lines[-1], flush=True)
    if out:
        Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make_task", metavar="DIR", help="write the task folder and stop")
    p.add_argument("--shape", choices=sorted(SHAPES), default="default")
    p.add_argument("--limit", type=int, default=200, help="questions scored")
    p.add_argument("--batch_sizes", default="8,16", help="batch sizes tried, for both backends")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--time_tasks", metavar="CHECKPOINT",
                   help="time one --eval_tasks evaluation of this checkpoint (three times)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="with --time_tasks: the run's autocast dtype")
    args = p.parse_args(argv)
    if args.make_task:
        print(f"wrote {make_task(Path(args.make_task)) / (TASK + '.yaml')}")
        return 0
    if args.time_tasks:
        return time_tasks(args.time_tasks, args.limit, int(args.batch_sizes.split(",")[0]),
                          args.dtype, args.out)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import convert
    from downstream.harness import SmallLM
    from downstream.tasks import load_tasks, run_tasks
    from model.lm import LanguageModel
    from model.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_downstream_"))
    torch.manual_seed(0)
    model = LanguageModel(**{**SHAPES[args.shape], "dropout": 0.0})
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": "gpt2"}, tmp / "model.pt")
    convert.to_hf(tmp / "model.pt", tmp / "hf", verify=False)
    tasks = load_tasks([TASK], include_path=make_task(tmp / "tasks"))
    rows, accs = [], {}
    for name in ("ours", "hf"):
        for bs in sizes:
            best = best_cpu = None
            for _ in range(args.repeats):
                if name == "ours":
                    lm = SmallLM(checkpoint=str(tmp / "model.pt"), batch_size=bs, device="cpu")
                    seconds, res = _timed(lambda lm=lm: run_tasks(lm, tasks, limit=args.limit,
                                                                  quiet=True))
                    work = lm.stats
                else:  # loaded outside the timing, as ours
                    lm = HFLM(pretrained=str(tmp / "hf"), batch_size=bs, device="cpu")
                    seconds, res = _timed(lambda lm=lm: simple_evaluate(
                        model=lm, tasks=list(tasks.items), task_manager=tasks.manager,
                        limit=args.limit, bootstrap_iters=0))
                best = seconds if best is None else min(best, seconds)
                best_cpu = _timed.cpu if best_cpu is None else min(best_cpu, _timed.cpu)
            accs[(name, bs)] = _accuracy(res)
            rows.append((name, bs, best, work if name == "ours" else None, best_cpu))
            print(f"{name:5} batch {bs:3}: {best:7.2f} s ({best_cpu:.2f} s CPU)  acc/acc_norm "
                  f"{accs[(name, bs)]}", flush=True)
    hf_tokens, hf_head = _work(tasks, load_tokenizer(), args.limit)
    ours_best = min(r[2] for r in rows if r[0] == "ours")
    hf_best = min(r[2] for r in rows if r[0] == "hf")
    ours = next(r[3] for r in rows if r[0] == "ours")
    ours_cpu = min(r[4] for r in rows if r[0] == "ours")
    hf_cpu = min(r[4] for r in rows if r[0] == "hf")
    lines = [
        f"downstream speed: {TASK}, {args.limit} questions x 4 endings, model shape "
        f"{args.shape} ({model.num_params(non_embedding=False) / 1e6:.1f}M parameters, "
        f"context {model.max_seq_len}), random weights, float32",
        f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "backend  batch  seconds  CPU seconds",
        *[f"{n:7} {b:6} {s:8.2f} {c:12.2f}" for n, b, s, _, c in rows],
        "",
        f"best: ours {ours_best:.2f} s, hf {hf_best:.2f} s: ours {hf_best / ours_best:.2f}x "
        f"faster (CPU seconds: {hf_cpu / ours_cpu:.2f}x)",
        f"tokens through the network: ours {ours.tokens_run:,}, hf {hf_tokens:,} (padding "
        f"excluded); positions through the LM head: ours {ours.head_positions:,}, hf "
        f"{hf_head:,}",
        "accuracies identical across backends and batch sizes: "
        f"{len(set(accs.values())) == 1} ({next(iter(accs.values()))})",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
