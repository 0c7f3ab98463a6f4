"""The optimizer (AdamW, decay on 2-D weights only) and the learning-rate schedule.

`build_optimizer` and `set_lr` are what the trainer calls: one place each.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm).

    Uses the fused implementation where this PyTorch has one for the device (CUDA, and CPU
    since 2.4), else the multi-tensor one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if device_type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device/build
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`.

    `step` counts optimizer steps from 0; the first step already uses a non-zero rate.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    span = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def build_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's optimizer for its flags (`--lr`, `--weight_decay`, `--beta1/2`); the one
    place `train_lm.py` builds it."""
    return make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2),
                          device.type)


def set_lr(optimizer: torch.optim.Optimizer, step: int, args, max_steps: int) -> float:
    """Set the learning rate of optimizer step `step` (0-based) from the flags' schedule, in
    every parameter group; returns it. The one place the trainer sets the rate each step."""
    lr = lr_at(step, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
               max_steps=max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
