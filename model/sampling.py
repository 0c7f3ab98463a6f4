"""Sampling settings and the samplers: the one place that says what a valid setting is.

`Sampling` holds how a row picks its tokens (temperature, top-k, top-p, repetition penalty, the
random generator or seed, how many log-probability alternatives to record) and validates itself
when built: every caller (`model.generate`/`.stream`, the decode engine, the REPL's `/set`, the
HTTP server) gets the same ranges and the same message for a bad value. `check_setting` checks
one setting the same way (the REPL changes one at a time).

The samplers are small pure functions on a (B, V) logits tensor: `sample` draws one token per
row, `keep_mask`/`filter_logits` apply top-k then top-p, and `apply_repetition_penalty` is CTRL's
penalty. This module imports nothing else of the repository.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F

# `torch.Generator.manual_seed` takes [0, 2**64) (it remaps negative seeds, so they are refused
# here: one seed is one stream of numbers).
SEED_LIMIT = 2**64


# -- settings -------------------------------------------------------------------------------------


class SamplingError(ValueError):
    """A bad sampling setting; `field` names it and the message is one line."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    if not isinstance(x, Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


_MESSAGES = {
    "temperature": "temperature must be >= 0 and finite (0 is greedy)",
    "top_k": "top_k must be an integer >= 1 or None",
    "top_p": "top_p must be in (0, 1] or None",
    "repetition_penalty": "repetition_penalty must be > 0 and finite (1.0 is off)",
    "generator": "generator must be a torch.Generator or None",
    "top_logprobs": "top_logprobs must be an integer >= 0 or None",
    "seed": "seed must be an integer in [0, 2**64) or None",
}


def _valid(name: str, value: Any) -> bool:
    if name == "temperature":
        return _is_number(value) and value >= 0
    if name == "repetition_penalty":
        return _is_number(value) and value > 0
    if value is None:
        return True
    if name == "top_k":
        return _is_int(value) and value >= 1
    if name == "top_p":
        return _is_number(value) and 0 < value <= 1
    if name == "generator":
        return isinstance(value, torch.Generator)
    if name == "top_logprobs":
        return _is_int(value) and value >= 0
    return _is_int(value) and 0 <= value < SEED_LIMIT  # seed


def check_setting(name: str, value: Any) -> Any:
    """Validate one `Sampling` setting; return it normalised (numbers as float or int).

    Args:
        name: a field of `Sampling`.
        value: its new value.

    Raises:
        SamplingError: a bad value (the message names the setting and its range), or an unknown
            name.
    """
    if name not in _MESSAGES:
        raise SamplingError(name, f"unknown sampling setting {name!r}")
    if not _valid(name, value):
        shown = type(value).__name__ if name == "generator" else repr(value)
        raise SamplingError(name, f"{_MESSAGES[name]}, got {shown}")
    if value is None or name == "generator":
        return value
    return float(value) if name in ("temperature", "top_p", "repetition_penalty") else int(value)


@dataclass(eq=False)
class Sampling:
    """How a row picks its tokens; validated when built (`SamplingError`, a ValueError).

    Rows added to a `DecodeEngine` with the same `Sampling` object are sampled together. With
    `generator` None, a `seed` gives the row a generator of its own, seeded on the model's
    device when the engine first sees it; with neither, rows draw from torch's global generator.

    Attributes:
        temperature: divides the logits; 0 is greedy.
        top_k: keep the k likeliest tokens (None: all).
        top_p: keep the smallest set of likeliest tokens with probability >= top_p (None: all).
        repetition_penalty: CTRL's penalty on tokens already in the row (1.0: off).
        generator: the `torch.Generator` to draw from.
        top_logprobs: record log-probabilities with this many alternatives (None: don't).
        seed: seed of a fresh generator when `generator` is None, in [0, 2**64).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None
    top_logprobs: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))

    @property
    def greedy(self) -> bool:
        """True when the row takes the likeliest token (temperature 0)."""
        return self.temperature == 0

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The generator to draw from on `device`: `generator`, else one made from `seed` (kept,
        so rows sharing this object share it), else None (torch's global generator)."""
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


