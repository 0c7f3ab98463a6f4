#!/usr/bin/env python
"""Model quality for the same wall-clock budget: recipes side by side, one invocation.

The quality twin of `bench/training.py`. Each recipe is `training/train_lm.py --preset P` plus
its flags (`RECIPES`), run one after the other on Tiny Shakespeare, each as the whole command a
user would type, timed from outside, with the same `--time_budget` (the preset's, or
`--minutes`; `--preset demo` runs a fixed number of steps instead):
- ours: the preset exactly as it is (for cpu-10min: the modern blocks, 128 wide, a 2,048-token
  BPE trained on the training split, its windows re-segmented (`--split_tokens`), dropout 0.05,
  Muon + AdamW, warmup-stable-decay, an average of the weights; the run plans its steps from a
  step it measures, and again from its own steps before the cool-down, so that the whole command
  ends within ten minutes);
- reference: nanoGPT's Shakespeare recipe on the same model shape, with GPT-2's blocks and
  tokens as nanoGPT trains: AdamW + cosine decay (peak 1e-3 down to 1e-4, 100 warm-up steps,
  betas 0.9/0.99, weight decay 0.1, dropout 0.2, clipping at 1.0), every column of the LM head
  computed (`--unseen_tokens full`), planning its own steps for the same budget;
- the ingredients (gpt2, modern, tok2k, tok4k, tok8k, modern-2k): GPT-2's or the modern blocks,
  GPT-2's tokens or a BPE trained on the training split, set explicitly (see `RECIPES`);
  unsplit: the preset without `--split_tokens`.
The score is the validation loss over the whole validation split of each run's `best.pt`, from
`evaluate_lm.py --json` run on it, in nats per token and in bits per byte (the same loss over the
UTF-8 bytes of the text: the figure that compares runs with different tokenizers, and the one
the comparison lines use). The curves (validation bits per byte against training minutes, from
each run's `metrics.csv`) go to a PNG next to the table, and the table to `--out`. Each recipe's
tokenizer is trained and its data tokenized once first, outside the budgets.

    python bench/quality.py                  # ours vs reference, 10 minutes each: ~21 minutes
    python bench/quality.py --minutes 2      # a quicker look (each recipe gets 2 minutes)
    python bench/quality.py --recipes gpt2,modern,tok2k,tok4k,tok8k,modern-2k \
        --out bench/results/quality_ingredients_cpu_2core.txt \
        --png bench/results/quality_ingredients_cpu_2core.png  # each ingredient, about an hour
    python bench/quality.py --recipes ours,unsplit \
        --out bench/results/quality_split_cpu_2core.txt \
        --png bench/results/quality_split_cpu_2core.png  # what --split_tokens buys: ~21 minutes
    python bench/quality.py --preset demo --recipes demo-gpt2,ours \
        --out bench/results/quality_demo_cpu_2core.txt \
        --png bench/results/quality_demo_cpu_2core.png   # the demo preset, before and now
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.record import machine  # noqa: E402
from corpus.datasets import DataArgs, load_split  # noqa: E402
from corpus.split_tokenizer import with_split_tokenizer  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.options import DTYPE_NAMES, PRESETS, parse_args, resolve_dtype  # noqa: E402

QUALITY_PRESETS = ("cpu-10min", "demo")  # the presets judged by their quality
RECIPES = {  # what each recipe adds to `--preset cpu-10min`; ours adds nothing
    "ours": {},
    # nanoGPT's Shakespeare recipe on GPT-2's blocks and tokens, as nanoGPT trains
    "reference": dict(arch="gpt2", train_tokenizer=0, optimizer="adamw", lr=1e-3, min_lr=1e-4,
                      warmup_steps=100, schedule="cosine", ema=0.0, beta1=0.9, beta2=0.99,
                      weight_decay=0.1, dropout=0.2, unseen_tokens="full"),
    # ingredients (`--recipes gpt2,modern,tok2k,...`): the blocks, the tokenizer and the dropout
    # set explicitly, so that each name is the same run whatever the preset holds. gpt2: GPT-2's
    # blocks and tokens; modern: the modern blocks (RoPE, RMSNorm, QK-norm, ReLU², untied head
    # with a soft-cap); tokN: a BPE of N tokens trained on the training split (its steps are
    # cheaper, so the run makes more passes: dropout 0.2 against the overfitting); both.
    "gpt2": dict(arch="gpt2", train_tokenizer=0, dropout=0.0),
    "modern": dict(arch="modern", train_tokenizer=0, dropout=0.0),
    "tok2k": dict(arch="gpt2", train_tokenizer=2048, dropout=0.2),
    "tok4k": dict(arch="gpt2", train_tokenizer=4096, dropout=0.2),
    "tok8k": dict(arch="gpt2", train_tokenizer=8192, dropout=0.2),
    "modern-2k": dict(arch="modern", train_tokenizer=2048, dropout=0.2),
    "modern-4k": dict(arch="modern", train_tokenizer=4096, dropout=0.2),
    # the preset without re-segmenting its training windows
    "unsplit": dict(split_tokens=0.0),
    # `--preset demo` as it was before the modern blocks and the trained tokenizer
    "demo-gpt2": dict(arch="gpt2", train_tokenizer=0, dropout=0.0, max_steps=300,
                      eval_interval=100),
}
INGREDIENTS = "gpt2,modern,tok2k,tok4k,tok8k,modern-2k"


def _flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def run_recipe(preset: str, name: str, extra: list[str], out: Path, log: Path) -> dict:
    """Run `train_lm.py --preset PRESET EXTRA` as its own process; its plan, curve, wall."""
    cmd = [sys.executable, str(REPO / "training" / "train_lm.py"), "--preset", preset,
           *extra, "--out_dir", str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"bench/quality.py: the {name} run failed (exit {code}): "
                         f"{' '.join(cmd)}\n{log.read_text()[-2000:]}")
    rows = read_metrics(out / "metrics.csv")
    curve = val_curve(rows)
    best = out / "snapshots" / "best.pt"
    plan = torch.load(best, map_location="cpu", weights_only=True).get("time_plan")
    train = [r for r in rows if r["kind"] == "train"]
    if plan is None:  # a run of a fixed number of steps: its own mean step
        steps = int(train[-1]["step"])
        plan = {"steps": steps, "step_s": float(train[-1]["elapsed_s"]) / steps}
    return dict(name=name, plan=plan, wall_s=wall, curve=curve, best=best,
                train_min=float(rows[-1]["elapsed_s"]) / 60)


def prepare(preset: str, name: str, common: list[str]) -> None:
    """Train the recipe's tokenizer (if it trains one) and tokenize both splits into the cache
    its run reads, so that no run's budget pays for what the others found ready."""
    args, explicit = parse_args(["--preset", preset, *common, *_flags(RECIPES[name])])
    data = with_split_tokenizer(DataArgs.from_dict(vars(args)), "tokenizer" in explicit,
                                "train_tokenizer" in explicit, print)
    load_split(data, "val")
    load_split(data, "train")


