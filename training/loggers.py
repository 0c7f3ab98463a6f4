"""Where a run's scalars go (`--log_to`): `metrics.csv`, TensorBoard, Weights & Biases.

Each backend gets the same scalars: for training steps `train/loss`, `train/lr`,
`train/tokens_per_s`, `train/grad_norm` (before clipping) and `train/mfu` (on GPUs whose peak
is known), for evaluations `val/loss`, `val/ppl` and `val/bits_per_byte` (where the validation
text's byte count is known), and with `--eval_tasks` each downstream
metric as `tasks/<task>/<metric>` (e.g. `tasks/hellaswag/acc_norm`). Only rank 0 logs.

- csv (the default): `<run dir>/metrics.csv` (`training/metrics.py`), which the loss plot and
  `--resume` read;
- tensorboard: event files under `<run dir>/tensorboard/` (`tensorboard --logdir <run dir>`);
  a resumed run drops the events past its snapshot's step (`purge_step`);
- wandb: a Weights & Biases run under `<run dir>/wandb/`, with the run's flags as its config;
  offline (synced later with `wandb sync`) when `WANDB_MODE` says so or no API key is set up,
  so a machine without network never waits on it. A resumed run continues the same W&B run.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from training.metrics import MetricsLog

LOG_TO = ("csv", "tensorboard", "wandb")


class LoggerError(ValueError):
    """A backend asked for by `--log_to` is unavailable (one line)."""


def _scalars(kind: str, lr: float, loss: float, tokens_per_s, grad_norm, mfu,
             bits_per_byte=None) -> dict[str, float]:
    if kind == "val":
        out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 700))}
        if bits_per_byte is not None:
            out["val/bits_per_byte"] = float(bits_per_byte)
        return out
    out = {"train/loss": loss, "train/lr": lr}
    for key, value in (("train/tokens_per_s", tokens_per_s), ("train/grad_norm", grad_norm),
                       ("train/mfu", mfu)):
        if value is not None:
            out[key] = float(value)
    return out


class _TensorBoard:
    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LoggerError("--log_to tensorboard needs the tensorboard package: pip install "
                              "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """online when an API key is set up (and WANDB_MODE does not say otherwise), else offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class _WandB:
    def __init__(self, out_dir: Path, config: dict[str, Any], name: str) -> None:
        try:
            import wandb
        except ImportError:
            raise LoggerError("--log_to wandb needs the wandb package: pip install wandb") \
                from None
        id_file = out_dir / "wandb_run_id"  # the same W&B run across --resume
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "small-lm"), name=name,
                              id=run_id, resume="allow", dir=str(out_dir), config=config,
                              mode=wandb_mode())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """The scalars of one run, sent to every backend of `--log_to` (made on rank 0 only).

    Args:
        out_dir: the run directory.
        log_to: backends, a subset of `LOG_TO`.
        flags: the run's flags as plain values (`RunConfig.to_dict()`; W&B's config).
        resume_step: the step a resumed run continues from (None for a new run).
    """

    def __init__(self, out_dir: str | Path, log_to: list[str], flags: dict[str, Any] | None,
                 resume_step: int | None = None) -> None:
        out_dir = Path(out_dir)
        self.csv = MetricsLog(out_dir / "metrics.csv") if "csv" in log_to else None
        if self.csv is not None and resume_step is not None:
            self.csv.truncate_after(resume_step)
        self.backends: list[Any] = []
        if "tensorboard" in log_to:
            self.backends.append(_TensorBoard(out_dir, resume_step))
        if "wandb" in log_to:
            self.backends.append(_WandB(out_dir, dict(flags or {}), out_dir.resolve().name))

    @property
    def path(self) -> Path | None:
        """metrics.csv (which the loss plot reads), or None without csv."""
        return self.csv.path if self.csv is not None else None

    def log(self, step: int, kind: str, epoch: float, tokens: int, lr: float, loss: float,
            tokens_per_s: float | None = None, elapsed_s: float | None = None,
            grad_norm: float | None = None, mfu: float | None = None,
            tasks: dict[str, float] | None = None, bits_per_byte: float | None = None) -> None:
        """One row: a training step (kind "train") or an evaluation ("val"); `tasks`: an
        evaluation's downstream metrics (`task/metric` -> value); `bits_per_byte`: an
        evaluation's (None: unknown)."""
        if self.csv is not None:
            self.csv.log(step, kind, epoch, tokens, lr, loss, tokens_per_s, elapsed_s,
                         grad_norm, mfu, extra=tasks, bits_per_byte=bits_per_byte)
        scalars = _scalars(kind, lr, loss, tokens_per_s, grad_norm, mfu, bits_per_byte)
        scalars.update({f"tasks/{name}": value for name, value in (tasks or {}).items()})
        for backend in self.backends:
            backend.log(step, scalars)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