# -- samplers -------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019) on tokens already in the sequence.

    A seen token's logit is divided by `penalty` when positive and multiplied when negative, so
    `penalty > 1` makes repeats less likely.

    Args:
        logits: (B, V) float logits.
        seen: (B, V) bool, True for tokens present in the row (prompt and generated).
        penalty: the penalty, > 0; 1.0 changes nothing.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    big = torch.finfo(logits.dtype).max  # an extreme penalty must not make an inf (then NaN)
    return torch.where(seen, penalized.clamp_(-big, big), logits)


def _nucleus_sorted(vals: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask for logits sorted in descending order: the smallest prefix with mass >= top_p."""
    probs = F.softmax(vals.double(), dim=-1)  # float64: the boundary must not hinge on rounding
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly likelier tokens
    return mass_before < top_p  # the first token has mass 0 before it: always kept


def _outside_nucleus(logits: torch.Tensor, top_p: float, weights: torch.Tensor | None = None,
                     n_bins: int = 1024, span: float = 20.0) -> torch.Tensor:
    """(B, V) bool, True for tokens outside the top-p nucleus, without a full sort (CPU path).

    Tokens are binned by how far their logit lies below the row's largest (`n_bins` bins over
    `span` nats; farther ones share the last bin). Bins above the one where the cumulative
    probability crosses `top_p` are inside, bins below it outside, and only that boundary bin is
    sorted. The same set as `_nucleus_sorted` on a full sort: masses are summed in float64.

    Args:
        logits: (B, V) float logits.
        top_p: the nucleus's probability mass, in (0, 1).
        weights: `exp(logits - logits.amax(-1))` if the caller has it (`sample` does).
    """
    gap = logits.amax(dim=-1, keepdim=True) - logits  # (B, V) >= 0; 0 for the likeliest
    if weights is None:
        weights = torch.exp(-gap)
    probs = weights.double()  # unnormalised: the likeliest token has 1
    # Monotone in the logit, so each bin holds a run of the sorted order; bin 0 = likeliest.
    bins = gap.mul_(n_bins / span).clamp_(max=n_bins - 1).long()
    mass = torch.zeros(logits.size(0), n_bins, dtype=probs.dtype, device=logits.device)
    cum = mass.scatter_add_(1, bins, probs).cumsum(dim=1)  # (B, n_bins)
    if logits.size(0) == 1:  # the usual case on CPU: fewer, cheaper ops (~15 us each here)
        return _outside_one_row(weights, probs, bins, cum, top_p)
    need = top_p * cum[:, -1:]  # (B, 1) the nucleus's mass, unnormalised
    boundary = (cum < need).sum(dim=1, keepdim=True).clamp_(max=n_bins - 1)  # (B, 1)
    before = cum.gather(1, boundary) - mass.gather(1, boundary)  # mass of the bins above it
    outside = bins > boundary
    # The boundary bins' tokens, row by row, likeliest first (ties: lower index first).
    rows, cols = (bins == boundary).nonzero(as_tuple=True)  # row-major order
    vals = probs[rows, cols]
    order = torch.argsort(vals, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by row, that order within a row
    rows, cols, vals = rows[order], cols[order], vals[order]
    ahead = vals.cumsum(0) - vals  # mass of the tokens listed before, across rows
    ahead = ahead - ahead[torch.searchsorted(rows, rows)]  # ... within the token's own row
    out = before[rows, 0] + ahead >= need[rows, 0]  # the nucleus is complete without it
    outside[rows[out], cols[out]] = True
    return outside


def _outside_one_row(weights: torch.Tensor, probs: torch.Tensor, bins: torch.Tensor,
                     cum: torch.Tensor, top_p: float) -> torch.Tensor:
    """`_outside_nucleus` for one row: the nucleus is every token at or above a weight floor
    (of the tokens tied at the floor, the lower indices)."""
    cum_host = cum[0].tolist()
    need = top_p * cum_host[-1]
    b = min(bisect.bisect_left(cum_host, need), len(cum_host) - 1)  # the boundary bin
    before = cum_host[b - 1] if b > 0 else 0.0  # mass of the bins above it
    cols = (bins[0] == b).nonzero().squeeze(1)  # (masked_select is several times slower)
    vals = probs[0].index_select(0, cols).sort(descending=True).values
    n_in = int((before + (vals.cumsum(0) - vals) < need).sum())  # a prefix of the bin is in
    floor = vals[n_in - 1].item()  # float32 weights are exact in float64: same comparisons
    outside = weights < floor
    if n_in < vals.numel() and vals[n_in].item() == floor:  # ties at the floor: some are out
        tied = (weights[0] == floor).nonzero().squeeze(1)
        outside[0, tied[n_in - int((vals[:n_in] > floor).sum()):]] = True
    return outside


def _outside(logits: torch.Tensor, top_k: int | None, top_p: float | None,
             weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, V) bool, True for the tokens top-k then top-p filtering removes; None if none."""
    V = logits.size(-1)
    use_k = top_k is not None and top_k < V
    use_p = top_p is not None and top_p < 1.0
    if not (use_k or use_p):
        return None
    if not use_k and logits.device.type == "cpu" and V >= 4096:
        return _outside_nucleus(logits, top_p, weights)  # a full sort costs ~3.5 ms per row here
    if use_k:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted descending
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    inside = _nucleus_sorted(vals, top_p) if use_p else torch.ones_like(vals, dtype=torch.bool)
    return torch.ones_like(logits, dtype=torch.bool).scatter_(-1, idx, ~inside)