def val_curve(rows: list[dict[str, str]]) -> list[tuple[float, float]]:
    """(training minutes, validation bits per byte) of a run's `metrics.csv` rows; the loss
    in nats per token where the run recorded no bits per byte."""
    val = [r for r in rows if r["kind"] == "val"]
    key = "bits_per_byte" if all(r.get("bits_per_byte") for r in val) else "loss"
    return [(float(r["elapsed_s"]) / 60, float(r[key])) for r in val]


def scores(report: dict) -> dict:
    """The figures the table shows, from `evaluate_lm.py --json`'s report."""
    return {"val_loss": report["loss"], "ppl": report["perplexity"],
            "bpb": report.get("bits_per_byte")}


def table_lines(results: list[dict]) -> list[str]:
    """The table's header, a row per recipe and the comparison line (ours first)."""
    def bpb(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"{'recipe':<10} {'step s':>7} {'steps':>6} {'train min':>9} {'wall s':>7} "
             f"{'val loss':>9} {'bits/byte':>9} {'ppl':>7}  flags"]
    for r in results:
        flags = " ".join(_flags(RECIPES.get(r["name"], {}))) or "(the preset as it is)"
        lines.append(f"{r['name']:<10} {r['plan']['step_s']:>7.3f} {r['plan']['steps']:>6} "
                     f"{r['train_min']:>9.2f} {r['wall_s']:>7.1f} {r['val_loss']:>9.4f} "
                     f"{bpb(r['bpb']):>9} {r['ppl']:>7.1f}  {flags}")
    first = results[0]
    for other in results[1:]:
        if first["bpb"] is not None and other["bpb"] is not None:  # any two tokenizers
            diff, unit = other["bpb"] - first["bpb"], "bits/byte"
        else:
            diff, unit = other["val_loss"] - first["val_loss"], "nats/token"
        low, high = (first, other) if diff >= 0 else (other, first)
        lines.append(f"{low['name']} is {abs(diff):.4f} {unit} lower than {high['name']}")
    lines.append("validation: evaluate_lm.py on each run's best.pt, the whole validation split "
                 "(fp32); bits per byte compare runs with different tokenizers, nats per token "
                 "do not")
    return lines


