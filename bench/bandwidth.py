"""The bound of batch-1 decoding: this machine's memory read bandwidth, and the weight bytes one
decoded token reads in each format (ours and llama.cpp's)."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from model.lm import Linear

# Bytes per weight as the kernels read them. Ours: int8 is one byte plus a per-row scale (counted
# per row below); int4 is Q4_0's 4 bits plus, per block of 32, the packed kernel's bf16 scale and
# (zero) zero point. llama.cpp's q8_0: 32 int8 + an f16 scale per 34 bytes; q4_0: 16 + 2 bytes.
OURS = {"none": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
GGUF = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of `sum` over a 512 MiB float32 tensor with this process's threads (best of
    `repeats`, after one warm-up)."""
    x = torch.ones(128 * 2**20)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def linear_weights(model: nn.Module) -> tuple[int, int]:
    """(weights, output rows) over every `Linear` of `model` (the LM head included: a tied head
    is read once per token as a product; the embedding's one looked-up row is not counted)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)


def token_bytes(model: nn.Module, per_weight: float, per_row: float = 0.0) -> float:
    """Weight bytes one decoded token reads at `per_weight` bytes a weight (+ `per_row` a row)."""
    weights, rows = linear_weights(model)
    return weights * per_weight + rows * per_row


def our_token_bytes(model: nn.Module, fmt: str) -> float:
    """Weight bytes of one token in our format `fmt` ("none", "bf16", "int8" or "int4")."""
    return token_bytes(model, OURS[fmt], 2.0 if fmt == "int8" else 0.0)