def keep_mask(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
              ) -> torch.Tensor | None:
    """Which tokens survive top-k then top-p filtering: a (B, V) bool mask, or None for all.

    Top-k keeps exactly k tokens (ties broken by index). Top-p keeps the smallest set of most
    likely tokens whose probability sums to at least `top_p` (always at least one token); after
    top-k, the probabilities are those renormalised over the k survivors.
    """
    outside = _outside(logits, top_k, top_p)
    return None if outside is None else ~outside


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
                  ) -> torch.Tensor:
    """Set the logits of tokens outside top-k, then outside the top-p nucleus, to -inf."""
    keep = keep_mask(logits, top_k, top_p)
    return logits if keep is None else logits.masked_fill(~keep, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from (B, V) logits; `temperature == 0` (or one too small to divide
    by in the logits' dtype) is greedy (argmax).

    Order: temperature, then top-k, then top-p, then a draw from the softmax over what is left.
    """
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or so small it would divide by 0
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        return _sample_top_k(logits, temperature, top_k, top_p, generator)
    # Shift the largest logit to 0, then divide: a tiny temperature sends the others to -inf
    # (weight 0), where dividing first would overflow to inf - inf = NaN.
    logits = logits - logits.amax(dim=-1, keepdim=True)
    if temperature != 1.0:
        logits.div_(temperature)
    weights = logits.exp()  # softmax, unnormalised
    outside = _outside(logits, top_k, top_p, weights)
    if outside is not None:
        weights.masked_fill_(outside, 0.0)
    # Inverse-CDF draw: the first token whose cumulative weight reaches u, u uniform in
    # (0, total]; dropped tokens have zero-width intervals and are never drawn. Unlike
    # torch.multinomial this makes no host-device sync.
    cdf = weights.cumsum_(dim=-1)  # (B, V), in place: one big temporary fewer
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = (1.0 - u) * cdf[:, -1:]  # in (0, total]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.size(-1) - 1)


def _sample_top_k(logits: torch.Tensor, temperature: float, top_k: int, top_p: float | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """`sample` with top-k: the k likeliest tokens are found first, so the softmax, top-p and
    the draw run over k tokens instead of the whole vocabulary (about 10 full-vocabulary ops
    fewer per step). The draw is the same inverse-CDF draw in vocabulary order, so a seed picks
    the token the full-vocabulary draw would."""
    vals, idx = torch.topk(logits, top_k, dim=-1)  # (B, k), likeliest first
    vals = vals - vals[:, :1]  # shift the largest to 0, then divide (see `sample`)
    if temperature != 1.0:
        vals.div_(temperature)
    weights = vals.exp()
    if top_p is not None and top_p < 1.0:
        weights.masked_fill_(~_nucleus_sorted(vals, top_p), 0.0)
    idx, order = idx.sort(dim=-1)  # vocabulary order: dropped tokens between add nothing
    cdf = weights.gather(-1, order).cumsum_(dim=-1)  # (B, k)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = (1.0 - u) * cdf[:, -1:]  # in (0, total]
    pick = torch.searchsorted(cdf, u).clamp_(max=top_k - 1)  # (B, 1)
    return idx.gather(-1, pick).squeeze(-1)
