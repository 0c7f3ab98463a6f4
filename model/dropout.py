"""Dropout with a cheaper random mask on CPU, and causal attention with dropout built on it.

Why: on a CPU, `F.dropout` draws one Bernoulli sample per value through PyTorch's Mersenne
Twister (about 6 ms for a 16 x 128 x 256 activation on a 2-core EPYC), and SDPA with a dropout
probability falls back to its math path with the same sampler (about 5x its time without).
With `--dropout 0.1` that was a third of the `cpu-10min` model's training step. Here one 64-bit
draw makes four 16-bit uniform numbers, each compared with a threshold: about 0.7 ms for the same
mask.

What changes: each value is kept with probability 1 - p', where p' is p rounded to a multiple of
1/65,536 (0.1 -> 0.0999908), and the kept values are scaled by 1 / (1 - p'), so the expectation
is exactly the input's, as with `F.dropout`. On other devices (CUDA's dropout is fused and
fast), and for `inplace` dropout, `F.dropout` runs as before. Masks come from the default
generator, so seeding and a resumed run's generator state work as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # the mask's uniform numbers are 16-bit


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape` keeping each value with probability 1 - p' (p' = p rounded to
    a multiple of 1/65,536), and the scale 1 / (1 - p') of the kept values."""
    dropped = round(p * _LEVELS)
    n = math.prod(shape)
    # four 16-bit uniforms per 64-bit draw (randint's range is the whole int64 but its top
    # value, which moves no 16-bit part measurably)
    draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    uniform = draws.view(torch.int16)[:n].view(shape)  # each in [-32768, 32767]
    keep = uniform >= dropped - _LEVELS // 2  # P = (65536 - dropped) / 65536
    return keep, _LEVELS / (_LEVELS - dropped)


class _MaskScale(torch.autograd.Function):
    """y = x * mask * scale, saving only the boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the cheaper mask on CPU (see the module)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p)
    return _MaskScale.apply(x, keep, scale)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same attribute, state and repr), with `dropout`'s cheaper mask on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  p: float) -> torch.Tensor:
    """Causal attention whose probabilities go through `dropout`: what
    `F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)` computes, for a
    training step on CPU.

    Args:
        q: (B, H, T, D) queries; k, v: (B, KV, T, D) keys and values, KV dividing H (grouped
            heads share theirs).

    Returns:
        (B, H, T, D).
    """
    B, H, T, D = q.shape
    if k.size(1) != H:  # grouped-query attention: each key/value head serves H // KV heads
        k = k.repeat_interleave(H // k.size(1), dim=1)
        v = v.repeat_interleave(H // v.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
    return dropout(att, p) @ v  # (B, H, T, D)
