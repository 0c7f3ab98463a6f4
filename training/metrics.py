"""The run's metrics: a CSV appended as training goes, and a loss-curve PNG drawn from it.

`metrics.csv` has one row per logged training step (kind "train") and per evaluation (kind
"val"). Losses are written with Python's `repr`, so they read back bit-exactly. The "val" rows
fill `bits_per_byte` (validation nats / ln 2 / UTF-8 bytes of the scored text: comparable across
tokenizers; empty when the text's byte count is unknown). A run with `--eval_tasks` adds a column
per downstream metric (`hellaswag/acc_norm`, ...) after those, filled on its "val" rows.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from common.fileio import atomic_write

FIELDS = ("step", "kind", "epoch", "tokens", "lr", "loss", "ppl", "tokens_per_s", "elapsed_s",
          "grad_norm", "mfu", "bits_per_byte")


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class MetricsLog:
    """Append-only CSV of training and validation metrics.

    Args:
        path: the CSV file (created with a header if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = list(FIELDS)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with atomic_write(self.path, "w") as f:
                f.write(",".join(FIELDS) + "\n")
        else:
            with open(self.path, encoding="utf-8") as f:
                header = f.readline().strip().split(",")
            # downstream metric columns (--eval_tasks) come after the fixed ones
            self.fields += [name for name in header if name not in FIELDS]
            if header != self.fields:  # a run from before the last columns: add them
                self._rewrite(read_metrics(self.path))

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (written by a run that died after its last snapshot)."""
        rows = read_metrics(self.path)
        kept = [r for r in rows if int(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        self._rewrite(kept)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        with atomic_write(self.path, "w") as f:
            writer = csv.DictWriter(f, self.fields, lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, kind: str, epoch: float, tokens: int, lr: float, loss: float,
            tokens_per_s: float | None = None, elapsed_s: float | None = None,
            grad_norm: float | None = None, mfu: float | None = None,
            extra: dict[str, float] | None = None, bits_per_byte: float | None = None) -> None:
        """Append one row; `extra` (downstream metrics) adds columns the first time it names
        them (the file is rewritten with the wider header)."""
        extra = extra or {}
        new = [name for name in extra if name not in self.fields]
        if new:
            self.fields += new
            self._rewrite(read_metrics(self.path))
        row = {"step": step, "kind": kind, "epoch": f"{epoch:.4f}", "tokens": tokens,
               "lr": repr(float(lr)), "loss": repr(float(loss)), "ppl": f"{_ppl(loss):.4f}",
               "tokens_per_s": "" if tokens_per_s is None else f"{tokens_per_s:.1f}",
               "elapsed_s": "" if elapsed_s is None else f"{elapsed_s:.2f}",
               "grad_norm": "" if grad_norm is None else repr(float(grad_norm)),
               "mfu": "" if mfu is None else f"{mfu:.4f}",
               "bits_per_byte": "" if bits_per_byte is None else repr(float(bits_per_byte)),
               **{name: repr(float(value)) for name, value in extra.items()}}
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.fields, lineterminator="\n", restval="").writerow(row)
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """All rows of a metrics CSV as dicts of strings ([] if the file does not exist)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "") -> bool:
    """Draw train and validation loss against step into `png_path` (atomically).

    Returns:
        False when matplotlib is missing or there is nothing to draw, else True.
    """
    rows = read_metrics(metrics_path)
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["kind"] == "train"]
    val = [(int(r["step"]), float(r["loss"])) for r in rows if r["kind"] == "val"]
    if not train and not val:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
