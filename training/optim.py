"""The optimizer (AdamW, or Muon + AdamW) and the learning-rate schedule (cosine or WSD).

`--optimizer adamw`: AdamW on everything, weight decay on matrices and embeddings only.
`--optimizer muon`: `torch.optim.Muon` on the 2-D weights inside the Transformer blocks (the
attention and MLP matrices), AdamW on the rest (the tied token embedding / LM head, the position
embedding, LayerNorms and biases). Muon orthogonalises each matrix's momentum (Newton-Schulz), so
every direction of a matrix moves at the same rate; it needs its own, larger learning rate.

Both schedules are a multiplier of each optimizer's peak rate (`--lr`, `--muon_lr`), so AdamW and
Muon warm up and cool down together.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from training.errors import UsageError

SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class ScheduleArgs:
    """The learning-rate schedule (`training.optim.set_lr`): peak rates, warm-up, decay."""

    schedule: str
    lr: float
    min_lr: float
    muon_lr: float
    warmup_steps: int
    cooldown: float

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise UsageError(f"--min_lr {self.min_lr} is larger than --lr {self.lr}")
        if self.warmup_steps < 0:
            raise UsageError("--warmup_steps must be >= 0")
        # --cooldown is checked by OptimArgs, after --ema (the order the flags were checked in)


@dataclass(frozen=True)
class OptimArgs:
    """The optimizer (`training.optim.build_optimizer`), its clipping and weight average; the
    schedule's flags are `schedule`'s (`lr`, `min_lr`, `muon_lr`, `warmup_steps`, ...)."""

    optimizer: str
    weight_decay: float
    beta1: float
    beta2: float
    muon_momentum: float
    muon_weight_decay: float
    grad_clip: float
    ema: float
    schedule: ScheduleArgs

    def __post_init__(self) -> None:  # in the order the flags were always checked
        s = self.schedule
        if not 0 <= self.ema < 1:
            raise UsageError(f"--ema must be in [0, 1) (0: off; 0.99 averages over ~100 steps), "
                             f"got {self.ema:g}")
        if not 0 < s.cooldown <= 1:
            raise UsageError(f"--cooldown must be in (0, 1], got {s.cooldown:g}")
        if not 0 <= self.muon_momentum < 1:
            raise UsageError(f"--muon_momentum must be in [0, 1), got {self.muon_momentum:g}")
        if self.optimizer == "muon" and s.muon_lr <= 0:
            raise UsageError("--muon_lr must be positive")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError("--beta1 and --beta2 must be in [0, 1)")

    @property
    def lr(self) -> float:
        """AdamW's peak rate (`--lr`)."""
        return self.schedule.lr

    @property
    def muon_lr(self) -> float:
        """Muon's peak rate (`--muon_lr`)."""
        return self.schedule.muon_lr


