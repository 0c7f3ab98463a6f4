"""Weight copies for inference on CPU, and the product kernel each one uses.

`LanguageModel.quantize(fmt)` (and `--quantize` on the command lines) picks the format of the
weight copies that `Linear` multiplies by in every forward pass without gradients (decoding,
evaluation). The float32 parameters, `state_dict`, checkpoints and exports are never changed:
the copies are made from them, and remade if they change.

- "none": float32 copies (`FloatWeight`, made by `setup_cache` on CPU).
- "bf16": the weights rounded to bf16 (half the bytes; `Bf16Weight`). The residual stream,
  LayerNorm, attention and the logits stay float32.
- "int8": symmetric per-output-channel int8 weights (a quarter of the bytes), LM head included:
  `w[o, i] ~= q[o, i] * scale[o]` with `q` in [-127, 127] and `scale[o] = max_i |w[o, i]| / 127`
  (`Int8Weight`).
- "int4": llama.cpp's Q4_0 scheme, LM head included: per block of 32 inputs of a row, one
  scale d (bf16) and 4-bit values q with `w ~= (q - 8) * d` (4.5 bits a weight; `Int4Weight`).

Decoding at small batch sizes is memory-bound (every weight is read once per token), so fewer
bytes per weight is most of the speed-up, and the kernel that streams them fastest differs
between CPUs. Each copy takes the first kernel of its list that exists here and agrees with a
reference product (checked once per process), in an order measured on the CPUs we have
(`bench/decode_matmuls.py`; GPT-2 124M's LM head, 768 x 50,257, one row, 2 threads):

- one row (decoding at batch 1), float32 and bf16: our own product (`model/native.py`, built
  for this CPU on first use), where it builds: it streams the weights at about the machine's
  read bandwidth (`bench/results/decode_matmuls_zen5_cpu_2core.txt`). It takes the float32
  weight itself (no copy) and keeps bf16's inputs float32.
- float32: oneDNN's packed layout with more than one thread (27 GB/s on a 2-core AMD EPYC with
  AVX2; 3x faster than the others at 8 rows), else a plain (in, out) copy.
- bf16: oneDNN's packed bf16 layout where oneDNN has bf16 kernels (AVX-512-BF16, AMX: fastest
  there, even on one thread); else fbgemm's half-precision kernel on the bf16-rounded weights
  (AVX2 CPUs: 2.9 ms at memory speed, where bf16 products take 4.3 ms as `F.linear` and 120 ms
  on an (in, out) copy); else `F.linear` on the bf16 copy. The oneDNN and `F.linear` kernels
  round the inputs to bf16 too; fbgemm's keeps them float32 (its weights hold the bf16 values
  exactly, up to 3e-8 below 2**-17).
- int8: one row (decoding at batch 1) through our own weight-only product (`model/native.py`:
  float32 inputs, GPT-2 124M's weights at 26 GB/s on a Zen 5 EPYC, same file); more rows through
  fbgemm's dynamic int8 linear (W8A8: the inputs are quantized too, per row, to 7 bits
  as x86's fbgemm needs without VNNI; as llama.cpp's q8_0 does, which uses 8 bits per block of
  32): 1.5 ms at one row and 2.4 ms at eight on that EPYC, where `torch._weight_int8pack_mm`
  (bf16 inputs) takes 3.5 and 10.3 ms and oneDNN's quantized linear 5.0 and 11.5 ms. Where
  fbgemm is missing, `torch._weight_int8pack_mm` for up to `INT8_KERNEL_MAX_ROWS` rows, else the
  fallback: the int8 weight converted to the input's dtype for one `F.linear`, then scaled.
  fbgemm's int8 weights go through PyTorch's quantized tensors, which torch 2.13 marks as
  deprecated; when they are gone the check fails and int8 takes the next kernel.
- int4: PyTorch's packed 4-bit CPU kernel (`_weight_int4pack_mm_for_cpu`, what torchao's int4
  weight-only configuration runs on CPU) on the inputs rounded to bf16 (its float32 path is
  30x slower); where it is missing or disagrees with the grid, the weight dequantized for one
  `F.linear`.

Rows of a batch never share a quantization: one row goes to fbgemm as it is (it picks the
row's own [min, max] range); several rows are each divided by their largest |value| first
and given two extra inputs, +1 and -1, with zero weights, so that every row spans exactly
[-1, 1] and is quantized alone, and the output is scaled back per row.
"""

from __future__ import annotations

