"""Where a run stands (`RunState`), and the snapshot payload that saves and restores it.

A snapshot holds the weights, the optimizer (and loss scaler) state, every process's RNG state,
the flags, and the `RunState` fields under their historic keys (`step`, `epoch`,
`data_position`, `tokens_seen`, `train_time_s`, `val_loss`, ...). `snapshot_payload` is the one
function that builds a snapshot; `RunState.from_snapshot` and `restore_rng` read one back.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch

from corpus.batches import EpochBatches
from model.lm import LMConfig
from training.snapshots import clean_state_dict, restore_rng_state, to_cpu

SNAPSHOT_FORMAT = "1"


@dataclass
class RunState:
    """The counters of a run, saved in every snapshot and restored on resume.

    Attributes:
        step: optimizer steps done.
        epoch, batch: the data position of the next step (epoch, batch index within it).
        tokens_seen: training tokens consumed (all processes).
        train_time: seconds spent in training steps (evaluation excluded).
        best_val, best_name: lowest validation loss so far, and the snapshot that holds it.
        last_val: (loss, perplexity, step) of the latest validation, or None.
        last_bpb, best_bpb: bits per byte of the latest validation and of the best one (None
            where the validation text's byte count is unknown); saved as "val_bpb" and
            "best_val_bpb".
        last_train: the latest training loss read back, or None.
        init_from: the `--init_from` source this run started from, or None.
        time_plan: the `--time_budget` plan (`training.budget.TimePlan.to_dict()`), or None.
        tasks: the latest evaluation's downstream metrics (`--eval_tasks`; `task/metric` ->
            value), or None; saved as "eval_tasks" (best.pt holds those of its own step).
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    best_val: float | None = None
    best_name: str | None = None
    last_val: tuple[float, float, int] | None = None
    last_bpb: float | None = None
    best_bpb: float | None = None
    last_train: float | None = None
    init_from: str | None = None
    time_plan: dict[str, Any] | None = None
    tasks: dict[str, float] | None = None

    def advance(self, batches: EpochBatches) -> int:
        """Count one finished optimizer step; returns the epoch that step belonged to."""
        epoch_of_step = self.epoch
        self.step += 1
        self.batch += 1
        if self.batch == batches.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self.tokens_seen += batches.tokens_per_step
        return epoch_of_step

    @classmethod
    def from_snapshot(cls, ckpt: dict[str, Any], batches: EpochBatches, seed: int,
                      say: Callable[[str], None]) -> RunState:
        """The state a snapshot saved; the data position is mapped to the nearest one when the
        batch grid (batch size, sequence length, seed or data) changed since."""
        step = int(ckpt["step"])
        spe = batches.steps_per_epoch
        pos = ckpt.get("data_position") or {}
        epoch, batch = int(pos.get("epoch", ckpt["epoch"])), int(pos.get("batch", 0))
        same_grid = (pos.get("global_batch") == batches.global_batch
                     and pos.get("seq_len") == batches.seq_len and pos.get("seed") == seed
                     and pos.get("num_windows") == batches.num_windows
                     and pos.get("data_id") in (None, batches.data_id))
        if not same_grid:
            windows = batch * int(pos.get("global_batch") or batches.global_batch)
            batch = min(windows // batches.global_batch, spe - 1)
            say("note: batch size, sequence length, seed or data changed since the "
                "snapshot; continuing from the nearest position (not bit-exact)")
        if batch >= spe:
            epoch, batch = epoch + 1, 0
        last_val = None
        if ckpt.get("val_loss") is not None:
            last_val = (float(ckpt["val_loss"]), float(ckpt.get("val_ppl") or math.nan),
                        int(ckpt.get("val_step", step)))
        return cls(step=step, epoch=epoch, batch=batch,
                   tokens_seen=int(ckpt.get("tokens_seen", 0)),
                   train_time=float(ckpt.get("train_time_s", 0.0)),
                   best_val=ckpt.get("best_val_loss"), best_name=ckpt.get("best_snapshot"),
                   last_val=last_val, last_bpb=ckpt.get("val_bpb"),
                   best_bpb=ckpt.get("best_val_bpb"), last_train=ckpt.get("train_loss"),
                   init_from=ckpt.get("init_from"), time_plan=ckpt.get("time_plan"),
                   tasks=ckpt.get("eval_tasks"))

    def fields(self, batches: EpochBatches, seed: int) -> dict[str, Any]:
        """This state under the snapshot's keys."""
        val = self.last_val
        return {
            "step": self.step,
            "val_loss": val[0] if val else None, "val_ppl": val[1] if val else None,
            "val_step": val[2] if val else None, "val_bpb": self.last_bpb,
            "best_val_loss": self.best_val, "best_val_bpb": self.best_bpb,
            "best_snapshot": self.best_name,
            "train_loss": self.last_train, "tokens_seen": self.tokens_seen,
            "train_time_s": self.train_time, "init_from": self.init_from,
            "time_plan": self.time_plan, "eval_tasks": self.tasks,
            "data_position": {"epoch": self.epoch, "batch": self.batch, "seed": seed,
                              "seq_len": batches.seq_len, "global_batch": batches.global_batch,
                              "num_windows": batches.num_windows,
                              "steps_per_epoch": batches.steps_per_epoch,
                              "data_id": batches.data_id},
        }


def versions() -> dict[str, str]:
    """Library versions recorded in each snapshot."""
    import transformers

    found = {"torch": torch.__version__, "python": platform.python_version(),
             "numpy": np.__version__, "transformers": transformers.__version__,
             "snapshot_format": SNAPSHOT_FORMAT}
    return {k: str(v) for k, v in found.items()}  # plain str: torch's is a str subclass


def snapshot_payload(*, state: RunState, epoch_of_step: int, cfg: LMConfig,
                     model: torch.nn.Module, optimizer: Any,
                     scaler: torch.amp.GradScaler, flags: dict[str, Any],
                     batches: EpochBatches, rng: list[dict[str, Any]],
                     dataset: str, average: Any = None,
                     tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a snapshot saves (weights_only-loadable types only).

    Args:
        state: the run's counters after the step being saved.
        epoch_of_step: the epoch the saved step belonged to (names the file).
        flags: the run's flags as plain values (`RunConfig.to_dict()`), saved as "args"; its
            `seed` and `tokenizer` also name the data position and the tokenizer.
        rng: every process's `capture_rng_state()`, in rank order.
        dataset: the dataset label.
        average: the `--ema` weight average (`training.optim.WeightAverage`), or None. With
            one, `model_state_dict` holds the averaged weights (what `generate_lm.py` and
            `evaluate_lm.py` load), `raw_model_state_dict` the training weights and `ema_state`
            the average's own state, so that a resumed run continues both exactly.
        tokenizer: the tokenizer's keys (`model.tokenizer.tokenizer_record`: GPT-2 by name,
            another tokenizer with its files, so the snapshot works wherever it is copied);
            None: the flags' tokenizer name only.
    """
    weights = model.state_dict() if average is None else average.averaged_state_dict(model)
    payload = {
        "model_config": cfg.to_dict(),
        "model_state_dict": clean_state_dict(weights),
        "optimizer_state_dict": to_cpu(optimizer.state_dict()),
        "epoch": epoch_of_step,
        **state.fields(batches, flags["seed"]),
        "args": dict(flags),
        "rng_state": {"world_size": len(rng), "ranks": [to_cpu(r) for r in rng]},
        "tokenizer": flags["tokenizer"], **(tokenizer or {}), "dataset": dataset,
        "versions": versions(), "created": datetime.now().isoformat(timespec="seconds"),
    }
    if scaler.is_enabled():
        payload["scaler_state_dict"] = scaler.state_dict()
    if average is not None:
        payload["raw_model_state_dict"] = clean_state_dict(model.state_dict())
        payload["ema_state"] = to_cpu(average.state_dict())
    return payload


def restore_rng(ckpt: dict[str, Any], rank: int, world_size: int, seed: int,
                say: Callable[[str], None]) -> None:
    """This process's RNG state from a snapshot; reseeded when the process count changed."""
    ranks = (ckpt.get("rng_state") or {}).get("ranks") or []
    if len(ranks) == world_size:
        restore_rng_state(ranks[rank])
    else:
        torch.manual_seed(seed + int(ckpt["step"]) + 1000003 * rank)
        say(f"note: the snapshot was written by {len(ranks)} process(es), this run has "
            f"{world_size}; dropout randomness is reseeded (not bit-exact)")
