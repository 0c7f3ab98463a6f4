"""The run's configuration: typed, frozen, resolved in one place (`resolve_config`).

The layers, each replacing the one before for the flags it sets:

1. the parser's defaults, then the `--preset`'s (`training.options.parse_args`);
2. a snapshot being resumed (its flags, except those given on the command line) or a source
   being fine-tuned from (the model's shape and tokenizer; `training.start`);
3. the flags given on the command line;
4. derived defaults (`--seq_len`, `--min_lr`, `--save_interval`, `--eval_batch_size`,
   `--out_dir`) and what the data says (`--data`'s tokenizer, `--train_tokenizer`'s trained one,
   a resumed run's global batch and time plan).

The result is a `RunConfig` of small frozen slices; each part of the trainer receives the slice
it uses. `RunConfig.to_dict()` is the flat dict of flags a snapshot stores under "args" (the
format the trainer always wrote), and the resolver reads such a dict back on resume.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.datasets import DataArgs, adopt_data_tokenizer, dataset_label
from corpus.split_tokenizer import with_split_tokenizer
from corpus.token_splitting import has_merges
from training.budget import TimePlan, resolve_plan
from training.errors import UsageError
from training.optim import OptimArgs, ScheduleArgs
from training.options import windows_per_eval
from training.start import RunStart, choose_start, keep_global_batch

__all__ = ["BatchArgs", "BudgetArgs", "DataArgs", "EvalArgs", "LogArgs", "ModelArgs", "OptimArgs",
           "Resolved", "RunConfig", "ScheduleArgs", "SpeedArgs", "StartArgs", "requested_device",
           "resolve_config"]

Say = Callable[[str], None]
_DERIVED = {"flag": False}  # metadata of a resolved field that is no flag (not saved)
# metadata of a flag saved only when it differs from its default (flags added after snapshots of
# the old format existed: a run that does not use them saves the flags it always saved)
_SAVED_IF_SET = {"saved_if_set": True}


@dataclass(frozen=True)
class ModelArgs:
    """The model's shape (`LMConfig`'s fields; `vocab_size` None: the tokenizer's size) and its
    blocks (`arch`, `num_kv_heads`; None: those of the model resumed or started from, else
    GPT-2's)."""

    vocab_size: int | None
    d_model: int
    num_heads: int
    num_layers: int
    d_ff: int
    max_seq_len: int
    dropout: float
    arch: str | None = None  # a block set of `model.config.ARCHITECTURES`; None: the source's
    num_kv_heads: int | None = None  # None: the block set's (every head has its own)

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise UsageError(f"--d_model {self.d_model} must be divisible by --num_heads "
                             f"{self.num_heads}")
        if self.dropout >= 1:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class BatchArgs:
    """What one optimizer step trains on: `batch_size` sequences of `seq_len` tokens per
    micro-batch, `grad_accum` micro-batches per step and process, re-segmented with probability
    `split_tokens` (`corpus.token_splitting`)."""

    seq_len: int
    batch_size: int
    grad_accum: int
    split_tokens: float = field(default=0.0, metadata=_SAVED_IF_SET)  # corpus.token_splitting

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UsageError("--seq_len must be at least 2")
        if not 0.0 <= self.split_tokens < 1.0:
            raise UsageError(f"--split_tokens must be in [0, 1), got {self.split_tokens}")


@dataclass(frozen=True)
class BudgetArgs:
    """What sets the run's length: `max_steps`, else `epochs`, or a `time_budget` (minutes)."""

    max_steps: int | None
    epochs: float
    time_budget: float | None

    def __post_init__(self) -> None:
        if self.epochs <= 0 and self.max_steps is None and not self.time_budget:
            raise UsageError("--epochs must be positive (or give --max_steps)")


@dataclass(frozen=True)
class EvalArgs:
    """Evaluations and their samples.

    Attributes:
        eval_tasks: lm-evaluation-harness tasks run at each evaluation ("a,b"; None: none).
        eval_tasks_limit: examples per task and evaluation.
        eval_tasks_path: a task folder in the harness's format (offline tasks).
        windows: validation windows per evaluation, `eval_windows` capped by
            `LM_MAX_EVAL_WINDOWS` (0: all; resolved, not a flag).
    """

    eval_interval: int
    eval_windows: int
    eval_batch_size: int
    sample_tokens: int
    sample_prompt: str
    eval_tasks: str | None = field(default=None, metadata=_SAVED_IF_SET)
    eval_tasks_limit: int = field(default=200, metadata=_SAVED_IF_SET)
    eval_tasks_path: str | None = field(default=None, metadata=_SAVED_IF_SET)
    windows: int = field(default=0, metadata=_DERIVED)

    def __post_init__(self) -> None:
        if self.eval_windows < 0:
            raise UsageError("--eval_windows must be >= 0 (0 evaluates every window)")
        if self.sample_tokens < 0:
            raise UsageError("--sample_tokens must be >= 0")
        if self.eval_tasks_limit < 1:
            raise UsageError(f"--eval_tasks_limit must be >= 1, got {self.eval_tasks_limit}")
        if self.eval_tasks_path is not None and not self.eval_tasks:
            raise UsageError("--eval_tasks_path is a folder of tasks for --eval_tasks; add "
                             "--eval_tasks NAMES")
        if self.eval_tasks is not None and not self.eval_tasks.strip(" ,"):
            raise UsageError("--eval_tasks needs task names, e.g. --eval_tasks hellaswag")


@dataclass(frozen=True)
class LogArgs:
    """What the run writes into its run directory `out_dir`: logs, plot, snapshots."""

    out_dir: str
    log_interval: int
    log_to: str
    no_plot: bool
    save_interval: int
    keep_last: int

    @property
    def snap_dir(self) -> Path:
        """`<out_dir>/snapshots`."""
        return Path(self.out_dir) / "snapshots"


@dataclass(frozen=True)
class SpeedArgs:
    """Where and how fast: device, precision, compilation, the loss's form."""

    device: str
    dtype: str
    compile: bool
    no_fused_loss: bool
    unseen_tokens: str


@dataclass(frozen=True)
class StartArgs:
    """How the command starts: the preset named, `--explain`, `--resume`, `--init_from`."""

    preset: str | None
    explain: bool
    resume: str | None
    init_from: str | None


@dataclass(frozen=True)
class RunConfig:
    """The whole run's configuration, in slices (see the module)."""

    model: ModelArgs
    data: DataArgs
    batch: BatchArgs
    optim: OptimArgs
    budget: BudgetArgs
    eval: EvalArgs
    log: LogArgs
    speed: SpeedArgs
    start: StartArgs
    seed: int

    def __post_init__(self) -> None:
        if self.batch.seq_len > self.model.max_seq_len:
            raise UsageError(f"--seq_len {self.batch.seq_len} exceeds --max_seq_len "
                             f"{self.model.max_seq_len}")

    @property
    def label(self) -> str:
        """The data's short name (`corpus.datasets.dataset_label`)."""
        return dataset_label(self.data)

    def to_dict(self) -> dict[str, Any]:
        """Every flag as a plain value, under its flag's name (a snapshot's "args")."""
        out: dict[str, Any] = {}
        for part in (self.start, self.data, self.model, self.batch, self.budget, self.optim,
                     self.optim.schedule, self.speed, self.eval, self.log):
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if f.metadata.get("saved_if_set") and value == f.default:
                    continue
                if f.metadata.get("flag", True) and not dataclasses.is_dataclass(value):
                    out[f.name] = value
        out["seed"] = self.seed
        out["out_dir"] = self.log.out_dir  # the data's out_dir is the same
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, flags: Mapping[str, Any]) -> RunConfig:
        """The configuration of complete, resolved flags (`to_dict`'s form); validates them."""
        return _build(dict(flags))


