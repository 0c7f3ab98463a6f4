"""`--time_budget`: a run that lasts a wall-clock time instead of a step count.

Before its first step a new run measures what its parts cost on this machine
(`training.measure.measure_costs`; this module is the arithmetic on those costs):
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

import collections
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from training.errors import UsageError
from training.optim import wsd_decay_start

RESERVE = 0.05  # of the budget: left unplanned, for a slower stretch than the measured steps
REPLAN_EVERY = 10  # steps: how often a WSD run plans again in its constant phase (`replan`)
REPLAN_RECENT = 100  # steps: a re-plan takes the slower of the mean of all steps and the median
# of these (a median, so that a slow patch shorter than half of them, or a few long steps, does
# not cut the run: such a patch once left 53 s of a 600-s budget unused)
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
            f"{plan.run_step_s:.3g} s (the slower of the mean of all and the median of the "
            f"last {REPLAN_RECENT}; measured {plan.step_s:.3g} s before the first): {change} "
            f"{plan.steps:,} steps (the whole run an estimated {plan.estimate_s:.1f} s of "
            f"{plan.budget_s:g} s)")


class Replanner:
    """Plans a budgeted WSD run again every `REPLAN_EVERY` steps of its constant phase, from its
    own steps, until its cool-down is about to start (`replan`); then the count is final. The
    step time it plans with is the slower of the mean of all the run's steps and the median of
    the last `REPLAN_RECENT` (a machine that slowed down lately is taken at its word; one that
    sped up is not trusted further than its average; a short slow patch is not the machine).
    Every process decides `due` alike; the plan itself is made on rank 0, from the steps it
    `record`ed.

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
        return max(self._total_s / self._count, statistics.median(self._recent))

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


# -- the plan of a run --------------------------------------------------------------------------


def resolve_plan(time_budget: float | None, explicit: set[str], saved: dict | None,
                 resuming: bool) -> tuple[TimePlan | None, float | None]:
    """The plan a resumed run keeps, and the run's `--time_budget`.

    On resume an explicit `--max_steps` or `--epochs` replaces the run's budget; a different
    `--time_budget` is an error (the plan is the run's length, like its schedule).

    Args:
        time_budget: `--time_budget` (minutes) as resolved so far. explicit: the flags given.
        saved: the snapshot's `time_plan`, or None. resuming: whether the run resumes.

    Returns:
        (the plan, None: no budget, or a new plan is to be made; the `--time_budget` to keep).
    """
    if not resuming:
        return None, time_budget
    if explicit & {"max_steps", "epochs"}:
        return None, None
    if saved is None:
        if "time_budget" in explicit and time_budget:
            raise UsageError("--time_budget applies to a new run; the run being resumed has a "
                             "fixed length: give --max_steps to change it")
        return None, time_budget
    plan = TimePlan.from_dict(saved)
    if "time_budget" in explicit and time_budget * 60 != plan.budget_s:
        raise UsageError(f"--time_budget {time_budget:g}: the run being resumed keeps its "
                         f"plan ({plan.steps:,} steps for {minutes_text(plan.budget_s)}); give "
                         "--max_steps to change its length")
    return plan, plan.budget_s / 60
