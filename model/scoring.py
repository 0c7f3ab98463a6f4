"""How sure was the model of each token, and what else did it consider?

Two entry points, both pure (no printing, no state kept):

- `score(model, text)` scores a text (or token ids): for every token its log-probability under
  the model given the tokens before it, its rank among all tokens, the top-k alternatives, and
  the text's total and mean loss and perplexity. Texts longer than the context are scored with
  the sliding windows of `evaluate_lm.py` (`model/windows.py`), so `score(...).loss` equals
  `evaluate_tokens(...).loss` for the same tokens, seq_len and stride.
- `step_logprobs(...)` (`model/logprobs.py`, importable from here too) is what
  `generate(..., return_logprobs=True)` and `stream(...)` record at each step: the chosen
  token's log-probability and the top-k alternatives under the *sampling* distribution
  (repetition penalty, temperature, top-k and top-p applied; greedy decoding is a point mass)
  and under the model's *raw* distribution (softmax of its logits).

`model.probview.ProbabilityView` turns either into a table or coloured HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.logprobs import TokenLogprobs, rank_of, step_logprobs, top_entries
from model.windows import count_windows, iter_windows, resolve_window

# -- scoring a text ------------------------------------------------------------------------------


@dataclass
class TokenScores:
    """Per-token scores of one text; token 0 (no context) and tokens a window skips are unscored.

    Attributes:
        ids: (N,) the text's token ids.
        logprobs: (N,) float32 natural-log probability of each token given the ones before it
            (within its window); NaN where unscored.
        ranks: (N,) rank of each token under the model (1 = the likeliest); 0 where unscored.
        top_ids: (N, k) the k likeliest tokens at each position, likeliest first.
        top_logprobs: (N, k) their log-probabilities (NaN where unscored).
        seq_len: window length used.
        stride: step between window starts.
        windows: how many windows were run.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    seq_len: int
    stride: int
    windows: int

    @property
    def scored(self) -> torch.Tensor:
        """(N,) bool: which tokens have a score."""
        return ~torch.isnan(self.logprobs)

    @property
    def tokens_scored(self) -> int:
        """How many tokens have a score."""
        return int(self.scored.sum())

    @property
    def total_logprob(self) -> float:
        """Sum of the scored tokens' log-probabilities (the text's log-likelihood)."""
        return float(self.logprobs[self.scored].double().sum())

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token, in nats (what training reports)."""
        return -self.total_logprob / self.tokens_scored

    @property
    def perplexity(self) -> float:
        """exp(loss); inf if that overflows."""
        try:
            return math.exp(self.loss)
        except OverflowError:
            return float("inf")

    def view(self, tokenizer: Any, title: str | None = None):
        """A `ProbabilityView` of these scores (a table as text, coloured tokens in Jupyter)."""
        from model.probview import ProbabilityView

        return ProbabilityView.from_scores(self, tokenizer, title=title)


def _token_ids(model: Any, text: Any, tokenizer: Any) -> torch.Tensor:
    if isinstance(text, str):
        tok = tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            from model.tokenizer import load_tokenizer

            tok = load_tokenizer()
        return torch.tensor(tok.encode(text), dtype=torch.long)
    ids = torch.as_tensor(text)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError("text must be a str or 1-D integer token ids")
    return ids.detach().to("cpu", torch.long)


@torch.no_grad()
def score(model: Any, text: Any, *, top_k: int = 5, seq_len: int | None = None,
          stride: int | None = None, tokenizer: Any = None) -> TokenScores:
    """Score every token of `text` under `model`.

    Args:
        model: a `LanguageModel` (any model whose `model(idx)` returns (B, T, V) logits and that
            has `max_seq_len` and `config.vocab_size`).
        text: a str (encoded with `tokenizer`, else `model.tokenizer`, else the bundled GPT-2
            tokenizer) or 1-D token ids.
        top_k: how many alternatives to keep per position (0: none).
        seq_len: window length for long texts (default and maximum: the model's context).
        stride: step between windows (default: seq_len, as `evaluate_lm.py`); a smaller stride
            gives every token after the first a score, with at least `seq_len - stride` tokens
            of context.
        tokenizer: the tokenizer for a str `text`.

    Returns:
        A `TokenScores`; `.loss` and `.perplexity` summarise it.

    Raises:
        ValueError: fewer than 2 tokens, ids outside the vocabulary, or bad window arguments.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    ids = _token_ids(model, text, tokenizer)
    N, V = ids.numel(), model.config.vocab_size
    if N < 2:
        raise ValueError(f"need at least 2 tokens to score (the first has no context), got {N}")
    if int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"token ids must be in [0, {V})")
    seq_len, stride = resolve_window(seq_len, stride, model.max_seq_len)
    k = min(top_k, V)
    logprobs = torch.full((N,), float("nan"))
    ranks = torch.zeros(N, dtype=torch.long)
    top_ids = torch.zeros(N, k, dtype=torch.long)
    top_logprobs = torch.full((N, k), float("nan"))
    device = model.device
    was_training = model.training
    model.eval()
    try:
        for begin, end, first in iter_windows(N, seq_len, stride):
            if first >= end:  # a lone one-token last window: nothing to score
                continue
            # window[:-1] predicts window[1:]; only targets first..end-1 are this window's.
            x = ids[begin:end - 1].to(device).unsqueeze(0)  # (1, T)
            logits = model(x)[0, first - begin - 1:].float()  # (n, V)
            lp = F.log_softmax(logits, dim=-1)
            target = ids[first:end].to(device)
            chosen = lp.gather(1, target.unsqueeze(1)).squeeze(1)  # (n,)
            logprobs[first:end] = chosen.cpu()
            ranks[first:end] = rank_of(lp, chosen).cpu()
            if k:
                t_ids, t_lp = top_entries(lp, k)
                top_ids[first:end], top_logprobs[first:end] = t_ids.cpu(), t_lp.cpu()
    finally:
        model.train(was_training)
    return TokenScores(ids, logprobs, ranks, top_ids, top_logprobs, seq_len, stride,
                       count_windows(N, seq_len, stride))


__all__ = ["TokenLogprobs", "TokenScores", "score", "step_logprobs"]