import functools
import math
import platform
import warnings

import torch
import torch.nn.functional as F

from model import native

FORMATS = ("none", "bf16", "int8", "int4")

# Set to False to force the int8 and int4 fallbacks (the weight dequantized for one `F.linear`)
# everywhere: tests compare the packed kernels against them.
PACKED_KERNELS = True
# Rows up to which torch._weight_int8pack_mm is used where fbgemm is missing (its cost grows
# with each row; the fallback's hardly until its product is compute-bound).
INT8_KERNEL_MAX_ROWS = 8
F16_MAX = 65504.0

_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def check_format(fmt: str) -> str:
    """Return `fmt` if it names a weight format, else raise a one-line ValueError."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _ops(namespace: str, *names: str):
    """The default overloads of `torch.ops.<namespace>.<name>`, or None if one is missing."""
    try:
        ns = getattr(torch.ops, namespace)
        return tuple(getattr(ns, n).default for n in names)
    except (AttributeError, RuntimeError):
        return None


# -- oneDNN's packed layout (float32, bf16) --------------------------------------------------------

_ONEDNN = _ops("mkldnn", "_linear_pointwise")
_ONEDNN_LINEAR = _ONEDNN[0] if _ONEDNN else None


def onednn_weight(w: torch.Tensor) -> torch.Tensor | None:
    """`w` (out, in) packed by oneDNN for small-batch products, or None where that is unavailable.

    Packed for 8 rows (oneDNN picks a blocked layout for that; any number of rows still works).
    The result is checked once against `F.linear` so an unsupported build or dtype falls back.
    """
    if (_ONEDNN_LINEAR is None or not _X86_64 or w.device.type != "cpu"
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        x = torch.ones(1, w.size(1), dtype=w.dtype)
        tol = 1e-3 if w.dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
        ok = torch.allclose(_ONEDNN_LINEAR(x, packed, None, "none", [], "").float(),
                            F.linear(x, w).float(), rtol=tol, atol=tol)
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return packed if ok else None


def _onednn_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    if torch.compiler.is_compiling():
        return onednn_linear(x, packed, bias)
    return _ONEDNN_LINEAR(x, packed, bias, "none", [], "")  # takes (..., in) as it is


# The same product as an op of our own for `torch.compile` (the compiled CPU decode step of
# model/engine.py): Inductor cannot lower the packed-weight op itself, and as an opaque op it
# still fuses everything around it. Eager code calls the kernel directly (no op dispatch).
@torch.library.custom_op("small_lm::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """x (..., in) times a weight packed by `onednn_weight` ((out, in) logically), plus bias."""
    return _ONEDNN_LINEAR(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.size(0))


class FloatWeight:
    """A float32 (or the model's dtype) decode copy of an (out, in) weight.

    One input row goes through our own product (`model/native.py`) on the weight itself (no
    copy), where it is built; more rows through oneDNN's packed copy (or the (in, out) one).
    """

    def __init__(self, w: torch.Tensor) -> None:
        w = w.detach()
        self.row_w = w if native.usable(w) else None  # the parameter, read as it is
        # With one thread the plain (in, out) copy was faster at batch 1.
        packed = onednn_weight(w) if torch.get_num_threads() > 1 else None
        self.packed = packed is not None
        self.w = packed if self.packed else w.t().contiguous()  # (in, out)
        self.out_features = w.size(0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (self.row_w is not None and x.numel() == x.size(-1)
                and not torch.compiler.is_compiling()):
            return native.linear_row(x, self.row_w, bias).to(x.dtype)
        if self.packed:
            return _onednn_product(x, self.w, bias)
        x2 = x.reshape(-1, x.size(-1))  # (B*T, in)
        y = x2 @ self.w if bias is None else torch.addmm(bias, x2, self.w)
        return y.view(*x.shape[:-1], self.out_features)


# -- fbgemm (half-precision weights; int8 weights with int8 inputs) --------------------------------

_FBGEMM_FP16 = _ops("quantized", "linear_prepack_fp16", "linear_dynamic_fp16")
_FBGEMM_INT8 = _ops("quantized", "linear_prepack", "linear_dynamic")
_FBGEMM_FP16_UNPACK = (_ops("quantized", "linear_unpack_fp16") or (None,))[0]


def _fbgemm_engine() -> bool:
    return (_X86_64 and "fbgemm" in torch.backends.quantized.supported_engines)


def _with_fbgemm(fn):
    """Run `fn()` with fbgemm as the quantized engine (packing picks its backend from it)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return fn()
    finally:
        torch.backends.quantized.engine = before


def _bias_key(bias: torch.Tensor | None) -> tuple | None:
    """What a packed bias was made from: an in-place change to the bias gives a new key."""
    return None if bias is None else (bias.data_ptr(), bias._version)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _probe(rows: int = 3, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, width, generator=g), torch.randn(rows, width, generator=g)


@functools.cache
def fbgemm_fp16_works() -> bool:
    """Whether fbgemm's half-precision linear exists here and agrees with `F.linear` (once)."""
    if _FBGEMM_FP16 is None or _FBGEMM_FP16_UNPACK is None or not _fbgemm_engine():
        return False
    w, x = _probe()
    try:
        y = _FBGEMM_FP16[1](x, _with_fbgemm(lambda: _FBGEMM_FP16[0](w, None)))
    except (NotImplementedError, RuntimeError):
        return False
    return _rel_err(y, F.linear(x, w.half().float())) < 1e-3


class Bf16Weight:
    """The bf16-rounded copy of an (out, in) weight, with this CPU's fastest kernel for it."""

    def __init__(self, w: torch.Tensor) -> None:
        wb = w.detach().to(torch.bfloat16)
        self.out_features = wb.size(0)
        self.row_w = wb if native.usable(wb) else None  # one row: our product on this copy
        packed = onednn_weight(wb)
        if packed is not None:
            self.kernel, self.w = "onednn", packed
        elif (wb.device.type == "cpu" and fbgemm_fp16_works()
              and float(wb.abs().max()) <= F16_MAX):
            wf = wb.float()
            self.kernel, self.w = "fbgemm_fp16", _with_fbgemm(lambda: _FBGEMM_FP16[0](wf, None))
            self._bias_key = None  # the bias packed in self.w
        else:
            self.kernel, self.w = "plain", wb

    def _repack(self, bias: torch.Tensor | None) -> None:
        wf = _FBGEMM_FP16_UNPACK(self.w)[0]  # the fp16 values as float32: exact
        b = None if bias is None else bias.detach().float()
        self.w = _with_fbgemm(lambda: _FBGEMM_FP16[0](wf, b))
        self._bias_key = _bias_key(bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.row_w is not None and x.numel() == x.size(-1):
            return native.linear_row(x, self.row_w, bias).to(x.dtype)  # x stays float32
        if self.kernel == "fbgemm_fp16" and x.dtype == torch.float32:
            # One op, (..., in) as it is, the bias inside (packed with the weight, again if
            # it changes): a decode step makes ~50 of these, and each op costs ~5 us.
            if _bias_key(bias) != self._bias_key:
                self._repack(bias)
            return _FBGEMM_FP16[1](x, self.w)
        if self.kernel == "fbgemm_fp16":
            if self._bias_key is not None:
                self._repack(None)
            y = _FBGEMM_FP16[1](x.float(), self.w)
            return (y if bias is None else y.add_(bias)).to(x.dtype)
        xb = x.to(torch.bfloat16)
        y = _onednn_product(xb, self.w, None) if self.kernel == "onednn" else F.linear(xb, self.w)
        # Back in x's dtype with the bias added at that precision: `bf16 + float32` is one op.
        return y.to(x.dtype) if bias is None else y + bias


# -- int8 ------------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of an (out, in) weight.

    Returns:
        `(q, scale)`: q (out, in) int8 in [-127, 127] and scale (out,) bf16 (the kernels'
        dtype), with `w ~= q * scale[:, None]`. q is rounded against the bf16 scale, so the
        product is the nearest grid point to `w` on the grid actually used.
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(torch.bfloat16)  # (out,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _pack_w8a8(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """fbgemm's packed form of the int8 weight (its per-channel quantized tensor, prepacked),
    with a float32 bias that the product adds."""
    b = None if bias is None else bias.detach().float()
    with warnings.catch_warnings():  # quantized tensors: deprecated, still the way in
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(q.size(0), dtype=torch.long), 0)
        return _with_fbgemm(lambda: _FBGEMM_INT8[0](qw, b))


def _w8a8_product(x2: torch.Tensor, packed) -> torch.Tensor:
    # reduce_range: 7-bit inputs. With 8 bits, AVX2's u8 x s8 pair sums overflow int16 (we
    # measured 82% errors on large inputs against large weights of one sign).
    return _FBGEMM_INT8[1](x2, packed, True)


@functools.cache
def w8a8_works() -> bool:
    """Whether fbgemm's dynamic int8 linear exists here and agrees with the int8 grid (once)."""
    if _FBGEMM_INT8 is None or not _fbgemm_engine():
        return False
    w, x = _probe()
    q, scale = quantize_int8(w)
    try:
        y = _w8a8_product(x, _pack_w8a8(q, scale))
    except (NotImplementedError, RuntimeError, AttributeError):
        return False
    return _rel_err(y, F.linear(x, q.float() * scale.float()[:, None])) < 3e-2


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
    """x (M, in) times the int8 weight in x's dtype: int8 -> bf16 or float32 is exact."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Weight:
    """An (out, in) weight held as int8 rows and one bf16 scale per row (output channel)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.q, self.scale = quantize_int8(w)
        # one row: our own weight-only product (model/native.py) on q and float32 scales
        self._native_scale = self.scale.float() if native.usable(self.q) else None
        # fbgemm's packed weight: as is with the bias (for one row; `_one_key`: which bias),
        # and with 2 zero columns, no bias (for several rows)
        self._one = self._one_key = self._many = None
        self._pm: dict[int, torch.Tensor] = {}  # rows -> their (rows, 2) +1/-1 inputs

    def kernel(self, rows: int) -> str:
        """The kernel of a product with `rows` input rows: "native" (one row, `model/native.py`),
        "w8a8" (fbgemm), "int8pack" (`torch._weight_int8pack_mm`) or "fallback"."""
        dev = self.q.device.type
        if not PACKED_KERNELS or dev != "cpu" or not _X86_64:
            return "fallback"
        if rows == 1 and self._native_scale is not None:
            return "native"
        if w8a8_works():
            return "w8a8"
        # The kernel reads the inputs 16 at a time without a tail: other widths give wrong
        # results or a crash (torch 2.13, AVX-512), so they take the fallback.
        if rows <= INT8_KERNEL_MAX_ROWS and self.q.size(1) % 16 == 0 and _kernel_works(dev):
            return "int8pack"
        return "fallback"

    def _w8a8_one(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One float32 row (..., in) as it is: its own [min, max] range, as fbgemm picks it;
        one op, the bias inside (a decode step makes ~50 of these; each op costs ~5 us)."""
        key = _bias_key(bias)
        if self._one is None or key != self._one_key:
            self._one, self._one_key = _pack_w8a8(self.q, self.scale, bias), key
        return _w8a8_product(x, self._one)

    def _w8a8_many(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Several float32 rows (M, in), each divided by its largest |value| and given the
        inputs +1 and -1 (zero weights): every row spans [-1, 1], so it is quantized alone."""
        if self._many is None:  # two zero weight columns for the +1 and -1 inputs
            q2 = torch.cat([self.q, self.q.new_zeros(self.q.size(0), 2)], dim=1)
            self._many = _pack_w8a8(q2, self.scale)
        M = x2.size(0)
        pm = self._pm.get(M)
        if pm is None:
            pm = self._pm[M] = torch.tensor([[1.0, -1.0]]).expand(M, 2).contiguous()
        amax = torch.linalg.vector_norm(x2, math.inf, dim=1, keepdim=True).clamp_(min=1e-30)
        y = _w8a8_product(torch.cat([x2 / amax, pm], dim=1), self._many)  # (M, out)
        return y.mul_(amax) if bias is None else torch.addcmul(bias, y, amax)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, w, bias)` for x (..., in); the result has x's dtype."""
        rows = x.numel() // x.size(-1)
        kernel = self.kernel(rows)
        if kernel == "native":  # float32 inputs as they are: weight-only int8
            return native.linear_row(x, self.q, bias, self._native_scale).to(x.dtype)
        if kernel == "w8a8":
            if x.dtype == torch.float32 and rows == 1:
                return self._w8a8_one(x, bias)
            x2 = x.reshape(rows, x.size(-1)).float()  # (M, in)
            y = self._w8a8_one(x2, bias) if rows == 1 else self._w8a8_many(x2, bias)
            return y.to(x.dtype).view(*x.shape[:-1], y.size(-1))
        x2 = x.reshape(-1, x.size(-1))  # (M, in)
        if kernel == "int8pack":  # vectorised for bf16 inputs only
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale)
        else:
            y = _int8_fallback(x2.to(torch.bfloat16), self.q, self.scale)
        # (M, out) back in x's dtype, the bias added at that precision: `bf16 + float32` is
        # one float32 op (dtype promotion) where `.to()` then `add_` would be two.
        y = y.to(x.dtype) if bias is None else y + bias
        return y.view(*x.shape[:-1], y.size(-1))


# -- int4 ------------------------------------------------------------------------------------------

INT4_GROUP = 32  # inputs per scale: llama.cpp's Q4_0 block
_INT4_ROWS = 16  # the packed kernel takes weights with a multiple of 16 rows (outputs)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's symmetric 4-bit scheme for an (out, in) weight, per block of `INT4_GROUP` inputs
    of each row: `d = m / -8`, m the block's value of largest magnitude (its sign kept, so m
    itself is exact), `q = clamp(round(w / d) + 8, 0, 15)`, `w ~= (q - 8) * d`.

    Returns:
        `(q, d)`: q (out, in') uint8 in [0, 15] and d (out, in' / 32) bf16 (the kernel's
        dtype; q is rounded against the bf16 d). in' is `in` rounded up to a multiple of 32;
        the padding holds q = 8, a zero weight.
    """
    w = w.detach().float()
    out, inp = w.shape
    pad = -inp % INT4_GROUP
    blocks = F.pad(w, (0, pad)).view(out, -1, INT4_GROUP)  # (out, blocks, 32)
    m = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # (out, blocks, 1)
    d = (m / -8.0).to(torch.bfloat16)
    df = d.float()
    q = torch.round(blocks / torch.where(df == 0, 1.0, df)).add_(8).clamp_(0, 15)
    return q.to(torch.uint8).view(out, -1), d.squeeze(-1)


def dequantize_int4(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The float32 (out, in') weight that `(q, d)` of `quantize_int4` stand for."""
    out = q.size(0)
    return ((q.view(out, -1, INT4_GROUP).float() - 8) * d.float()[..., None]).view(out, -1)


def _pack_int4(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed kernel's weight and its (blocks, out', 2) scales and zero points (all zero:
    symmetric), out' padded to a multiple of 16 rows of zero weights."""
    pad = -q.size(0) % _INT4_ROWS
    q = F.pad(q.to(torch.int32), (0, 0, 0, pad), value=8)
    d = F.pad(d, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([d, torch.zeros_like(d)], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_zeros


@functools.cache
def int4_kernel_works() -> bool:
    """Whether PyTorch's packed 4-bit CPU kernel exists here and agrees with the grid (once)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or not _X86_64:
        return False
    w, x = _probe(width=96)
    q, d = quantize_int4(w)
    try:
        packed, sz = _pack_int4(q, d)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, INT4_GROUP, sz)
    except (NotImplementedError, RuntimeError, AttributeError):
        return False
    return _rel_err(y[:, :w.size(0)].float(), F.linear(x, dequantize_int4(q, d))) < 2e-2


class Int4Weight:
    """An (out, in) weight in Q4_0's scheme (`quantize_int4`: 4 bits and one bf16 scale per 32
    inputs, 4.5 bits a weight), multiplied by PyTorch's packed 4-bit CPU kernel
    (`_weight_int4pack_mm_for_cpu`, torchao's int4 weight-only one) on bf16 inputs where it
    works (with float32 inputs it takes a slow path: 33 ms against 1.1 for GPT-2's LM head at
    one row on a Zen 5 EPYC), else by the dequantized weight."""

    def __init__(self, w: torch.Tensor) -> None:
        self.out_features, self.in_features = w.shape
        self.q, self.d = quantize_int4(w)
        self.kernel = ("int4pack" if w.device.type == "cpu" and PACKED_KERNELS
                       and int4_kernel_works() else "fallback")
        self._packed = self._sz = None
        if self.kernel == "int4pack":
            self._packed, self._sz = _pack_int4(self.q, self.d)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, w, bias)` for x (..., in); the result has x's dtype."""
        x2 = x.reshape(-1, x.size(-1))  # (M, in)
        if self.q.size(1) != self.in_features:  # the padding's inputs are zero
            x2 = F.pad(x2, (0, self.q.size(1) - self.in_features))
        if self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._packed,
                                                           INT4_GROUP, self._sz)
            y = y[:, :self.out_features]
        else:
            y = F.linear(x2, dequantize_int4(self.q, self.d).to(x2.dtype))
        y = y.to(x.dtype) if bias is None else y + bias
        return y.reshape(*x.shape[:-1], self.out_features)
