#!/usr/bin/env python
"""Train a GPT-style language model on real text; snapshots feed `generate_lm.py`.

    python training/train_lm.py --preset demo                 # ~3 minutes on a 2-core CPU
    python training/train_lm.py --dataset wikitext --data_dir data/wikitext-2-raw
    python training/train_lm.py --preset demo --resume auto   # continue after Ctrl-C
    python training/train_lm.py --preset demo --explain       # what it would do, how long
    python training/train_lm.py --preset cpu-10min            # ends within 10 min (--time_budget)
    python training/train_lm.py --init_from gpt2 --preset finetune --train_file my_text.txt
    torchrun --nproc_per_node=8 training/train_lm.py --preset gpt2-124m --dataset wikitext103

Everything goes to the run directory (`lm_<dataset>/` unless `--out_dir`): `snapshots/`
(`snapshot_epoch_*_step_*.pt`, `latest.pt`, `best.pt`), `metrics.csv`, `loss_curve.png` and the
token cache. See `--help` for every flag; `LM_MAX_STEPS=N` caps the steps of one invocation
and `LM_MAX_EVAL_WINDOWS=N` the windows of each evaluation (smoke tests and docs use both).

The trainer's parts, each in one place:
    the run's configuration (flags, preset, snapshot) training/config.py (flags: options.py)
    where a run starts (new, --init_from, --resume)   training/start.py
    the run's counters, the snapshot payload          training/run_state.py
    model, optimizer, scaler                          training/build.py (optimizer: optim.py)
    the step loop, evaluation + samples, snapshots    training/loop.py (Trainer)
    a --time_budget's plan (steps from a timed step)  training/budget.py (timing: measure.py)
    preparing the run directory, the order of it all  here (_train)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()  # a --time_budget counts the imports below too

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from corpus.batches import EpochBatches  # noqa: E402
from corpus.datasets import (  # noqa: E402
    DataArgs,
    DataError,
    describe_split,
    load_split,
    no_bytes_note,
)
from corpus.token_splitting import TokenSplitter  # noqa: E402
from model.checkpoint import CheckpointError, DeviceError, pick_device  # noqa: E402
from model.lm import LMConfig  # noqa: E402
from model.tokenizer import TokenizerLoadError, load_tokenizer  # noqa: E402
from training import distributed as D  # noqa: E402
from training.budget import Replanner, TimePlan  # noqa: E402
from training.build import Parts, Runtime, build_parts  # noqa: E402
from training.config import RunConfig, requested_device, resolve_config  # noqa: E402
from training.explain import RunFacts, print_explanation  # noqa: E402
from training.loggers import LoggerError, RunLog  # noqa: E402
from training.loop import TrainData, Trainer  # noqa: E402
from training.measure import make_plan  # noqa: E402
from training.options import (  # noqa: E402
    DTYPE_NAMES,
    UsageError,
    cpu_has_bf16,
    max_steps_cap,
    parse_args,
    resolve_dtype,
)
from training.preflight import check_memory, check_output_paths  # noqa: E402
from training.run_state import RunState, restore_rng  # noqa: E402
from training.runlock import lock_run_dir  # noqa: E402
from training.snapshots import SnapshotError, list_snapshots, remove_stale_temporaries  # noqa: E402
from training.start import (  # noqa: E402
    RunStart,
    check_architecture,
    check_resume_fits,
    check_vocabulary,
    model_architecture,
    source_weights,
)
from training.unseen_tokens import UnseenTokens, seen_token_mask  # noqa: E402


def _say(info: D.DistInfo, *lines: str) -> None:
    if info.is_main:
        for line in lines:
            print(line, flush=True)


def _load_data(data: DataArgs, info: D.DistInfo):
    """Train and val tokens; rank 0 builds the caches first, the others then read them."""
    def load():
        train, _ = load_split(data, "train")
        val, val_bytes = load_split(data, "val")
        return train, val, val_bytes

    result, error = None, None
    if info.is_main:
        try:
            result = load()
        except DataError as exc:
            error = str(exc)
    error = D.broadcast_object(info, error)
    if error:
        raise DataError(error)
    if not info.is_main:
        result = load()
    train, val, val_bytes = result
    if len(val) < 2:
        raise DataError(f"the validation split has {len(val)} token(s); it needs at least 2")
    if val_bytes is None:
        _say(info, no_bytes_note(val, "val"))
    return train, val, val_bytes


def _unseen_tokens(mode: str, start: RunStart, train_tokens, vocab_size: int,
                   device: torch.device, splitter: TokenSplitter | None = None
                   ) -> UnseenTokens | None:
    """`--unseen_tokens shared`: the training split's seen ids, with those `splitter` can make
    from them (None: off, or all ids occur)."""
    if mode != "shared":
        return None
    if start.kind == "init":
        raise UsageError(f"--unseen_tokens shared needs a new model: the weights of --init_from "
                         f"{start.source} have their own rows for every token; give "
                         "--unseen_tokens full")
    try:
        seen = seen_token_mask(train_tokens, vocab_size)
        return UnseenTokens.from_seen(seen if splitter is None else splitter.reachable(seen),
                                      device)
    except ValueError as exc:  # a damaged split, or one encoded with a larger vocabulary
        raise DataError(f"the training split: {exc}; prepare the data again with this "
                        "run's tokenizer") from None


def _model_config(config: RunConfig, start: RunStart, info: D.DistInfo, device):
    """(precision, tokenizer, model config) for the flags; checks them against the start."""
    dtype, m, tokenizer = config.speed.dtype, config.model, config.data.tokenizer
    amp = resolve_dtype(dtype, device)
    if amp == torch.bfloat16 and device.type == "cpu" and dtype == "bfloat16":
        if not cpu_has_bf16():
            _say(info, "warning: this CPU has no native bfloat16 instructions; float32 is faster")
    tok = load_tokenizer(tokenizer)
    vocab = m.vocab_size or len(tok)
    check_vocabulary(start, vocab, len(tok), tokenizer)
    try:
        cfg = LMConfig(vocab, m.d_model, m.num_heads, m.num_layers, m.d_ff, m.max_seq_len,
                       m.dropout, **model_architecture(start, m.arch, m.num_kv_heads))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if start.resuming:
        check_resume_fits(cfg, start)
    check_architecture(cfg, start)
    return amp, tok, cfg


def _task_runner(config: RunConfig, tokenizer, max_seq_len: int):
    """`--eval_tasks`: the tasks loaded and checked against the model's context, before any
    training (a `downstream.tasks.TaskRunner`)."""
    try:
        from downstream.tasks import TaskRunner, parse_task_names

        runner = TaskRunner(parse_task_names(config.eval.eval_tasks),
                            limit=config.eval.eval_tasks_limit,
                            include_path=config.eval.eval_tasks_path)
        runner.check_fit(tokenizer, max_seq_len)
    except ValueError as exc:  # TaskError, or the harness not installed
        raise UsageError(f"--eval_tasks: {exc}") from None
    return runner


def _prepare_run_dir(config: RunConfig, start: RunStart, info: D.DistInfo) -> RunLog | None:
    """Create the run directory, clear half-written files, open the run's log (rank 0).

    Checks on the run directory before any training belong here.
    """
    if not info.is_main:
        return None
    log = config.log
    log.snap_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(log.snap_dir)
    return RunLog(log.out_dir, log.log_to.split(","), config.to_dict(),
                  resume_step=int(start.ckpt["step"]) if start.resuming else None)


def _run(argv: list[str] | None, started: float) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, explicit = parse_args(argv)
    cap = max_steps_cap()
    device = pick_device(requested_device(args))
    info = D.init_distributed(device.type)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        resolved = resolve_config(args, explicit, world_size=info.world_size,
                                  say=lambda line: _say(info, line))
        return _train(resolved.config, resolved.start, resolved.plan, argv, cap, device, info,
                      started)
    finally:
        D.shutdown(info)


def _restore_or_init(config: RunConfig, start: RunStart, parts: Parts, batches: EpochBatches,
                     unseen: UnseenTokens | None, info: D.DistInfo) -> RunState:
    """The run's state: a resumed snapshot's (weights, optimizer, counters, RNG), else a new
    run's (from the `--init_from` weights, if any)."""
    state = RunState(init_from=start.source)
    if start.resuming:
        parts.load_snapshot(start.ckpt, start.path)
        if unseen is not None and not unseen.rows_equal(parts.model.lm_head.weight):
            raise SnapshotError(f"{start.path}: its unseen tokens' embedding rows differ, so "
                                "--unseen_tokens shared cannot continue it (it was trained with "
                                "--unseen_tokens full, or on other data); resume with "
                                "--unseen_tokens full")
        state = RunState.from_snapshot(start.ckpt, batches, config.seed, lambda s: _say(info, s))
        state.init_from = state.init_from or start.source
        restore_rng(start.ckpt, info.rank, info.world_size, config.seed,
                    lambda s: _say(info, s))
    else:
        if start.kind == "init":
            parts.load_weights(source_weights(start, parts.model.config))
        if info.enabled:
            torch.manual_seed(config.seed + 1000003 * info.rank)  # other dropout masks per rank
    return state


