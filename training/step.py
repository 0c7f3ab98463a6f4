"""One optimizer step of training, shared by the trainer, `--explain` and `bench/training.py`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

AutocastFactory = Callable[[], contextlib.AbstractContextManager]
Batch = tuple[torch.Tensor, torch.Tensor]


def autocast_context(device_type: str, dtype: torch.dtype) -> AutocastFactory:
    """A factory of autocast contexts for `dtype` (float32: no autocast)."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


def train_step(runner: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, micro_batches: Iterable[Batch], num_micro: int,
               autocast: AutocastFactory,
               params: list[torch.nn.Parameter], grad_clip: float = 1.0,
               ddp: torch.nn.parallel.DistributedDataParallel | None = None,
               stats: dict | None = None) -> torch.Tensor:
    """Forward, backward (accumulated over `num_micro` micro-batches), clip, step, zero grads.

    Args:
        runner: maps (inputs, targets) to a mean loss (a `TrainingModule`, maybe DDP-wrapped).
        optimizer, scaler: the optimizer and its GradScaler (disabled unless float16).
        micro_batches: `num_micro` (inputs, targets) pairs, already on the device.
        num_micro: how many micro-batches (the loss of each is divided by it).
        autocast: factory of the autocast context for the forward passes.
        params: the parameters whose gradient norm is clipped.
        grad_clip: max global gradient norm (0: no clipping).
        ddp: the DDP wrapper, if any: gradients are all-reduced on the last micro-batch only.
        stats: if given, receives "grad_norm": the global gradient norm before clipping (a
            device tensor).

    Returns:
        The mean loss over the micro-batches (a device tensor; reading it syncs).
    """
    loss_sum = None
    for micro, (x, y) in enumerate(micro_batches):
        last = micro == num_micro - 1
        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = runner(x, y)
            scaler.scale(loss / num_micro).backward()
        loss = loss.detach().float()
        loss_sum = loss if loss_sum is None else loss_sum + loss
    if grad_clip > 0 or stats is not None:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        if stats is not None:
            stats["grad_norm"] = norm
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / num_micro
