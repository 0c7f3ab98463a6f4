#!/usr/bin/env python
"""Model quality for the same wall-clock minutes: a reference recipe vs ours, one invocation.

The quality twin of `bench/training.py`. Both recipes train the same model shape on the same data
(Tiny Shakespeare, GPT-2 tokens) with `training/train_lm.py` itself, one after the other:
- ours: `--preset cpu-10min` exactly as it is (Muon + AdamW, warmup-stable-decay, the preset's
  steps), timed here;
- reference: AdamW + cosine decay with nanoGPT's Shakespeare hyper-parameters (peak 1e-3 down to
  1e-4, 100 warm-up steps, betas 0.9/0.99, weight decay 0.1, dropout 0.2, clipping at 1.0) for
  the same training minutes: the two recipes' step times are measured in this process and the
  reference gets the number of steps that takes as long as ours.
The score is the validation loss over the whole validation split (`evaluate_lm.py`'s windows and
precision) of each run's `best.pt`. The curves (validation loss against training minutes) go to a
PNG next to the table.

    python bench/quality.py                 # the full preset: about 21 minutes in all
    python bench/quality.py --steps 200     # a quicker look (both recipes shortened)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.checkpoint import load_model  # noqa: E402
from training import train_lm  # noqa: E402
from training.evaluation import evaluate_tokens  # noqa: E402
from training.fused_loss import TrainingModule  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.options import PRESETS, resolve_dtype  # noqa: E402
from training.step import autocast_context, train_step  # noqa: E402

PRESET = PRESETS["cpu-10min"]
MODEL_KEYS = ("d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
BATCH_KEYS = ("batch_size", "seq_len")
RECIPE_KEYS = ("optimizer", "lr", "min_lr", "muon_lr", "muon_momentum", "muon_weight_decay",
               "schedule", "cooldown", "ema", "warmup_steps", "weight_decay", "beta1", "beta2",
               "dropout")
DEFAULTS = dict(optimizer="adamw", schedule="cosine", ema=0.0, beta1=0.9, beta2=0.95,
                weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0,
                cooldown=0.2)
RECIPES = {  # ours first: its time sets the reference's
    "ours": {k: PRESET[k] for k in RECIPE_KEYS if k in PRESET},
    "reference": dict(optimizer="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100,
                      schedule="cosine", ema=0.0, beta1=0.9, beta2=0.99, weight_decay=0.1,
                      dropout=0.2),
}


def _flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def step_seconds(recipe: dict, shape: dict, batch: dict, device: torch.device, steps: int = 4
                 ) -> float:
    """The median time of one training step of `recipe` (after one warm-up step)."""
    r = {**DEFAULTS, **recipe}
    torch.manual_seed(0)
    from model.lm import LanguageModel

    model = LanguageModel(vocab_size=50257, dropout=r["dropout"], **shape).to(device)
    module = TrainingModule(model)
    opt = make_optimizer(model, r["lr"], r["weight_decay"], (r["beta1"], r["beta2"]),
                         device.type, optimizer=r["optimizer"], muon_lr=r["muon_lr"],
                         muon_momentum=r["muon_momentum"],
                         muon_weight_decay=r["muon_weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = autocast_context(device.type, resolve_dtype("auto", device))
    params = list(model.parameters())
    seq = batch.get("seq_len") or shape["max_seq_len"]
    x = torch.randint(0, 50257, (batch["batch_size"], seq + 1), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(module, opt, scaler, [(x[:, :-1], x[:, 1:])], 1, autocast, params, 1.0)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_recipe(name: str, recipe: dict, steps: int, common: list[str], out: Path) -> dict:
    """Train `recipe` for `steps` steps with train_lm.py; its curve and final score."""
    argv = [*common, *_flags(recipe), "--max_steps", str(steps), "--out_dir", str(out)]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = train_lm.main(argv)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"bench/quality.py: the {name} run failed (exit {code}): "
                         f"train_lm.py {' '.join(argv)}")
    rows = read_metrics(out / "metrics.csv")
    curve = [(float(r["elapsed_s"]) / 60, float(r["loss"])) for r in rows if r["kind"] == "val"]
    model, _ = load_model(out / "snapshots" / "best.pt", device="cpu")
    return dict(name=name, steps=steps, wall_min=wall / 60, curve=curve, model=model,
                train_min=float(rows[-1]["elapsed_s"]) / 60)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{r['name']} ({r['val_loss']:.3f})")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="our run's steps (default: the preset's); the reference gets as long")
    p.add_argument("--png", default="bench/results/quality_cpu_2core.png",
                   help="where to draw the curves")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    shape = {k: PRESET[k] for k in MODEL_KEYS}
    batch = {k: PRESET[k] for k in BATCH_KEYS if k in PRESET}
    ours_steps = args.steps or PRESET["max_steps"]
    common = ["--preset", "cpu-10min", "--device", args.device, "--no_plot",
              "--sample_tokens", "0", "--eval_windows", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        # Tokenize once, outside the timed runs.
        with contextlib.redirect_stdout(io.StringIO()):
            train_lm.main([*common, "--out_dir", f"{tmp}/warm", "--explain"])
        secs = {name: step_seconds(recipe, shape, batch, device)
                for name, recipe in RECIPES.items()}
        steps = {"ours": ours_steps,
                 "reference": max(10, round(ours_steps * secs["ours"] / secs["reference"]))}
        evals = ["--eval_interval", str(max(10, ours_steps // 8))]
        results = [run_recipe(name, recipe, steps[name], [*common, *evals], Path(tmp) / name)
                   for name, recipe in RECIPES.items()]
        val = load_val_tokens(common, tmp)
        for r in results:
            res = evaluate_tokens(r.pop("model"), val, seq_len=shape["max_seq_len"],
                                  batch_size=16)
            r["val_loss"], r["ppl"] = res.loss, res.perplexity

    cpu = platform.processor() or platform.machine()
    print(f"device: {device} ({cpu}, {torch.get_num_threads()} threads); torch "
          f"{torch.__version__}; model {shape['num_layers']} layers x {shape['d_model']}, "
          f"context {shape['max_seq_len']}, batch {batch['batch_size']}; Tiny Shakespeare, "
          f"GPT-2 tokens")
    print("step time measured here: " + ", ".join(f"{n} {s:.3f} s" for n, s in secs.items()))
    print(f"{'recipe':<10} {'steps':>6} {'train min':>9} {'wall min':>8} {'val loss':>9} "
          f"{'ppl':>7}  flags")
    for r in results:
        print(f"{r['name']:<10} {r['steps']:>6} {r['train_min']:>9.2f} {r['wall_min']:>8.2f} "
              f"{r['val_loss']:>9.4f} {r['ppl']:>7.1f}  {' '.join(_flags(RECIPES[r['name']]))}")
    ours, ref = results
    diff = ref["val_loss"] - ours["val_loss"]
    print(f"ours is {diff:.4f} nats/token lower ({math.exp(diff):.2f}x lower perplexity); "
          "validation loss over the whole validation split (fp32), best.pt of each run")
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png, f"Tiny Shakespeare, {shape['num_layers']}x{shape['d_model']} model, "
                       f"{ours['wall_min']:.1f} vs {ref['wall_min']:.1f} wall minutes")
    print(f"curves: {png}")
    return 0


def load_val_tokens(common: list[str], tmp: str) -> torch.Tensor:
    """The validation split's tokens, as the trainer reads them."""
    from training.data import load_split
    from training.options import finalize, parse_args

    args, _ = parse_args([*common, "--out_dir", f"{tmp}/warm"])
    finalize(args)
    tokens, _ = load_split(args, "val")
    return tokens


if __name__ == "__main__":
    sys.exit(main())