def evaluate(best: Path, cache_dir: str, device: str) -> dict:
    """`evaluate_lm.py --json` on a run's best.pt (the validation split, every window, fp32)."""
    cmd = [sys.executable, str(REPO / "evaluate_lm.py"), "--checkpoint", str(best),
           "--cache_dir", cache_dir, "--device", device, "--split", "val", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"bench/quality.py: {' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        best = r["bpb"] if r["bpb"] is not None else r["val_loss"]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{r['name']} ({best:.3f})")
    ax.set_xlabel("training minutes")
    in_bits = all(r["bpb"] is not None for r in results)  # as `val_curve` chose
    ax.set_ylabel("validation bits per byte" if in_bits else "validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=QUALITY_PRESETS, default="cpu-10min",
                   help="the preset the recipes change (default cpu-10min)")
    p.add_argument("--minutes", type=float, default=None,
                   help="each recipe's --time_budget (default: the preset's, if it has one)")
    p.add_argument("--png", default="bench/results/quality_cpu_2core.png",
                   help="where to draw the curves")
    p.add_argument("--out", default="bench/results/quality_cpu_2core.txt",
                   help="where to write the table (also printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipes", default="ours,reference",
                   help=f"which recipes, in order, the first compared with each other "
                        f"(of {', '.join(RECIPES)}; each ingredient: {INGREDIENTS})")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    minutes = args.minutes if args.minutes is not None else preset.get("time_budget")
    if minutes is not None and not minutes > 0:
        p.error("--minutes must be positive")
    names = [n for n in args.recipes.split(",") if n]
    if len(names) < 2 or len(set(names)) != len(names) or not set(names) <= set(RECIPES):
        p.error(f"--recipes needs two or more different names of {', '.join(RECIPES)}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--device", args.device, "--cache_dir", f"{tmp}/cache"]
        if minutes is not None:
            common += ["--time_budget", f"{minutes:g}"]
        for name in names:  # each recipe's tokenizer and token cache, once, outside the runs
            prepare(args.preset, name, common)
        results = [run_recipe(args.preset, name, [*common, *_flags(RECIPES[name])],
                              Path(tmp) / name, Path(tmp) / f"{name}.log")
                   for name in names]
        for r in results:
            r.update(scores(evaluate(r.pop("best"), f"{tmp}/cache", args.device)))

    lines: list[str] = []
    say = lines.append
    device = torch.device(args.device)
    amp = DTYPE_NAMES[resolve_dtype("auto", device)]
    where = machine() if device.type == "cpu" else torch.cuda.get_device_name(device)
    say(f"device: {device} ({where}; {torch.get_num_threads()} threads, {amp} training); "
        f"torch {torch.__version__}; model {preset['num_layers']} layers x {preset['d_model']}, "
        f"context {preset['max_seq_len']}, batch {preset['batch_size']}; Tiny Shakespeare; "
        "recipes may change these (flags)")
    budget = (f" --time_budget {minutes:g} [flags] (wall: the whole command, timed from outside, "
              f"budget {minutes * 60:g} s)" if minutes is not None else
              " [flags] (wall: the whole command, timed from outside)")
    say(f"each recipe: python training/train_lm.py --preset {args.preset}{budget}")
    shown = {k: v for k, v in preset.items() if k != "time_budget"}
    say(f"--preset {args.preset}: " + " ".join(_flags(shown)))
    lines += table_lines(results)
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    each = f"--time_budget {minutes:g} each" if minutes is not None else "its steps each"
    plot(results, png, f"Tiny Shakespeare, --preset {args.preset}, {each} ({where})")
    say(f"curves: {png}; bench/quality.py took {time.perf_counter() - started:.0f} s in all")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
