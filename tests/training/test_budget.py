"""`--time_budget`: the plan's arithmetic, a budgeted run that ends on time with its schedule
finished, a resume that keeps the plan bit-exactly, and which flag sets a run's length."""

from __future__ import annotations

import time

import pytest
import torch
from train_helpers import tiny_flags

from training import budget, optim, train_lm
from training.metrics import read_metrics
from training.options import UsageError, parse_args

# -- the plan's arithmetic ------------------------------------------------------------------------


def _simulated_seconds(steps: int, costs: budget.Costs, eval_interval: int, save_interval: int
                       ) -> float:
    """What the trainer's loop does (training/loop.py `_one_step`), step by step: evaluate every
    `eval_interval` steps and at the end, snapshot every `save_interval` steps, at the end and
    after each best evaluation (here: every evaluation)."""
    total = 0.0
    for step in range(1, steps + 1):
        total += costs.step_s
        final = step == steps
        evaluate = final or step % eval_interval == 0
        save = final or step % save_interval == 0 or evaluate
        total += costs.eval_s * evaluate + costs.snapshot_s * save
    return total


@pytest.mark.parametrize("eval_interval,save_interval", [(10, 10), (7, 3), (4, 50), (1, 1)])
def test_run_seconds_counts_what_the_loop_does(eval_interval, save_interval):
    costs = budget.Costs(step_s=1.0, eval_s=10.0, snapshot_s=100.0, timed_steps=5)
    for steps in (1, 2, 3, 7, 10, 21, 50, 51, 99):
        assert budget.run_seconds(steps, costs, start_step=0, eval_interval=eval_interval,
                                  save_interval=save_interval) == pytest.approx(
            _simulated_seconds(steps, costs, eval_interval, save_interval)), steps


def test_plan_takes_the_most_steps_that_fit():
    costs = budget.Costs(step_s=0.5, eval_s=3.0, snapshot_s=0.4, timed_steps=5)
    kw = dict(eval_interval=100, save_interval=100)
    plan = budget.plan_steps(600.0, 12.0, costs, **kw)
    available = 600.0 * (1 - budget.RESERVE) - 12.0
    cost = lambda n: budget.run_seconds(n, costs, start_step=0, **kw)  # noqa: E731
    assert cost(plan.steps) <= available < cost(plan.steps + 1)
    assert plan.estimate_s == pytest.approx(12.0 + cost(plan.steps)) and plan.estimate_s <= 600
    assert budget.TimePlan.from_dict(plan.to_dict()) == plan
    # A fine-tune validates its starting weights first: one evaluation more to fit.
    assert budget.plan_steps(600.0, 12.0, costs, baseline_eval=True, **kw).steps < plan.steps
    with pytest.raises(UsageError, match="too short for one step"):
        budget.plan_steps(10.0, 9.0, costs, **kw)


def _wsd(n: int, steps: int) -> list[float]:
    return [optim.lr_scale(s, schedule="wsd", warmup_steps=10, max_steps=n, min_ratio=0.0,
                           cooldown=0.4) for s in range(steps)]


@pytest.mark.parametrize("slower", [0.5, 0.9, 1.0, 1.2, 1.5, 3.0])
def test_replan_fits_the_rest_to_the_run_s_own_speed(slower):
    """After 700 steps at `slower` times the measured step, the new count fits the budget and
    keeps the rate of every step already run (so the run is the `--max_steps` run of it)."""
    kw = dict(eval_interval=150, save_interval=150)
    costs = budget.Costs(step_s=0.4, eval_s=4.0, snapshot_s=0.3, timed_steps=5)
    plan = budget.plan_steps(600.0, 8.0, costs, **kw)
    step, step_s = 700, 0.4 * slower
    assert step < optim.wsd_decay_start(plan.steps, 10, 0.4)
    elapsed = 8.0 + step * step_s + budget.run_seconds(step, budget.Costs(0.0, 4.0, 0.3, 0),
                                                       start_step=0, **kw)
    new = budget.replan(plan, step=step, elapsed_s=elapsed, step_s=step_s, warmup_steps=10,
                        cooldown=0.4, **kw)
    assert (new.replanned_at, new.first_steps, new.run_step_s) == (step, plan.steps, step_s)
    assert budget.TimePlan.from_dict(new.to_dict()) == new
    assert _wsd(new.steps, step) == _wsd(plan.steps, step)  # the steps run keep their rates
    rest = budget.Costs(step_s=step_s, eval_s=4.0, snapshot_s=0.3, timed_steps=0)
    cost = lambda n: budget.run_seconds(n, rest, start_step=step, **kw)  # noqa: E731
    budget_left = 600.0 * (1 - budget.RESERVE) - elapsed
    lowest = min(n for n in range(step + 1, 10 * step)
                 if optim.wsd_decay_start(n, 10, 0.4) >= step)
    if new.steps > lowest:  # the most steps that fit...
        assert cost(new.steps) <= budget_left < cost(new.steps + 1)
    else:  # ...or, when even the shortest cool-down from here overruns, that one
        assert new.steps == lowest and cost(lowest) > budget_left
    assert (new.steps > plan.steps) == (slower < 1.0) or slower == 1.0
    assert new.estimate_s == pytest.approx(elapsed + cost(new.steps))