def muon_available() -> bool:
    """Whether this PyTorch has `torch.optim.Muon` (added in 2.9)."""
    return hasattr(torch.optim, "Muon")


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float],
           device_type: str) -> torch.optim.AdamW:
    """AdamW, fused where this PyTorch has a kernel for the device (CUDA, and CPU since 2.4)."""
    if device_type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device/build
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The matrices Muon trains: every 2-D weight inside the Transformer blocks."""
    blocks = model.transformer.h
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


class MuonAdamW:
    """Muon for the blocks' matrices and AdamW for the rest, stepped together.

    It has the parts of `torch.optim.Optimizer` the trainer and `GradScaler` use
    (`param_groups`, `step`, `zero_grad`, `state_dict`, `load_state_dict`). Its state dict is
    `{"muon": ..., "adamw": ...}`, one entry per inner optimizer.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (was the run trained with "
                             "--optimizer adamw?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D `update`, computed in `dtype`.

    The quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X with A = XX^T, on X scaled to a
    spectral norm of at most 1 (by its Frobenius norm), for the short side of the matrix; it
    maps the singular values towards 1 (to about 0.7-1.2 with the usual coefficients).
    """
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.to(dtype)
    x = x.T if tall else x  # (short, long): the Gram matrix is the small one
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype`.

    PyTorch's runs the iteration in bfloat16, which a CPU without bf16 instructions (AVX2 only:
    many laptops, and a 2-core AMD EPYC measured here) emulates: there it took ~0.7 s of the
    `cpu-10min` preset's 2 s step, and under 0.1 s in float32. The trainer asks for float32
    unless the run computes in bfloat16 (`ns_dtype=torch.bfloat16` is PyTorch's step as it is).
    The state and parameter groups are PyTorch's, so snapshots load in either.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        if closure is not None:
            raise ValueError("Muon.step takes no closure here")
        self.step_in(self.ns_dtype)
        return None

    @torch.no_grad()
    def step_in(self, dtype: torch.dtype) -> None:
        """PyTorch's Muon step (Nesterov momentum, orthogonalised update, decoupled weight
        decay, the rate scaled by sqrt(max(1, rows / cols))) with the iteration in `dtype`."""
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r} needs ns_dtype bf16")
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"], dtype)
                rows, cols = p.shape[:2]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, rows / cols)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str, *, optimizer: str = "adamw",
                   muon_lr: float = 0.02, muon_momentum: float = 0.95,
                   muon_weight_decay: float = 0.0, ns_dtype: torch.dtype = torch.bfloat16
                   ) -> torch.optim.Optimizer | MuonAdamW:
    """The training optimizer (set its rates per step with `set_lr_scale`).

    Args:
        model: a `LanguageModel`.
        lr, weight_decay, betas: AdamW's peak rate, decoupled weight decay (on matrices and
            embeddings only, never on biases or LayerNorm) and betas.
        device_type: "cpu", "cuda", ...: picks the fused AdamW kernel where there is one.
        optimizer: "adamw", or "muon" (Muon on the blocks' matrices, AdamW on the rest). Where
            this PyTorch has no `torch.optim.Muon`, "muon" says so on stderr and uses AdamW.
        muon_lr, muon_momentum, muon_weight_decay: Muon's peak rate, Nesterov momentum and
            decoupled weight decay.
        ns_dtype: the dtype of Muon's Newton-Schulz iteration (`Muon`).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if optimizer == "muon" and not muon_available():
        print(f"warning: torch {torch.__version__} has no torch.optim.Muon (added in 2.9); "
              "training with AdamW instead", file=sys.stderr)
        optimizer = "adamw"
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = {id(p) for p in muon_parameters(model)} if optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in muon_ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    adamw = _adamw(groups, lr, betas, device_type)
    if optimizer == "adamw":
        return adamw
    # adjust_lr_fn "original": the step is scaled by sqrt(max(1, rows / cols)), as in the
    # reference Muon, so c_attn (3C x C) and c_fc (4C x C) move as much per entry as C x C.
    muon = Muon([p for p in params if id(p) in muon_ids], lr=muon_lr, momentum=muon_momentum,
                weight_decay=muon_weight_decay, nesterov=True, adjust_lr_fn="original",
                ns_dtype=ns_dtype)
    return MuonAdamW(muon, adamw)


def lr_scale(step: int, *, schedule: str, warmup_steps: int, max_steps: int,
             min_ratio: float, cooldown: float = 0.2) -> float:
    """The learning-rate multiplier (of each group's peak rate) for optimizer step `step`.

    Both schedules warm up linearly over `warmup_steps` (the first step already uses a non-zero
    rate) and end at `min_ratio` at `max_steps`.
      cosine: half a cosine from 1 down to `min_ratio` over the steps after the warm-up.
      wsd (warmup-stable-decay): 1 until the last `cooldown` fraction of `max_steps`, then a
        straight line down to `min_ratio`.

    Args:
        step: optimizer steps taken so far (0 for the first).
        schedule: "cosine" or "wsd".
        warmup_steps: steps of linear warm-up.
        max_steps: the run's length in steps.
        min_ratio: the final multiplier (min_lr / lr).
        cooldown: wsd only, the fraction of `max_steps` spent decaying, in (0, 1].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)
    decay_start = wsd_decay_start(max_steps, warmup_steps, cooldown)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, max_steps - decay_start)
    return 1.0 - progress * (1.0 - min_ratio)


def wsd_decay_start(max_steps: int, warmup_steps: int, cooldown: float) -> int:
    """The first step (0-based) of a WSD run's cool-down: the last `cooldown` of `max_steps`."""
    return max(warmup_steps, max_steps - max(1, round(cooldown * max_steps)))


def set_lr_scale(optimizer: torch.optim.Optimizer | MuonAdamW, scale: float, lr: float,
                 muon_lr: float = 0.0) -> None:
    """Set the rates to `scale` times the peaks: `lr` for AdamW's groups, `muon_lr` for Muon's.

    The peaks come from the caller (the flags), never from the optimizer's saved state, so that
    a resumed run follows the flags it is resumed with.
    """
    if isinstance(optimizer, MuonAdamW):
        for g in optimizer.muon.param_groups:
            g["lr"] = muon_lr * scale
        optimizer = optimizer.adamw
    for g in optimizer.param_groups:
        g["lr"] = lr * scale


def _float_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point)


