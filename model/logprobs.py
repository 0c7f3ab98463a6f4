"""Log-probabilities of generated tokens: what `generate(..., return_logprobs=True)` records.

`step_logprobs` is computed by the decode engine at each step for rows whose `Sampling` sets
`top_logprobs`: the chosen token's log-probability and the top-k alternatives under the
*sampling* distribution (repetition penalty, temperature, top-k and top-p applied; greedy
decoding is a point mass) and under the model's *raw* distribution (softmax of its logits).
`TokenLogprobs` holds them; `model.probview.ProbabilityView` turns them into a table or HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.sampling import keep_mask


def top_entries(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logprobs) of the k likeliest tokens along the last dim, likeliest first."""
    k = min(k, logprobs.size(-1))
    vals, ids = torch.topk(logprobs, k, dim=-1)
    return ids, vals


def rank_of(logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """1 + how many tokens are strictly likelier than the chosen one (1 = the likeliest)."""
    return (logprobs > chosen.unsqueeze(-1)).sum(dim=-1) + 1


@dataclass
class TokenLogprobs:
    """Log-probabilities of generated tokens, under the sampling and the raw distribution.

    Shapes: (B,) and (B, k) for one step (what `stream(..., return_logprobs=True)` yields next
    to each token); (B, n) and (B, n, k) from `generate(..., return_logprobs=True)`, where
    positions after a row's end are NaN (ids there are meaningless).

    Attributes:
        tokens: the chosen token ids.
        logprobs: the chosen tokens' log-probabilities under the sampling distribution (what
            they were drawn from: repetition penalty, temperature, top-k, top-p applied; greedy
            is a point mass, log-probability 0).
        top_ids, top_logprobs: the k likeliest tokens of the sampling distribution; tokens it
            excludes have log-probability -inf.
        raw_logprobs: the chosen tokens' log-probabilities under the model itself (softmax of
            its logits): what `score` gives for the generated sequence.
        raw_top_ids, raw_top_logprobs: the k likeliest tokens under the model.
        raw_ranks: the chosen tokens' ranks under the model (1 = the likeliest).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    raw_top_ids: torch.Tensor
    raw_top_logprobs: torch.Tensor
    raw_ranks: torch.Tensor

    @staticmethod
    def stack(steps: list[TokenLogprobs], dim: int = 1) -> TokenLogprobs:
        """Per-step records -> one record: (B,) steps give (B, n) with the default `dim`."""
        names = TokenLogprobs.__dataclass_fields__
        return TokenLogprobs(**{n: torch.stack([getattr(s, n) for s in steps], dim=dim)
                                for n in names})

    def _map(self, fn: Any) -> TokenLogprobs:
        names = TokenLogprobs.__dataclass_fields__
        return TokenLogprobs(**{n: fn(getattr(self, n)) for n in names})

    def index(self, *idx: Any) -> TokenLogprobs:
        """Every tensor indexed by `idx`: `rec.index(0)` is row 0, `rec.index(0, 3)` its step 3."""
        return self._map(lambda t: t[idx])

    def cpu(self) -> TokenLogprobs:
        """A copy with every tensor on the CPU."""
        return self._map(lambda t: t.cpu())

    def blank(self, mask: torch.Tensor) -> TokenLogprobs:
        """A copy with NaN log-probabilities where `mask` (over the leading dims) is True: the
        steps of rows that have finished, which are padding."""
        out = self._map(lambda t: t)
        for name in ("logprobs", "top_logprobs", "raw_logprobs", "raw_top_logprobs"):
            value = getattr(self, name)
            m = mask.view(*mask.shape, *[1] * (value.dim() - mask.dim()))
            setattr(out, name, value.masked_fill(m, float("nan")))
        return out

    def view(self, tokenizer: Any, row: int = 0, title: str | None = None):
        """A `ProbabilityView` of one row (a table as text, coloured tokens in Jupyter)."""
        from model.probview import ProbabilityView

        rec = self.index(row) if self.logprobs.dim() == 2 else self
        rec = rec.index(~torch.isnan(rec.raw_logprobs))  # drop the steps past the row's end
        return ProbabilityView.from_generation(rec, tokenizer, title=title)


def step_logprobs(raw_logits: torch.Tensor, logits: torch.Tensor, tok: torch.Tensor,
                  temperature: float, top_k: int | None, top_p: float | None,
                  k: int) -> TokenLogprobs:
    """What one generation step chose, and with which probabilities.

    Args:
        raw_logits: (B, V) the model's logits.
        logits: (B, V) the logits the sampler saw (after the repetition penalty, if any).
        tok: (B,) the chosen tokens.
        temperature, top_k, top_p: the sampler's settings (temperature 0 = greedy).
        k: how many alternatives to keep.
    """
    raw = F.log_softmax(raw_logits.float(), dim=-1)
    if temperature == 0:  # greedy: all the mass on the argmax, which is `tok`
        samp = torch.full_like(raw, float("-inf")).scatter_(1, tok.unsqueeze(1), 0.0)
    else:
        z = logits.float() / temperature
        keep = keep_mask(z, top_k, top_p)  # the sampler's own filter: the same kept set
        if keep is not None:
            z = z.masked_fill(~keep, float("-inf"))
        samp = F.log_softmax(z, dim=-1)
    t = tok.unsqueeze(1)
    raw_chosen = raw.gather(1, t).squeeze(1)
    top_ids, top_lp = top_entries(samp, k)
    raw_top_ids, raw_top_lp = top_entries(raw, k)
    return TokenLogprobs(tok, samp.gather(1, t).squeeze(1), top_ids, top_lp, raw_chosen,
                         raw_top_ids, raw_top_lp, rank_of(raw, raw_chosen))