def _take(cls: type, flags: Mapping[str, Any], **extra: Any) -> Any:
    """`cls` from the flags named as its fields."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)
              and f.name not in extra]
    return cls(**{f.name: flags[f.name] if f.name in flags or not f.metadata.get("saved_if_set")
                  else f.default for f in fields}, **extra)


def _build(flags: dict[str, Any]) -> RunConfig:
    """The slices, built (and so checked) in the order the flags were always checked."""
    if flags["seq_len"] > flags["max_seq_len"]:
        raise UsageError(f"--seq_len {flags['seq_len']} exceeds --max_seq_len "
                         f"{flags['max_seq_len']}")
    batch = _take(BatchArgs, flags)
    model = _take(ModelArgs, flags)
    optim = _take(OptimArgs, flags, schedule=_take(ScheduleArgs, flags))
    budget = _take(BudgetArgs, flags)
    evals = _take(EvalArgs, flags)
    return RunConfig(model=model, data=DataArgs.from_dict(flags), batch=batch, optim=optim,
                     budget=budget, eval=evals, log=_take(LogArgs, flags),
                     speed=_take(SpeedArgs, flags), start=_take(StartArgs, flags),
                     seed=flags["seed"])


def _derive(flags: dict[str, Any]) -> dict[str, Any]:
    """The derived defaults filled in (a new dict)."""
    flags = dict(flags)
    if flags["seq_len"] is None:
        flags["seq_len"] = flags["max_seq_len"]
    if flags["min_lr"] is None:
        flags["min_lr"] = flags["lr"] / 10
    if flags["save_interval"] is None:
        flags["save_interval"] = flags["eval_interval"]
    if flags["eval_batch_size"] is None:
        flags["eval_batch_size"] = flags["batch_size"]
    if flags["out_dir"] is None:
        flags["out_dir"] = f"lm_{dataset_label(DataArgs.from_dict(flags))}"
    return flags


def requested_device(args: argparse.Namespace) -> str:
    """`--device` as given (a snapshot never sets it): the process group is set up on it before
    the configuration is resolved."""
    return args.device


@dataclass(frozen=True)
class Resolved:
    """What `resolve_config` found.

    Attributes:
        config: the run's configuration.
        start: where the run starts (the snapshot or source read, if any).
        plan: the time plan a resumed budgeted run keeps (None: none, or one to be made).
    """

    config: RunConfig
    start: RunStart
    plan: TimePlan | None


def resolve_config(args: argparse.Namespace, explicit: set[str], *, world_size: int,
                   say: Say) -> Resolved:
    """The run's configuration from the parsed flags (defaults and preset applied) and the
    names of those given on the command line (see the module for the layers).

    Args:
        args: `training.options.parse_args`'s namespace (left as it is).
        explicit: the flags given on the command line.
        world_size: the number of processes (a resume may keep its global batch with another).
        say: prints a note (rank 0).

    Raises:
        UsageError, DataError, SnapshotError, CheckpointError: one line each.
    """
    flags = dict(vars(args))
    start, flags = choose_start(flags, explicit, say)  # a snapshot's flags, or a source's shape
    saved_plan = start.ckpt.get("time_plan") if start.resuming else None
    plan, flags["time_budget"] = resolve_plan(flags["time_budget"], explicit, saved_plan,
                                              start.resuming)  # a resumed run keeps its plan
    config = _build(_derive(flags))
    # --data: its tokenizer, unless --tokenizer or --init_from's model names one (then they
    # must be the same)
    named = "tokenizer" in explicit or start.kind == "init"
    data = adopt_data_tokenizer(config.data, named)
    # --train_tokenizer (a preset's or given): a BPE trained on the training split, cached
    data = with_split_tokenizer(data, named, "train_tokenizer" in explicit, say)
    grad_accum = keep_global_batch(config.batch.batch_size, config.batch.grad_accum, explicit,
                                   start, world_size, say)
    windows = windows_per_eval(config.eval.eval_windows)  # after a resume set the flag
    split = config.batch.split_tokens
    if split > 0 and "split_tokens" not in explicit and not has_merges(data.tokenizer):
        say(f"--split_tokens off: re-segmenting the training windows needs a BPE tokenizer "
            f"with merges, and {data.tokenizer} has none")
        split = 0.0
    config = dataclasses.replace(
        config, data=data, eval=dataclasses.replace(config.eval, windows=windows),
        batch=dataclasses.replace(config.batch, grad_accum=grad_accum, split_tokens=split))
    return Resolved(config, start, plan)
