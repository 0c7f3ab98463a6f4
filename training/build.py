"""Building what trains: the model (maybe DDP-wrapped), its optimizer and loss scaler.

`build_parts` is the one place the trainer builds them; `Parts.load_snapshot` puts a resumed
run's state back into them and `Parts.load_weights` the `--init_from` weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.lm import LanguageModel, LMConfig
from training import distributed as D
from training.config import SpeedArgs
from training.fused_loss import TrainingModule
from training.optim import MuonAdamW, OptimArgs, WeightAverage, build_optimizer
from training.snapshots import SnapshotError
from training.step import AutocastFactory, autocast_context
from training.unseen_tokens import UnseenTokens


@dataclass(frozen=True)
class Runtime:
    """Where and how a run trains.

    Attributes:
        info: the process group (`training.distributed`).
        device: this process's device.
        amp: the autocast dtype (float32: none).
    """

    info: D.DistInfo
    device: torch.device
    amp: torch.dtype


@dataclass
class Parts:
    """The model and everything that updates it.

    Attributes:
        model: the plain `LanguageModel` (evaluation, sampling, snapshots use it).
        module: the `TrainingModule` around it (fused LM head + loss, maybe compiled).
        ddp: the DistributedDataParallel wrapper of `module`, or None in one process.
        optimizer, scaler: the optimizer and its GradScaler (enabled for float16 only).
        autocast: factory of the forward passes' autocast context.
        average: the weight average of `--ema`, or None.
    """

    model: LanguageModel
    module: TrainingModule
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer | MuonAdamW
    scaler: torch.amp.GradScaler
    autocast: AutocastFactory
    average: WeightAverage | None = None

    @property
    def runner(self) -> torch.nn.Module:
        """What a training step calls: the DDP wrapper, else the training module."""
        return self.ddp or self.module

    def averaged(self) -> contextlib.AbstractContextManager:
        """`with parts.averaged():` the model holds the averaged weights (`--ema`), if any."""
        if self.average is None:
            return contextlib.nullcontext(self.model)
        return self.average.applied(self.model)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start from these weights (`--init_from`); the optimizer stays fresh."""
        self.model.load_state_dict(state_dict)
        if self.average is not None:  # the average starts from them too
            self.average = WeightAverage(self.model, self.average.decay)

    def load_snapshot(self, ckpt: dict[str, Any], path: Path | None) -> None:
        """Restore weights, optimizer and scaler from a snapshot being resumed.

        Raises:
            SnapshotError: the snapshot does not fit this model/optimizer (one line).
        """
        try:
            # Under --ema the snapshot's model_state_dict is the average; the training weights
            # are kept beside it.
            self.model.load_state_dict(ckpt.get("raw_model_state_dict")
                                       or ckpt["model_state_dict"])
            self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
            if self.average is not None:
                if ckpt.get("ema_state") is None:
                    raise ValueError("it holds no weight average: it was trained without --ema")
                self.average.load_state_dict(ckpt["ema_state"])
            if self.scaler.is_enabled() and ckpt.get("scaler_state_dict"):
                self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise SnapshotError(f"{path} does not fit this model/optimizer ({first})") from None


def build_parts(cfg: LMConfig, tokenizer: Any, optim: OptimArgs, speed: SpeedArgs, seed: int,
                runtime: Runtime, unseen: UnseenTokens | None = None) -> Parts:
    """Build the model (seeded with `seed`), its training wrappers, optimizer and scaler.

    Args:
        cfg: the model's config. tokenizer: the run's tokenizer (`model.tokenizer`).
        optim: the optimizer's flags. speed: `--compile`, `--no_fused_loss`.
        seed: `--seed`. runtime: where and in which precision it trains.
        unseen: (`--unseen_tokens shared`) the new model's unseen-token rows start equal (a
            resumed run's snapshot then replaces them), and the loss shares their column.
    """
    info, device, amp = runtime.info, runtime.device, runtime.amp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    model = LanguageModel(**cfg.to_dict()).to(device)
    model.tokenizer = tokenizer
    if unseen is not None:
        unseen.equalize(model.lm_head.weight)  # before the weight average copies the weights
    module = TrainingModule(model, fused_head=not speed.no_fused_loss,
                            compile_trunk=speed.compile, unseen=unseen)
    ddp = None
    if info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, optim, device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    average = WeightAverage(model, optim.ema) if optim.ema > 0 else None
    return Parts(model, module, ddp, optimizer, scaler, autocast_context(device.type, amp),
                 average)
