"""Measuring what a run's parts cost on this machine, and planning a `--time_budget` run from it.

`measure_costs` times a step, an evaluation and a snapshot of a run and puts the run back as it
was; `make_plan` measures and plans the steps with `training.budget.plan_steps` (the arithmetic).
The trainer (`training.loop.Trainer`) measures through here; this module takes the trainer as
the `Measured` protocol, so it does not import the loop.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from corpus.batches import EpochBatches
from training import distributed as D
from training.budget import RESERVE, TIMED_STEPS, Costs, TimePlan, minutes_text, plan_steps
from training.build import Parts, Runtime
from training.config import RunConfig
from training.errors import UsageError
from training.evaluation import EvalResult, count_windows, sample_text
from training.run_state import RunState
from training.snapshots import capture_rng_state, restore_rng_state


class Measured(Protocol):
    """What measuring uses of a run (`training.loop.Trainer` is one)."""

    config: RunConfig
    parts: Parts
    batches: EpochBatches
    val_tokens: np.ndarray
    runtime: Runtime
    state: RunState

    def train_step(self, epoch: int, batch_idx: int, runner: torch.nn.Module | None = None
                   ) -> torch.Tensor: ...

    def validation_loss(self, max_windows: int | None) -> EvalResult: ...


def _time_snapshot(trainer: Measured) -> float:
    """Seconds to serialise and write (with fsync) what a snapshot of this run holds."""
    parts = trainer.parts
    payload: dict[str, Any] = {"model_state_dict": parts.model.state_dict(),
                               "optimizer_state_dict": parts.optimizer.state_dict()}
    if parts.average is not None:
        payload["ema_state"] = parts.average.state_dict()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _time_plot(trainer: Measured) -> float:
    """Seconds to draw the loss plot (on a two-row metrics file in a temporary folder)."""
    from training.metrics import MetricsLog, plot_losses

    with tempfile.TemporaryDirectory() as tmp:
        log = MetricsLog(Path(tmp) / "metrics.csv")
        log.log(1, "train", 0.0, 0, 0.0, 10.0)
        log.log(1, "val", 0.0, 0, 0.0, 10.0)
        t0 = time.perf_counter()
        plot_losses(log.path, Path(tmp) / "loss.png", "measuring")
        return time.perf_counter() - t0


@torch.no_grad()
def _restore(trainer: Measured, weights: dict[str, torch.Tensor], optimizer: dict,
             scaler: dict | None, average: dict | None, rng: dict) -> None:
    """Put back what `measure_costs` saved before its steps."""
    parts = trainer.parts
    parts.model.load_state_dict(weights)
    parts.optimizer.load_state_dict(optimizer)
    if scaler is not None:
        parts.scaler.load_state_dict(scaler)
    if average is not None:
        parts.average.load_state_dict(average)
    restore_rng_state(rng)


def measure_costs(trainer: Measured, *, timed_steps: int = TIMED_STEPS,
                  max_seconds: float | None = None, runner: torch.nn.Module | None = None,
                  snapshot: bool = True) -> Costs:
    """Time a step, an evaluation and a snapshot of this run, then put the run back as it was.

    The steps run at a learning rate of 0 on the first batches, after one warm-up step (and
    compilation with `--compile`); the weights, optimizer state, loss scaler and RNG are
    restored afterwards, so the run's own steps are those of an unmeasured run.

    Args:
        trainer: the run (its model, optimizer, batches and validation split).
        timed_steps: steps to time after the warm-up.
        max_seconds: stop timing steps once they took this long (one process only).
        runner: what a step calls (default: the trainer's, DDP-wrapped in several processes;
            every process must then call this together, with the same `timed_steps`).
        snapshot: also time writing a snapshot (else its cost is 0).

    Returns:
        The costs; evaluation and snapshot are timed on rank 0 only (0 elsewhere).
    """
    parts = trainer.parts
    weights = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    optimizer = copy.deepcopy(parts.optimizer.state_dict())
    scaler = copy.deepcopy(parts.scaler.state_dict()) if parts.scaler.is_enabled() else None
    average = copy.deepcopy(parts.average.state_dict()) if parts.average else None
    rng = capture_rng_state()
    for g in parts.optimizer.param_groups:
        g["lr"] = 0.0
    spe = trainer.batches.steps_per_epoch
    cuda = trainer.runtime.device.type == "cuda"
    try:
        trainer.train_step(0, 0, runner)  # warm-up (and compilation with --compile)
        if cuda:
            torch.cuda.synchronize()
        times: list[float] = []
        while len(times) < timed_steps and (max_seconds is None or sum(times) < max_seconds):
            t0 = time.perf_counter()
            trainer.train_step(0, min(len(times) + 1, spe - 1), runner)
            if parts.average is not None:  # the run updates its weight average every step
                parts.average.update(parts.model)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        eval_s = snapshot_s = 0.0
        if trainer.runtime.info.is_main:
            eval_s = _time_evaluation(trainer)
            snapshot_s = _time_snapshot(trainer) if snapshot else 0.0
    finally:
        _restore(trainer, weights, optimizer, scaler, average, rng)
    return Costs(step_s=step_s, eval_s=eval_s, snapshot_s=snapshot_s, timed_steps=len(times))


def _time_evaluation(trainer: Measured) -> float:
    """One evaluation's seconds: one batch of windows, scaled to the evaluation's windows, plus
    the sample and the plot when the run makes them."""
    evals, seq_len = trainer.config.eval, trainer.config.batch.seq_len
    t0 = time.perf_counter()
    res = trainer.validation_loss(evals.eval_batch_size)
    seconds = time.perf_counter() - t0
    windows = count_windows(len(trainer.val_tokens), seq_len, seq_len)
    if evals.windows:
        windows = min(windows, evals.windows)
    seconds *= windows / max(1, res.windows)
    if evals.sample_tokens:
        t0 = time.perf_counter()
        sample_text(trainer.parts.model, evals.sample_prompt, evals.sample_tokens,
                    trainer.config.seed)
        seconds += time.perf_counter() - t0
    if not trainer.config.log.no_plot:
        seconds += _time_plot(trainer)
    return seconds


def make_plan(trainer: Measured, budget_s: float, started: float, *, collective: bool
              ) -> TimePlan:
    """Measure this run's costs and plan its steps for `budget_s` seconds since `started`
    (a `time.perf_counter()` stamp).

    `collective`: every process measures its steps together (through DDP) and rank 0's plan is
    broadcast; otherwise only this process measures (e.g. rank 0 for `--explain`).

    Raises:
        UsageError: the budget leaves no time for one step (on every process).
    """
    info, log = trainer.runtime.info, trainer.config.log

    def agreed(error: str | None) -> None:  # rank 0's verdict, on every process
        error = D.broadcast_object(info, error) if collective else error
        if error:
            raise UsageError(error)

    spent = time.perf_counter() - started
    agreed(f"--time_budget {minutes_text(budget_s)} is too short for one step here: the start "
           f"alone took {spent:.1f} s" if spent >= budget_s * (1.0 - RESERVE) else None)
    runner = None if collective else trainer.parts.module
    costs = measure_costs(trainer, runner=runner)
    plan, error = None, None
    if info.is_main or not collective:
        try:
            plan = plan_steps(budget_s, time.perf_counter() - started, costs,
                              eval_interval=trainer.config.eval.eval_interval,
                              save_interval=log.save_interval,
                              baseline_eval=bool(trainer.state.init_from))
        except UsageError as exc:
            error = str(exc)
    if collective:
        plan = D.broadcast_object(info, plan)
    agreed(error)
    return plan
