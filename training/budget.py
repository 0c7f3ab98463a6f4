"""`--time_budget`: a run that lasts a wall-clock time instead of a step count.

Before its first step a new run measures what its parts cost on this machine (`measure_costs`):
one warm-up step, then timed steps (their median), one evaluation (extrapolated from one batch of
windows, with the sample and the loss plot when the run makes them) and one snapshot written to
a temporary file. The weights, the optimizer, the loss scaler and the RNG are put back afterwards,
so the run that follows is exactly the `--max_steps` run of the planned length. `plan_steps` then
takes the largest step count whose steps, evaluations and snapshots, after the seconds the start
already took (imports, data, model, the measurement), end within the budget less a reserve
(`RESERVE`) for a slower stretch of the machine than the measured one. The warmup-stable-decay
cool-down (or the cosine decay) is scheduled over that count, so it ends on time.

A machine's speed can drift by tens of percent within minutes, so a warmup-stable-decay run
plans again from its own steps (`Replanner`): every 10 steps of its constant phase it takes the
slower of the mean of its steps and of its last 50 and plans the rest anew, until its cool-down
starts. WSD's rate is constant until the cool-down starts, so the new count is one the run could
have planned from its first step; the cool-down then ends on time (cosine's rate depends on the
total from the first step, so it keeps its plan).

The plan (`TimePlan`) is printed, saved in every snapshot (`time_plan`) and kept as it is by
`--resume` (no new measurement, no re-plan), so a resumed run continues bit-exactly: every
budgeted run is the `--max_steps` run of its final count.

What sets a run's length: `--time_budget`, `--max_steps` or `--epochs`. Giving `--time_budget`
with either of the others is an error; an explicit `--max_steps` or `--epochs` replaces a preset's
time budget. `LM_MAX_STEPS` still stops a budgeted run early, its plan unchanged.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training import distributed as D
from training.optim import wsd_decay_start
from training.options import UsageError
from training.snapshots import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from training.loop import Trainer

RESERVE = 0.05  # of the budget: left unplanned, for a slower stretch than the measured steps
REPLAN_EVERY = 10  # steps: how often a WSD run plans again in its constant phase (`replan`)
REPLAN_RECENT = 50  # steps: a re-plan takes the slower of the mean of all steps and of these
TIMED_STEPS = 5  # steps timed for a plan (after one warm-up step); the median is used


@dataclass
class Costs:
    """Seconds that parts of a run take on this machine (`measure_costs`).

    Attributes:
        step_s: one optimizer step (the median of `timed_steps`).
        eval_s: one evaluation, with its sample and loss plot when the run makes them.
        snapshot_s: writing one snapshot (serialised and written to disk).
        timed_steps: how many steps were timed.
    """

    step_s: float
    eval_s: float
    snapshot_s: float
    timed_steps: int


@dataclass
class TimePlan:
    """The step count a time budget buys, and the measurement behind it.

    Attributes:
        budget_s: the budget, in seconds.
        steps: the run's planned optimizer steps (its schedule's length).
        step_s, eval_s, snapshot_s: the measured costs (`Costs`).
        start_s: seconds already gone when the plan was made (imports, data, model, measuring).
        estimate_s: the whole run's estimated seconds (start included).
        reserve: the fraction of the budget left unplanned.
        replanned_at: the step after which the run planned again (`replan`; 0: not yet).
        first_steps: the count planned before the first step (0: not re-planned).
        run_step_s: the step time the last re-plan used (`Replanner.step_s`; 0: none).
    """

    budget_s: float
    steps: int
    step_s: float
    eval_s: float
    snapshot_s: float
    start_s: float
    estimate_s: float
    reserve: float = RESERVE
    replanned_at: int = 0
    first_steps: int = 0
    run_step_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for a weights_only snapshot."""
        ints = ("steps", "replanned_at", "first_steps")
        return {k: (int(v) if k in ints else float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimePlan:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        """The plan in one line."""
        return (f"time budget {minutes_text(self.budget_s)}: a step takes {self.step_s:.3g} s "
                f"here, an evaluation {self.eval_s:.3g} s, a snapshot {self.snapshot_s:.2g} s, "
                f"and the start took {self.start_s:.1f} s, so {self.steps:,} steps (the whole run "
                f"an estimated {self.estimate_s:.1f} s; {self.reserve:.0%} of the budget kept in "
                "reserve)")


def minutes_text(seconds: float) -> str:
    """600 -> '10 min', 90 -> '1.5 min', 3 -> '3 s'."""
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _count(start: int, end: int, every: int) -> int:
    """How many multiples of `every` lie in (start, end]."""
    return end // every - start // every


def run_seconds(steps: int, costs: Costs, *, start_step: int, eval_interval: int,
                save_interval: int, baseline_eval: bool = False) -> float:
    """Seconds the steps `start_step + 1 .. steps` take, with their evaluations and snapshots.

    The trainer evaluates every `eval_interval` steps and at the last step, and writes a snapshot
    every `save_interval` steps, at the last step and after each evaluation that was the best so
    far (counted here as every evaluation: the usual case while the loss falls).
    """
    n, s = steps, start_step
    final_extra = 1 if n % eval_interval else 0
    evals = _count(s, n, eval_interval) + final_extra + (1 if baseline_eval else 0)
    lcm = eval_interval * save_interval // math.gcd(eval_interval, save_interval)
    saves = (_count(s, n, eval_interval) + _count(s, n, save_interval) - _count(s, n, lcm)
             + (1 if n % eval_interval and n % save_interval else 0))
    return (n - s) * costs.step_s + evals * costs.eval_s + saves * costs.snapshot_s


def plan_steps(budget_s: float, start_s: float, costs: Costs, *, eval_interval: int,
               save_interval: int, baseline_eval: bool = False,
               reserve: float = RESERVE) -> TimePlan:
    """The largest step count whose run ends within `budget_s` less `reserve` of it.

    Args:
        budget_s: the whole run's budget in seconds.
        start_s: seconds already gone (counted against the budget).
        costs: the measured step, evaluation and snapshot seconds.
        eval_interval, save_interval: the run's `--eval_interval` and `--save_interval`.
        baseline_eval: the run validates its starting weights first (`--init_from`).
        reserve: the fraction of the budget left unplanned.

    Raises:
        UsageError: the budget leaves no time for one step with its evaluation and snapshot.
    """
    available = budget_s * (1.0 - reserve) - start_s

    def cost(n: int) -> float:
        return run_seconds(n, costs, start_step=0, eval_interval=eval_interval,
                           save_interval=save_interval, baseline_eval=baseline_eval)

    if cost(1) > available:
        need = (start_s + cost(1)) / (1.0 - reserve)
        raise UsageError(
            f"--time_budget {minutes_text(budget_s)} is too short for one step here: the start "
            f"took {start_s:.1f} s, and a step with its evaluation and snapshot takes "
            f"{cost(1):.1f} s more; give at least {math.ceil(need)}s")
    lo, hi = 1, 2
    while cost(hi) <= available:  # cost grows with n: double, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= available else (lo, mid)
    return TimePlan(budget_s=budget_s, steps=lo, step_s=costs.step_s, eval_s=costs.eval_s,
                    snapshot_s=costs.snapshot_s, start_s=start_s,
                    estimate_s=start_s + cost(lo), reserve=reserve)


def replan(plan: TimePlan, *, step: int, elapsed_s: float, step_s: float, eval_interval: int,
           save_interval: int, warmup_steps: int, cooldown: float) -> TimePlan:
    """The plan made again after `step` steps, from the run's own step time `step_s`.

    The new count is the largest whose remaining steps, evaluations and snapshots end within the
    budget less its reserve, `elapsed_s` being gone; but never one whose cool-down would have
    started by `step` (the steps already run kept the constant rate, so the schedule stays the
    one of a run planned with the new count from the start).

    Args:
        plan: the run's plan. step: the steps done. elapsed_s: seconds since the command started.
        step_s: the run's step time (`Replanner.step_s`).
        eval_interval, save_interval, warmup_steps, cooldown: the run's flags.
    """
    costs = Costs(step_s=step_s, eval_s=plan.eval_s, snapshot_s=plan.snapshot_s,
                  timed_steps=step)
    available = plan.budget_s * (1.0 - plan.reserve) - elapsed_s

    def cost(n: int) -> float:
        return run_seconds(n, costs, start_step=step, eval_interval=eval_interval,
                           save_interval=save_interval)

    lowest = step + 1
    while wsd_decay_start(lowest, warmup_steps, cooldown) < step:
        lowest += 1
    n = lowest
    if cost(n) <= available:
        hi = n + 1
        while cost(hi) <= available:  # double, then bisect
            n, hi = hi, hi + 2 * (hi - step)
        while hi - n > 1:
            mid = (n + hi) // 2
            n, hi = (mid, hi) if cost(mid) <= available else (n, mid)
    return TimePlan(budget_s=plan.budget_s, steps=n, step_s=plan.step_s, eval_s=plan.eval_s,
                    snapshot_s=plan.snapshot_s, start_s=plan.start_s,
                    estimate_s=elapsed_s + cost(n), reserve=plan.reserve, replanned_at=step,
                    first_steps=plan.first_steps or plan.steps, run_step_s=step_s)


def describe_replan(plan: TimePlan) -> str:
    """The final re-plan in one line."""
    change = ("keeping" if plan.steps == plan.first_steps
              else f"{plan.first_steps:,} planned at the start ->")
    return (f"time budget: re-planned after step {plan.replanned_at:,}: the run's steps take "
            f"{plan.run_step_s:.3g} s (the slower of the mean of all and of the last "
            f"{REPLAN_RECENT}; measured {plan.step_s:.3g} s before the first): {change} "
            f"{plan.steps:,} steps (the whole run an estimated {plan.estimate_s:.1f} s of "
            f"{plan.budget_s:g} s)")


class Replanner:
    """Plans a budgeted WSD run again every `REPLAN_EVERY` steps of its constant phase, from its
    own steps, until its cool-down is about to start (`replan`); then the count is final. The
    step time it plans with is the slower of the mean of all the run's steps and the mean of the
    last `REPLAN_RECENT` (a machine that slowed down lately is taken at its word; one that sped
    up is not trusted further than its average). Every process decides `due` alike; the plan
    itself is made on rank 0, from the steps it `record`ed.

    Args:
        plan: the run's plan before its first step.
        eval_interval, save_interval, warmup_steps, cooldown: the run's flags.
        started: the `time.perf_counter()` stamp the budget counts from (the command's start).
    """

    def __init__(self, plan: TimePlan, *, eval_interval: int, save_interval: int,
                 warmup_steps: int, cooldown: float, started: float) -> None:
        self.plan = plan
        self.started = started
        self.final = False
        self._total_s, self._count = 0.0, 0
        self._recent: collections.deque[float] = collections.deque(maxlen=REPLAN_RECENT)
        self._flags = dict(eval_interval=eval_interval, save_interval=save_interval,
                           warmup_steps=warmup_steps, cooldown=cooldown)

    def due(self, step: int) -> bool:
        """Whether to re-plan after `step` steps: every `REPLAN_EVERY` steps after the warm-up,
        while every step so far ran at the constant rate."""
        flags = self._flags
        return (not self.final and step % REPLAN_EVERY == 0 and step > flags["warmup_steps"]
                and step <= wsd_decay_start(self.plan.steps, flags["warmup_steps"],
                                            flags["cooldown"]))

    def record(self, step_s: float) -> None:
        """One step of the run took `step_s` seconds."""
        self._total_s += step_s
        self._count += 1
        self._recent.append(step_s)

    @property
    def step_s(self) -> float:
        """The step time a re-plan uses (see the class)."""
        if not self._count:
            return self.plan.step_s
        return max(self._total_s / self._count, sum(self._recent) / len(self._recent))

    def replan(self, step: int, *, elapsed_s: float | None = None) -> TimePlan:
        """The plan after `step` steps (rank 0): `replan` with `step_s`, `elapsed_s` seconds
        into the budget (default: since `started`)."""
        if elapsed_s is None:
            elapsed_s = time.perf_counter() - self.started
        return replan(self.plan, step=step, elapsed_s=elapsed_s, step_s=self.step_s,
                      **self._flags)

    def adopt(self, plan: TimePlan, step: int) -> bool:
        """Take `plan` (every process); True when it is final (the cool-down starts before the
        next re-plan would be due)."""
        self.plan = plan
        start = wsd_decay_start(plan.steps, self._flags["warmup_steps"], self._flags["cooldown"])
        self.final = start < step + REPLAN_EVERY
        return self.final


# -- measuring --------------------------------------------------------------------------------


def _time_snapshot(trainer: Trainer) -> float:
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


def _time_plot(trainer: Trainer) -> float:
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
def _restore(trainer: Trainer, weights: dict[str, torch.Tensor], optimizer: dict,
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


def measure_costs(trainer: Trainer, *, timed_steps: int = TIMED_STEPS,
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
    cuda = trainer.device.type == "cuda"
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
        if trainer.info.is_main:
            eval_s = _time_evaluation(trainer)
            snapshot_s = _time_snapshot(trainer) if snapshot else 0.0
    finally:
        _restore(trainer, weights, optimizer, scaler, average, rng)
    return Costs(step_s=step_s, eval_s=eval_s, snapshot_s=snapshot_s, timed_steps=len(times))


def _time_evaluation(trainer: Trainer) -> float:
    """One evaluation's seconds: one batch of windows, scaled to the evaluation's windows, plus
    the sample and the plot when the run makes them."""
    from training.evaluation import count_windows
    from training.loop import sample_text

    args = trainer.args
    t0 = time.perf_counter()
    res = trainer.validation_loss(args.eval_batch_size)
    seconds = time.perf_counter() - t0
    windows = count_windows(len(trainer.val_tokens), args.seq_len, args.seq_len)
    if trainer.eval_windows:
        windows = min(windows, trainer.eval_windows)
    seconds *= windows / max(1, res.windows)
    if args.sample_tokens:
        t0 = time.perf_counter()
        sample_text(trainer.parts.model, trainer.tok, args)
        seconds += time.perf_counter() - t0
    if not args.no_plot:
        seconds += _time_plot(trainer)
    return seconds


# -- the plan of a run --------------------------------------------------------------------------


def resolve_plan(args: argparse.Namespace, explicit: set[str], saved: dict | None,
                 resuming: bool) -> TimePlan | None:
    """The plan a resumed run keeps (None: no budget, or a new plan is to be made).

    On resume an explicit `--max_steps` or `--epochs` replaces the run's budget; a different
    `--time_budget` is an error (the plan is the run's length, like its schedule).
    """
    if not resuming:
        return None
    if explicit & {"max_steps", "epochs"}:
        args.time_budget = None
        return None
    if saved is None:
        if "time_budget" in explicit and args.time_budget:
            raise UsageError("--time_budget applies to a new run; the run being resumed has a "
                             "fixed length: give --max_steps to change it")
        return None
    plan = TimePlan.from_dict(saved)
    if "time_budget" in explicit and args.time_budget * 60 != plan.budget_s:
        raise UsageError(f"--time_budget {args.time_budget:g}: the run being resumed keeps its "
                         f"plan ({plan.steps:,} steps for {minutes_text(plan.budget_s)}); give "
                         "--max_steps to change its length")
    args.time_budget = plan.budget_s / 60
    return plan


def make_plan(trainer: Trainer, budget_s: float, started: float, *, collective: bool
              ) -> TimePlan:
    """Measure this run's costs and plan its steps for `budget_s` seconds since `started`
    (a `time.perf_counter()` stamp).

    `collective`: every process measures its steps together (through DDP) and rank 0's plan is
    broadcast; otherwise only this process measures (e.g. rank 0 for `--explain`).

    Raises:
        UsageError: the budget leaves no time for one step (on every process).
    """
    args, info = trainer.args, trainer.info

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
                              eval_interval=args.eval_interval, save_interval=args.save_interval,
                              baseline_eval=bool(trainer.state.init_from))
        except UsageError as exc:
            error = str(exc)
    if collective:
        plan = D.broadcast_object(info, plan)
    agreed(error)
    return plan