class WeightAverage:
    """An exponential moving average of a model's parameters (`--ema DECAY`).

    After optimizer step t the average moves towards the weights by `1 - d_t`, where
    d_t = min(decay, (1 + t) / (10 + t)): early on the average follows the weights closely, so
    the random initialisation does not linger in it (0.999 ** 800 would still weigh it at 45%).
    The average is kept in float32 whatever the parameters' dtype, and is what evaluation,
    `best.pt` and every snapshot's `model_state_dict` hold.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the averaging decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in _float_params(model)}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimizer step)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.shadow)
        params = dict(_float_params(model))
        avg = [self.shadow[n] for n in names]
        new = [params[n].detach().float() for n in names]
        torch._foreach_lerp_(avg, new, 1.0 - d)
        self.updates += 1

    def averaged_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's `state_dict` (tied weights included) with the averaged values."""
        with self.applied(model):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state.get("shadow", {})) != set(self.shadow):
            raise ValueError("the saved weight average does not match this model's parameters")
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`with avg.applied(model):` runs the block with the averaged weights in the model,
        and puts the training weights back (bit for bit) after it."""
        saved = {}
        with torch.no_grad():
            for name, p in _float_params(model):
                saved[name] = p.detach().clone()
                p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in _float_params(model):
                    p.copy_(saved[name])


def build_optimizer(model: torch.nn.Module, optim: OptimArgs, device: torch.device,
                    amp: torch.dtype = torch.float32) -> torch.optim.Optimizer | MuonAdamW:
    """The trainer's optimizer for its flags (`--optimizer`, `--lr`, `--weight_decay`,
    `--beta1/2`, `--muon_*`); the one place `train_lm.py` builds it. `amp`: the run's autocast
    dtype; Muon's Newton-Schulz iteration runs in bfloat16 under bfloat16, else in float32."""
    return make_optimizer(model, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2),
                          device.type, optimizer=optim.optimizer, muon_lr=optim.muon_lr,
                          muon_momentum=optim.muon_momentum,
                          muon_weight_decay=optim.muon_weight_decay,
                          ns_dtype=torch.bfloat16 if amp == torch.bfloat16 else torch.float32)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, step: int, schedule: ScheduleArgs,
           max_steps: int) -> float:
    """Set every parameter group's rate for optimizer step `step` (0-based) from the run's
    schedule (`--schedule`, `--warmup_steps`, `--min_lr`, `--cooldown`) over `max_steps`;
    returns AdamW's rate (`--lr` times the multiplier). The one place the trainer sets the rate
    each step."""
    s = schedule
    scale = lr_scale(step, schedule=s.schedule, warmup_steps=s.warmup_steps,
                     max_steps=max_steps, min_ratio=s.min_lr / s.lr if s.lr else 0.0,
                     cooldown=s.cooldown)
    set_lr_scale(optimizer, scale, s.lr, s.muon_lr)
    return s.lr * scale
