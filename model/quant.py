"""Low-precision weight formats for inference on CPU: bf16 copies and int8 weights.

`LanguageModel.quantize(fmt)` (and `--quantize` on the command lines) picks the format of the
weight copies that `Linear` multiplies by in every forward pass without gradients (decoding,
evaluation). The float32 parameters, `state_dict`, checkpoints and exports are never changed:
the copies are made from them, and remade if they change.

- "none": float32 (the default; on CPU, `Linear`'s float32 decode copies as before).
- "bf16": bf16 copies of the weights (half the bytes); inputs are rounded to bf16 for the
  product and the result goes back to float32, so the residual stream, LayerNorm, attention
  and the logits stay float32.
- "int8": symmetric per-output-channel int8 weights (a quarter of the bytes), LM head included:
  `w[o, i] ~= q[o, i] * scale[o]` with `q` in [-127, 127] and `scale[o] = max_i |w[o, i]| / 127`.
  Products take bf16 inputs and accumulate in float32.

Decoding at small batch sizes is memory-bound (every weight is read once per token), so fewer
bytes per weight is most of the speed-up. For int8 the fast kernel is PyTorch's
`torch._weight_int8pack_mm`; it is vectorised on x86-64 only, and only for bf16 inputs: with
float32 inputs it runs a scalar loop (7-17x slower in our measurements), so inputs are rounded
to bf16 first. Its cost grows with the number of input rows (about 3.5x from 1 row to 8 on the
default LM head), so it is used for up to `INT8_KERNEL_MAX_ROWS` rows (the decode steps of a
small batch); more rows (a prompt's prefill, evaluation windows) and other
machines take the fallback, which converts the int8 weight to bf16 for one `F.linear` and
scales its output: the same products, with one more bf16 rounding.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

FORMATS = ("none", "bf16", "int8")

# Set to False to force the int8 fallback everywhere (tests compare the two).
INT8_KERNEL = True
# Rows up to which the int8 kernel beats the fallback (a 2-core x86 CPU: the kernel's cost grows
# with each row, the fallback's hardly until its matrix product is compute-bound).
INT8_KERNEL_MAX_ROWS = 8

_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def check_format(fmt: str) -> str:
    """Return `fmt` if it names a weight format, else raise a one-line ValueError."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of an (out, in) weight.

    Returns:
        `(q, scale)`: q (out, in) int8 in [-127, 127] and scale (out,) bf16 (the kernel's
        dtype), with `w ~= q * scale[:, None]`. q is rounded against the bf16 scale, so the
        product is the nearest grid point to `w` on the grid actually used.
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(torch.bfloat16)  # (out,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def _kernel_works(device_type: str) -> bool:
    """Whether `torch._weight_int8pack_mm` exists here and agrees with the fallback (once)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(3, 64, generator=g).to(device_type, torch.bfloat16)
    q, scale = (t.to(device_type) for t in quantize_int8(w))
    try:
        y = torch._weight_int8pack_mm(x, q, scale)
    except (NotImplementedError, RuntimeError):
        return False
    return torch.allclose(y.float(), _int8_fallback(x, q, scale).float(), rtol=2e-2, atol=1e-2)


def _int8_fallback(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) bf16 times the int8 weight: int8 -> bf16 is exact (|q| <= 127 < 2**8)."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Weight:
    """An (out, in) weight held as int8 rows and one bf16 scale per row (output channel)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.q, self.scale = quantize_int8(w)

    def use_kernel(self, rows: int) -> bool:
        """Whether a product with `rows` input rows takes `torch._weight_int8pack_mm`."""
        dev = self.q.device.type
        # The kernel reads the inputs 16 at a time without a tail: other widths give wrong
        # results or a crash (torch 2.13, AVX-512), so they take the fallback.
        return (INT8_KERNEL and rows <= INT8_KERNEL_MAX_ROWS and dev == "cpu" and _X86_64
                and self.q.size(1) % 16 == 0 and _kernel_works(dev))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, w, bias)` for x (..., in); the result has x's dtype."""
        x2 = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (M, in)
        if self.use_kernel(x2.size(0)):
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = _int8_fallback(x2, self.q, self.scale)
        # (M, out) back in x's dtype, the bias added at that precision: `bf16 + float32` is
        # one float32 op (dtype promotion) where `.to()` then `add_` would be two.
        y = y.to(x.dtype) if bias is None else y + bias
        return y.view(*x.shape[:-1], y.size(-1))