def test_replanner_plans_only_while_the_rate_is_constant():
    plan = budget.TimePlan(budget_s=60.0, steps=100, step_s=0.5, eval_s=1.0, snapshot_s=0.1,
                           start_s=2.0, estimate_s=57.0)
    rp = budget.Replanner(plan, eval_interval=50, save_interval=50, warmup_steps=10, started=0.0,
                          cooldown=0.4)
    assert [s for s in range(1, 101) if rp.due(s)] == [20, 30, 40, 50, 60]
    # The slower of the mean of all steps and the median of the last REPLAN_RECENT.
    n = budget.REPLAN_RECENT
    for _ in range(n):
        rp.record(0.05)
    assert rp.step_s == pytest.approx(0.05)
    for _ in range(n):
        rp.record(0.15)
    assert rp.step_s == pytest.approx(0.15)  # lately slower: the recent median
    for _ in range(n):
        rp.record(0.05)
    assert rp.step_s == pytest.approx((0.05 * 2 + 0.15) / 3)  # lately faster: the mean of all
    for _ in range(n // 2 - 1):  # a slow patch shorter than half the window: the mean of all
        rp.record(0.6)
    assert rp.step_s == pytest.approx((0.05 * 2 * n + 0.15 * n + 0.6 * (n // 2 - 1))
                                      / (3 * n + n // 2 - 1))
    # Much faster than planned: the count grows, and so does the constant phase.
    new = rp.replan(60, elapsed_s=2.0 + 60 * 0.1)
    assert new.steps > 100 and not rp.adopt(new, 60) and rp.due(70)
    # The count that ends the constant phase before the next re-plan is final.
    last = budget.replan(rp.plan, step=70, elapsed_s=50.0, step_s=0.5, eval_interval=50,
                         save_interval=50, warmup_steps=10, cooldown=0.4)
    assert rp.adopt(last, 70) and not any(rp.due(s) for s in range(71, last.steps + 1))


def test_which_flag_sets_the_length():
    args, _ = parse_args(["--preset", "cpu-10min"])
    assert args.time_budget == 10 and args.max_steps is None
    for flag in (["--max_steps", "50"], ["--epochs", "2"]):  # an explicit length replaces it
        args, _ = parse_args(["--preset", "cpu-10min", *flag])
        assert args.time_budget is None
    args, _ = parse_args(["--preset", "demo", "--time_budget", "90s"])  # ... and a budget steps
    assert args.time_budget == 1.5 and args.max_steps is None
    for flag in (["--max_steps", "50"], ["--epochs", "2"]):
        with pytest.raises(UsageError, match="both set the run's length"):
            parse_args(["--time_budget", "5", *flag])


# -- runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm(tmp_path_factory, one_thread):
    """One tiny run first, so the budgeted runs below do not time this process's first imports
    (the tokenizer, torch._dynamo under the optimizer): about 2-8 s on a busy 2-core machine."""
    tmp = tmp_path_factory.mktemp("warm")
    assert train_lm.main(tiny_flags(tmp, "--max_steps", "1", "--optimizer", "muon")) == 0
    return tmp


def _recipe(*extra: str) -> tuple[str, ...]:
    return ("--optimizer", "muon", "--dropout", "0.1", "--dtype", "float32",
            "--log_interval", "1", *extra)


def test_budgeted_run_ends_within_it_with_its_schedule_done(tmp_path, warm, capsys):
    # Seconds enough for a start (tokenizer, data, model, the measurement) that took 5 s on a
    # 2-core machine loaded eight times over, and still steps after it.
    seconds = 15.0
    flags = tiny_flags(tmp_path, *_recipe("--time_budget", f"{seconds}s", "--schedule", "wsd",
                                          "--cooldown", "0.5", "--min_lr", "0",
                                          "--eval_interval", "10"))
    t0 = time.perf_counter()
    assert train_lm.main(flags) == 0
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert wall < seconds + 10.0, (wall, out)  # a generous margin: the machine is shared
    plan = torch.load(tmp_path / "run" / "snapshots" / "latest.pt",
                      weights_only=True)["time_plan"]
    n = plan["steps"]  # the final count: re-planned from the run's own steps, or the first
    assert n >= 2 and plan["budget_s"] == seconds
    # A re-plan on a loaded machine may find even the shortest cool-down from there too long.
    assert plan["estimate_s"] <= seconds or plan["replanned_at"]
    first = plan["first_steps"] if plan["replanned_at"] else n
    assert "time budget 15 s: a step takes" in out and f"so {first:,} steps" in out, out
    assert ("re-planned after step" in out) == bool(plan["replanned_at"])
    assert "time budget: the whole run took" in out
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["kind"] == "train"]
    assert [int(r["step"]) for r in rows] == list(range(1, n + 1))
    # The schedule is the one of the final count from the first step (a re-plan only happens
    # while the rate is constant): its cool-down ends with the run.
    expected = [3e-3 * optim.lr_scale(s, schedule="wsd", warmup_steps=2, max_steps=n,
                                      min_ratio=0.0, cooldown=0.5) for s in range(n)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-12)
    assert optim.lr_scale(n, schedule="wsd", warmup_steps=2, max_steps=n, min_ratio=0.0,
                          cooldown=0.5) == 0.0


def test_resumed_budgeted_run_keeps_its_plan_bit_exact(tmp_path, warm, monkeypatch, capsys):
    # A long budget (the plan runs to hundreds of steps); LM_MAX_STEPS stops each invocation,
    # as Ctrl-C would. Cosine: every step's rate after the warm-up depends on the plan's length.
    def flags(out, *length):
        return tiny_flags(tmp_path, *_recipe("--schedule", "cosine", "--eval_interval", "3",
                                             "--out_dir", str(out), *length))

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("LM_MAX_STEPS", "3")
    assert train_lm.main(flags(a, "--time_budget", "2")) == 0
    first = torch.load(a / "snapshots" / "latest.pt", weights_only=True)["time_plan"]
    assert first["steps"] > 6
    monkeypatch.setenv("LM_MAX_STEPS", "6")
    capsys.readouterr()
    assert train_lm.main(["--resume", "auto", "--out_dir", str(a)]) == 0
    assert "keeping the run's plan: time budget 2 min" in capsys.readouterr().out
    resumed = torch.load(a / "snapshots" / "latest.pt", weights_only=True)
    assert resumed["time_plan"] == first and resumed["step"] == 6

    # The run of that plan without a budget: the same rates, batches, dropout and weights.
    assert train_lm.main(flags(b, "--max_steps", str(first["steps"]))) == 0
    plain = torch.load(b / "snapshots" / "latest.pt", weights_only=True)
    assert plain["time_plan"] is None
    assert [r["lr"] for r in read_metrics(a / "metrics.csv") if r["kind"] == "train"] == [
        r["lr"] for r in read_metrics(b / "metrics.csv") if r["kind"] == "train"]
    for name, value in plain["model_state_dict"].items():
        assert torch.equal(value, resumed["model_state_dict"][name]), name
    for part in ("muon", "adamw"):
        sa = plain["optimizer_state_dict"][part]["state"]
        sb = resumed["optimizer_state_dict"][part]["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (part, i, k)

    # A resume may set another length with --max_steps, not another budget.
    capsys.readouterr()
    code = train_lm.main(["--resume", "auto", "--out_dir", str(a), "--time_budget", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "keeps its plan" in err and len(err.strip().splitlines()) == 1


def test_explain_shows_the_plan_and_writes_nothing(tmp_path, warm, capsys):
    assert train_lm.main(tiny_flags(tmp_path, "--time_budget", "1", "--explain")) == 0
    out = capsys.readouterr().out
    assert "Planned from the 1 min time budget" in out and "a step takes" in out, out
    steps = int(out.split("Schedule: ")[1].split(" steps")[0].replace(",", ""))
    assert f"so {steps:,} steps" in out
    assert not (tmp_path / "run" / "snapshots").exists()
