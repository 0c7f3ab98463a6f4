"""The training loop (`Trainer.run`), and what it does along the way: one optimizer step,
logging, validation with samples (`Trainer.evaluate`), snapshots (`Trainer.snapshot`) and stopping
on Ctrl-C / SIGTERM (`StopRequest`).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpus.batches import EpochBatches
from model.tokenizer import tokenizer_record
from training import distributed as D
from training.budget import Replanner, describe_replan
from training.build import Parts, Runtime
from training.byte_counts import byte_table
from training.config import RunConfig
from training.evaluation import EvalResult, evaluate_tokens, sample_text
from training.loggers import RunLog
from training.measure import measure_costs
from training.metrics import plot_losses
from training.mfu import datasheet_peak, flops_per_token
from training.optim import set_lr
from training.options import DTYPE_NAMES
from training.run_state import RunState, snapshot_payload
from training.snapshots import capture_rng_state, save_snapshot, snapshot_name
from training.step import train_step

# the downstream metrics the progress line shows (every one goes to the loggers)
SHOWN_METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity")


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, snapshot, exit. A second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop right now (atomic writes stay safe)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then writing a "
              "snapshot (send it again to abort without one)", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainData:
    """What a run trains and validates on.

    Attributes:
        batches: the training batches. val_tokens: the validation split's tokens;
        val_bytes: the UTF-8 size of their text (bits per byte; None: unknown, no bits per
        byte). label: the data's short name.
    """

    batches: EpochBatches
    val_tokens: np.ndarray
    val_bytes: int | None
    label: str


class Trainer:
    """Runs the steps of one run from `state` to `stop_at`, evaluating and saving on the way.

    Args:
        config: the run's configuration.
        parts: model (with its tokenizer, for samples), optimizer, scaler (`training.build`).
        data: the training batches and the validation split.
        state: where the run stands (restored on resume).
        runtime: the process group, and where and in which precision it trains.
        max_steps: steps of the whole run (the schedule); stop_at: where this invocation stops.

    `metrics`, the run's log (`--log_to`; rank 0 only, else None), is set before `run`, and
    `tasks` (`--eval_tasks`, rank 0 only) before the first evaluation.
    """

    def __init__(self, config: RunConfig, parts: Parts, data: TrainData, state: RunState,
                 runtime: Runtime, *, max_steps: int, stop_at: int) -> None:
        self.config, self.parts, self.state, self.runtime = config, parts, state, runtime
        self.batches, self.val_tokens = data.batches, data.val_tokens
        self.val_bytes, self.label = data.val_bytes, data.label
        self.info, self.device, self.amp = runtime.info, runtime.device, runtime.amp
        self.max_steps, self.stop_at = max_steps, stop_at
        self.metrics: RunLog | None = None
        self.tasks: Any = None  # rank 0 with --eval_tasks: a `downstream.tasks.TaskRunner`
        self.snap_dir = config.log.snap_dir
        self.params = list(parts.model.parameters())
        self.lr = config.optim.lr
        self.write = lambda s: None  # the progress bar's print, once the loop runs
        self._log_tokens, self._log_time = 0, 0.0  # since the last logged training loss
        self._stats: dict[str, Any] = {}  # the last step's gradient norm (training.step)
        self.replanner: Replanner | None = None  # a budgeted WSD run's re-plans (`_replan`)
        self.cap: int | None = None  # LM_MAX_STEPS, which a re-plan keeps
        self._tokenizer: dict[str, Any] | None = None  # the snapshots' tokenizer keys
        # the bytes each token id spells, for exact bits per byte (rank 0 evaluates); made here,
        # not in the first evaluation, which `--time_budget` times
        self._byte_table = (byte_table(parts.model.tokenizer, data.val_tokens, data.val_bytes,
                                       parts.model.config.vocab_size)
                            if runtime.info.is_main else None)
        peak = datasheet_peak(runtime.device)  # MFU where the peak is known (GPUs)
        self._flops_per_s_peak = peak * 1e12 if peak else None

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, epoch: int, batch_idx: int, runner: torch.nn.Module | None = None
                   ) -> torch.Tensor:
        """One optimizer step on batch `batch_idx` of `epoch`; returns the (device) loss."""
        device, parts, grad_accum = self.device, self.parts, self.config.batch.grad_accum
        runner = runner or parts.runner

        def micro_batches():
            for micro in range(grad_accum):
                x, y = self.batches.get(epoch, batch_idx, micro)
                if device.type == "cuda":
                    yield (x.pin_memory().to(device, non_blocking=True),
                           y.pin_memory().to(device, non_blocking=True))
                else:
                    yield x.to(device), y.to(device)

        return train_step(runner, parts.optimizer, parts.scaler, micro_batches(), grad_accum,
                          parts.autocast, self.params, self.config.optim.grad_clip,
                          parts.ddp if runner is parts.ddp else None, stats=self._stats)

    # -- evaluation and sampling ---------------------------------------------------------------

    def validation_loss(self, max_windows: int | None) -> EvalResult:
        """The validation split's loss (and bits per byte) over `max_windows` windows (None:
        all)."""
        return evaluate_tokens(self.parts.model, self.val_tokens,
                               seq_len=self.config.batch.seq_len,
                               batch_size=self.config.eval.eval_batch_size, max_windows=max_windows,
                               dtype=None if self.amp == torch.float32 else DTYPE_NAMES[self.amp],
                               num_bytes=self.val_bytes, token_bytes=self._byte_table,
                               unseen=self.parts.module.unseen)

    def evaluate(self, step: int, baseline: bool = False) -> bool:
        """Validate (rank 0), log, plot, sample; returns whether this is the best loss so far.

        `baseline`: the loss of the starting weights (`--init_from`, step 0), logged but never
        "best" (no snapshot holds it).
        """
        evals, state, model = self.config.eval, self.state, self.parts.model
        with self.parts.averaged():  # under --ema, the averaged weights are what is judged
            res = self.validation_loss(evals.windows or None)
            sample = (sample_text(model, evals.sample_prompt, evals.sample_tokens,
                                  self.config.seed) if evals.sample_tokens else "")
            tasks = self.downstream_metrics()
        if not math.isfinite(res.loss):
            raise DivergedError(f"the validation loss is {res.loss} at step {step}")
        state.last_val, state.last_bpb = (res.loss, res.perplexity, step), res.bits_per_byte
        is_best = not baseline and (state.best_val is None or res.loss < state.best_val)
        if is_best:
            state.best_val, state.best_bpb = res.loss, res.bits_per_byte
        spe = self.batches.steps_per_epoch
        self.metrics.log(step, "val", step / spe, state.tokens_seen, self.lr, res.loss, None,
                         state.train_time, tasks=tasks, bits_per_byte=res.bits_per_byte)
        bpb = (f" | {res.bits_per_byte:.3f} bits/byte" if res.bits_per_byte is not None
               else "")
        scores = "".join(f" | {name} {value:.4g}" for name, value in (tasks or {}).items()
                         if name.split("/")[-1] in SHOWN_METRICS)
        self.write(f"step {step:,} | val loss {res.loss:.4f} | ppl {res.perplexity:.1f}{bpb}"
                   f"{scores}{' | best' if is_best else ''}")
        if not self.config.log.no_plot and self.metrics.path is not None:
            plot_losses(self.metrics.path, Path(self.config.log.out_dir) / "loss_curve.png",
                        f"{self.label}: {model.config.num_layers} layers x {model.config.d_model}")
        if evals.sample_tokens:
            self.write("  sample: " + sample.replace("\n", "\n  | "))
        return is_best

    def downstream_metrics(self) -> dict[str, float] | None:
        """`--eval_tasks`' metrics of the model as it is (None without tasks); kept in the
        run's state, so the next snapshot (and best.pt) records them."""
        if self.tasks is None:
            return None
        model = self.parts.model
        metrics, _ = self.tasks.run(model, model.tokenizer,
                                    batch_size=self.config.eval.eval_batch_size,
                                    dtype=None if self.amp == torch.float32 else self.amp)
        self.state.tasks = metrics
        return metrics

    def measure(self) -> tuple[float, float]:
        """For `--explain`: seconds of one training step, and of one evaluation (extrapolated).

        Runs without DDP (the other ranks are not stepping; communication is not timed); the
        run is left as it was (`training.budget.measure_costs`).
        """
        costs = measure_costs(self, timed_steps=3, max_seconds=5.0, runner=self.parts.module,
                              snapshot=False)
        return costs.step_s, costs.eval_s

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, epoch_of_step: int, is_best: bool) -> Path | None:
        """Write a snapshot of the run as it stands (rank 0; every rank's RNG is gathered)."""
        rng = D.gather_objects(self.info, capture_rng_state())
        if not self.info.is_main:
            return None
        state, parts = self.state, self.parts
        name = snapshot_name(epoch_of_step, state.step)
        if is_best:
            state.best_name = name
        payload = snapshot_payload(state=state, epoch_of_step=epoch_of_step,
                                   cfg=parts.model.config, model=parts.model,
                                   optimizer=parts.optimizer, scaler=parts.scaler,
                                   flags=self.config.to_dict(), batches=self.batches,
                                   rng=rng, dataset=self.label, average=parts.average,
                                   tokenizer=self._tokenizer_record())
        return save_snapshot(self.snap_dir, payload, name=name, is_best=is_best,
                             keep_last=self.config.log.keep_last,
                             protect=[state.best_name] if state.best_name else [])

    def _tokenizer_record(self) -> dict[str, Any]:
        """The snapshot's tokenizer keys, made once from the run's loaded tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_record(self.config.data.tokenizer,
                                               self.parts.model.tokenizer)
        return self._tokenizer

    # -- the loop ------------------------------------------------------------------------------

    def run(self, resumed: bool) -> int:
        """Train to `stop_at`; returns the exit status (0 done, 1 diverged, 128+N on signal N)."""
        stop = StopRequest()
        stop.install()
        bar = self._progress_bar()
        last_saved = None
        try:
            if self.state.init_from and self.state.step == 0:
                self._evaluate_everywhere(0, baseline=True)  # where a fine-tune starts
            while self.state.step < self.stop_at:
                save_now, stop_now, epoch_of_step, is_best = self._one_step(stop, bar)
                if save_now:
                    self.snapshot(epoch_of_step, is_best)
                    last_saved = self.state.step
                if stop_now:
                    break
        except DivergedError as exc:
            bar.close()
            kept = (f"the last good snapshot is {self.snap_dir / 'latest.pt'}"
                    if last_saved or resumed else "no snapshot was written")
            print(f"error: {exc}; stopped without saving ({kept}). Try a lower --lr (it is "
                  f"{self.config.optim.lr:g}), more --warmup_steps, or --dtype float32.",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            where = f"; the last snapshot is step {last_saved}" if last_saved else ""
            print(f"aborted at step {self.state.step}{where}", file=sys.stderr)
            return 128 + (stop.signum or signal.SIGINT)
        finally:
            stop.restore()
        bar.close()
        return self._report(stop)

    def _progress_bar(self):
        """A tqdm bar on rank 0 (its `write` prints above it); a silent stand-in elsewhere."""
        if not self.info.is_main:
            return _NoBar()
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()  # in log files, a line every 30 s rather than every update
        bar = tqdm(total=self.stop_at, initial=self.state.step, unit="step", desc="training",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if tty else 30.0)
        self.write = bar.write
        return bar

    def _evaluate_everywhere(self, step: int, baseline: bool = False) -> bool:
        """Evaluate on rank 0 and tell every rank whether it was the best loss so far."""
        is_best = self.evaluate(step, baseline) if self.info.is_main else False
        return D.broadcast_object(self.info, is_best)

    def _one_step(self, stop: StopRequest, bar) -> tuple[bool, bool, int, bool]:
        """Step, log, maybe evaluate; returns (save now, stop now, epoch of the step, is best)."""
        state, info = self.state, self.info
        self.lr = set_lr(self.parts.optimizer, state.step, self.config.optim.schedule,
                         self.max_steps)
        t0 = time.perf_counter()
        step_loss = self.train_step(state.epoch, state.batch)
        if self.parts.average is not None:
            self.parts.average.update(self.parts.model)
        epoch_of_step = state.advance(self.batches)
        step = state.step
        if info.enabled:  # mean loss over ranks, and whether any rank was asked to stop
            flags = torch.stack([step_loss, torch.tensor(float(stop.signum or 0),
                                                         device=self.device)])
            D.all_reduce_sum(info, flags)
            step_loss, stop_now = flags[0] / info.world_size, bool(flags[1].item() > 0)
        else:
            stop_now = stop.signum is not None
        final = step >= self.stop_at
        log = self.config.log
        eval_now = final or step % self.config.eval.eval_interval == 0
        save_now = final or stop_now or step % log.save_interval == 0
        log_now = final or step % log.log_interval == 0
        if log_now or eval_now or save_now or info.enabled or self.device.type == "cpu":
            value = float(step_loss.item())  # a host sync: on GPUs only when needed
            if not math.isfinite(value):
                raise DivergedError(f"the training loss is {value} at step {step}")
            state.last_train = value
        elapsed = time.perf_counter() - t0
        state.train_time += elapsed
        self._log_speed(elapsed, log_now, bar)
        if self.replanner is not None:
            self.replanner.record(elapsed)
            if self.replanner.due(step):
                self._replan(step, bar)
        is_best = False
        if eval_now and not stop_now:
            is_best = self._evaluate_everywhere(step)
            save_now = save_now or is_best
        return save_now, stop_now, epoch_of_step, is_best

    def _replan(self, step: int, bar) -> None:
        """Plan the steps again from this run's own steps (`training.budget.Replanner`; rank 0
        plans, every rank takes it)."""
        plan = None
        if self.info.is_main:
            plan = self.replanner.replan(step)
        if self.info.enabled:
            plan = D.broadcast_object(self.info, plan)
        final = self.replanner.adopt(plan, step)
        self.max_steps = plan.steps
        self.stop_at = min(plan.steps, self.cap) if self.cap else plan.steps
        self.state.time_plan = plan.to_dict()
        bar.total = self.stop_at
        if final:
            self.write(describe_replan(plan))

    def _log_speed(self, elapsed: float, log_now: bool, bar) -> None:
        """Accumulate tokens/s since the last log line; log the training loss when due."""
        state = self.state
        self._log_time += elapsed
        self._log_tokens += self.batches.tokens_per_step
        if log_now and self.info.is_main:
            speed = self._log_tokens / max(self._log_time, 1e-9)
            norm = self._stats.get("grad_norm")
            mfu = (speed * flops_per_token(self.parts.model) / self._flops_per_s_peak
                   if self._flops_per_s_peak else None)
            self.metrics.log(state.step, "train", state.step / self.batches.steps_per_epoch,
                             state.tokens_seen, self.lr, state.last_train, speed, state.train_time,
                             grad_norm=None if norm is None else float(norm), mfu=mfu)
            ppl = math.exp(min(state.last_train, 700))
            bar.set_postfix_str(f"loss {state.last_train:.3f} ppl {ppl:.1f} {speed:,.0f} tok/s",
                                refresh=False)
            self._log_tokens, self._log_time = 0, 0.0
        bar.update(1)

    def _report(self, stop: StopRequest) -> int:
        """The closing lines: how it ended, and how to continue or generate."""
        state, latest = self.state, self.snap_dir / "latest.pt"
        say = print if self.info.is_main else (lambda *a, **k: None)
        if stop.signum is not None:
            say(f"stopped at step {state.step:,} by {signal.Signals(stop.signum).name}; snapshot "
                f"written. Continue with --resume auto. ({latest})", flush=True)
            return 128 + stop.signum
        val = (f"val loss {state.last_val[0]:.4f} (ppl {state.last_val[1]:.1f}"
               f"{_bpb(state.last_bpb)})" if state.last_val else "no validation")
        best = (f"; best val loss {state.best_val:.4f}{_bpb(state.best_bpb)} "
                f"({self.snap_dir / 'best.pt'})" if state.best_val else "")
        say(f"done: step {state.step:,}, {val}{best}; {state.train_time / 60:.1f} min of "
            "training.", flush=True)
        say(f"generate: python generate_lm.py --checkpoint {latest} --prompt "
            f"{'ROMEO:' if self.label == 'shakespeare' else 'The'} --max_length 100", flush=True)
        return 0


def _bpb(value: float | None) -> str:
    """`, 2.110 bits/byte` for the closing line (nothing when unknown)."""
    return "" if value is None else f", {value:.3f} bits/byte"


class _NoBar:
    """The progress bar of ranks other than 0: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