def _explain(config: RunConfig, trainer: Trainer, start: RunStart, plan: TimePlan | None,
             argv: list[str]) -> int:
    """`--explain`: print what the run would do (rank 0), train nothing."""
    info, state, model = trainer.info, trainer.state, trainer.parts.model
    if info.is_main:
        cfg = model.config
        facts = RunFacts(
            model_config=cfg, num_params=model.num_params(non_embedding=False),
            non_embedding=model.num_params(non_embedding=False) - (
                cfg.vocab_size + cfg.max_seq_len) * cfg.d_model,
            batches=trainer.batches, max_steps=trainer.max_steps, stop_at=trainer.stop_at,
            start_step=state.step, train_desc=describe_split(config.data, "train"),
            val_desc=describe_split(config.data, "val"), val_tokens=len(trainer.val_tokens),
            device=trainer.device, amp=trainer.amp, world_size=info.world_size,
            resumed_from=start.path if start.resuming else None, argv=argv,
            init_from=state.init_from, plan=plan,
            existing_run=not start.resuming and bool(list_snapshots(config.log.snap_dir)))
        print_explanation(config, facts,
                          (lambda: (plan.step_s, plan.eval_s)) if plan else trainer.measure)
    D.barrier(info)
    return 0


def _train(config: RunConfig, start: RunStart, plan: TimePlan | None, argv: list[str],
           cap: int | None, device: torch.device, info: D.DistInfo, started: float) -> int:
    """Start (or resume) a run and train it: the order of things, each done elsewhere.

    `plan`: the time plan a resumed budgeted run keeps. `started`: the `time.perf_counter()`
    stamp a `--time_budget` counts from.
    """
    explain, snap_dir, batch = config.start.explain, config.log.snap_dir, config.batch
    if not start.resuming and not explain and list_snapshots(snap_dir):
        raise UsageError(f"{snap_dir} already holds snapshots of another run; continue it with "
                         "--resume auto, or start over with a new --out_dir")
    amp, tok, cfg = _model_config(config, start, info, device)
    # Before anything is allocated or written: fits in memory, paths usable, nobody else here.
    check_output_paths(config.log.out_dir, config.data)
    check_memory(cfg, batch.batch_size, batch.seq_len, amp, not config.speed.no_fused_loss,
                 device, processes=info.world_size if device.type == "cpu" else 1)
    # The lock lasts while `run_lock` is referenced: until this function returns.
    run_lock = None if explain or not info.is_main else lock_run_dir(config.log.out_dir)  # noqa: F841

    train_tokens, val_tokens, val_bytes = _load_data(config.data, info)
    splitter = (TokenSplitter.for_tokenizer(config.data.tokenizer, batch.split_tokens)
                if batch.split_tokens > 0 else None)
    batches = EpochBatches(train_tokens, batch.seq_len, batch.batch_size, batch.grad_accum,
                           info.world_size, info.rank, config.seed, splitter)
    spe = batches.steps_per_epoch
    length = config.budget
    max_steps = plan.steps if plan else length.max_steps or max(1, round(length.epochs * spe))
    stop_at = min(max_steps, cap) if cap else max_steps

    unseen = _unseen_tokens(config.speed.unseen_tokens, start, train_tokens, cfg.vocab_size,
                            device, splitter)
    runtime = Runtime(info, device, amp)
    parts = build_parts(cfg, tok, config.optim, config.speed, config.seed, runtime, unseen)
    state = _restore_or_init(config, start, parts, batches, unseen, info)
    trainer = Trainer(config, parts, TrainData(batches, val_tokens, val_bytes, config.label),
                      state, runtime, max_steps=max_steps, stop_at=stop_at)
    if config.eval.eval_tasks and info.is_main and not explain:
        trainer.tasks = _task_runner(config, tok, cfg.max_seq_len)
    planned_here = plan is None and bool(length.time_budget) and (info.is_main or not explain)
    if planned_here:  # measure a step, an evaluation and a snapshot here; plan the steps
        plan = make_plan(trainer, length.time_budget * 60, started, collective=not explain)
        max_steps = trainer.max_steps = plan.steps
        stop_at = trainer.stop_at = min(max_steps, cap) if cap else max_steps
        if config.optim.schedule.schedule == "wsd":  # plans again until its cool-down
            s = config.optim.schedule
            trainer.replanner = Replanner(plan, eval_interval=config.eval.eval_interval,
                                          save_interval=config.log.save_interval,
                                          warmup_steps=s.warmup_steps, cooldown=s.cooldown,
                                          started=started)
            trainer.cap = cap
    state.time_plan = plan.to_dict() if plan else None
    warmup = config.optim.schedule.warmup_steps
    if warmup >= max_steps and max_steps > 1:
        _say(info, f"note: --warmup_steps {warmup} >= {max_steps} steps; the learning "
                   "rate never reaches its peak")

    if explain:
        return _explain(config, trainer, start, plan, argv)

    if state.step >= stop_at:
        _say(info, f"nothing to do: the run is already at step {state.step:,} (of "
                   f"{max_steps:,}); raise --max_steps to train further")
        return 0

    trainer.metrics = _prepare_run_dir(config, start, info)
    begin = {"new": "new run", "init": f"new run from the weights of {start.source}",
             "resume": f"resuming from {start.path} at step {state.step}"}[start.kind]
    _say(info,
         f"{begin}"
         f" | model {parts.model.num_params(non_embedding=False) / 1e6:.1f}M parameters | "
         f"{trainer.label}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens | "
         f"{batches.tokens_per_step:,} tokens/step | {max_steps:,} steps "
         f"({max_steps / spe:.2f} epochs) | {DTYPE_NAMES[amp]} on {device}"
         f"{' x' + str(info.world_size) if info.enabled else ''} | snapshots in {snap_dir}")
    if splitter is not None:
        _say(info, f"training windows re-segmented: {splitter.describe()}")
    if unseen is not None:
        _say(info, unseen.describe())
    if plan is not None:
        _say(info, ("" if planned_here else "keeping the run's plan: ") + plan.describe())
    if cap and cap < max_steps:
        _say(info, f"LM_MAX_STEPS={cap}: stopping after step {stop_at:,}")
    try:
        code = trainer.run(resumed=start.resuming)
        if planned_here and code == 0 and trainer.stop_at == trainer.max_steps:
            plan = trainer.replanner.plan if trainer.replanner else plan
            _say(info, f"time budget: the whole run took {time.perf_counter() - started:.1f} s of "
                       f"{plan.budget_s:g} s (planned {plan.estimate_s:.1f} s)")
        return code
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()  # TensorBoard and W&B flush here


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    """Run the trainer; returns the exit status (0 done, 1 diverged, 2 bad input, 130/143
    stopped by SIGINT/SIGTERM after writing a snapshot).

    `started`: when the command started (a `time.perf_counter()` stamp; default: now), the
    start of a `--time_budget`.
    """
    started = time.perf_counter() if started is None else started
    try:
        return _run(argv, started)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except (UsageError, DataError, SnapshotError, CheckpointError, TokenizerLoadError,
            DeviceError, LoggerError) as exc:
        print(f"train_lm.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk or an I/O error outside the snapshot writes
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"train_lm.py: error: {exc.strerror or exc}{where}; snapshots are written "
              "atomically, so those already written are intact", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
