"""Sampling and the generation loop behind `LanguageModel.generate`/`.stream`, the CLI and REPL.

The samplers are small pure functions on a (B, V) logits tensor. `stream` validates its arguments
at once, then returns a generator that yields the next token of every row, one (B,) tensor per
step; `generate` collects that stream into a (B, T) tensor that includes the prompt.

Batches. A prompt may be one sequence (1-D tensor, list of ints or a str) or many of different
lengths (a list of them, or a 2-D tensor). The rows decode together on a `DecodeEngine`
(`model/engine.py`, the engine the HTTP server's continuous batching runs on too): each row has
its own slot of the KV cache and its own positions, so each row gets the continuation it gets
alone. A 2-D tensor is read as the guide's batch example builds it: with more than one row,
trailing `pad_token_id` (default `model.end_token`) ids are right padding, not prompt (pass
`attention_mask` to say exactly which tokens are real). The output row is that row's prompt,
then its new tokens, right-padded with `pad_token_id` (default `end_token`, else 0) to the
batch's width.

Sliding window. The KV cache holds `W = max_seq_len` positions per row. When a row's cache is
full and another token must be fed, the model keeps the most recent `keep = W - W // 4` tokens
(the new one included), recomputes their keys and values at positions 0..keep-1, and decodes on
from there. So a token is predicted from the last `n` tokens, where `n` grows from `keep` to
`W`, then drops back to `keep`: for a sequence of `L` tokens so far (L > W),
`n = keep + (L - W - 1) % (W - keep + 1)`. The recomputation happens once every `W - keep + 1`
tokens, so decoding past the window stays fast. Each row's window moves on its own, so in a
ragged batch too a row's context is the one it has alone.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits, so no token can be sampled; one-line message."""


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


_ENDLESS = 2**62  # budgets past this are endless in practice, and must fit a torch int64


# -- argument handling ----------------------------------------------------------------------------


@dataclass
class _Plan:
    rows: list[torch.Tensor]  # 1-D CPU prompts, padding removed
    budgets: list[int]  # new tokens allowed per row
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    generator: torch.Generator | None
    end_token: int | None
    pad_id: int
    compile: bool
    top_logprobs: int | None = None  # record log-probabilities with this many alternatives


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _encode_strings(model, texts: Sequence[str]) -> list[torch.Tensor]:
    tok = model.tokenizer
    if tok is None:
        from model.tokenizer import load_tokenizer

        tok = load_tokenizer()
    return [torch.tensor(tok.encode(t), dtype=torch.long) for t in texts]


def _as_row(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"prompt must hold integer token ids, got dtype {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"each prompt of a list must be 1-D, got shape {tuple(x.shape)}")
        return x.detach().to("cpu", torch.long)
    if isinstance(x, (list, tuple)) and all(_is_int(t) for t in x):
        return torch.tensor([int(t) for t in x], dtype=torch.long)
    raise ValueError("prompt must be token ids (tensor or list of ints), a str, or a list of them")


def _prompt_rows(model, prompt: Any, pad_id: int | None, attention_mask: Any) -> list[torch.Tensor]:
    if isinstance(prompt, str):
        return _encode_strings(model, [prompt])
    if isinstance(prompt, (list, tuple)):
        if len(prompt) == 0:
            raise ValueError("prompt is empty: give at least one token")
        if all(isinstance(p, str) for p in prompt):
            return _encode_strings(model, prompt)
        if all(_is_int(t) for t in prompt):
            return [_as_row(prompt)]
        return [_as_row(p) for p in prompt]
    if not isinstance(prompt, torch.Tensor):
        raise ValueError(f"prompt must be a tensor, a list of token ids or a str, not "
                         f"{type(prompt).__name__}")
    if prompt.dtype == torch.bool or prompt.dtype.is_floating_point or prompt.dtype.is_complex:
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.dim() == 1:
        return [prompt.detach().to("cpu", torch.long)]
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be 1-D (T,) or 2-D (B, T), got shape {tuple(prompt.shape)}")
    batch = prompt.detach().to("cpu", torch.long)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask).to("cpu").bool()
        if mask.shape != batch.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != prompt shape "
                             f"{tuple(batch.shape)}")
        return [row[m] for row, m in zip(batch, mask, strict=True)]
    rows = list(batch)
    if pad_id is not None and len(rows) > 1:  # right padding, as in the guide's batch example
        for i, row in enumerate(rows):
            n = row.numel()
            while n > 1 and int(row[n - 1]) == pad_id:
                n -= 1
            rows[i] = row[:n]
    return rows


def _plan(model, prompt, max_length, temperature, top_k, top_p, max_new_tokens, do_sample,
          repetition_penalty, seed, generator, pad_token_id, attention_mask, compile,
          return_logprobs=False, top_logprobs=5) -> _Plan:
    if not _is_real(temperature) or math.isnan(temperature) or temperature < 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not _is_real(repetition_penalty) or not (0.0 < repetition_penalty < math.inf):
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 = off), got "
                         f"{repetition_penalty!r}")
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens is None and not _is_int(max_length):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(return_logprobs, bool):
        raise ValueError(f"return_logprobs must be True or False, got {return_logprobs!r}")
    if not _is_int(top_logprobs) or top_logprobs < 0:
        raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")

    if compile and getattr(model, "quantization", "none") != "none":
        raise ValueError(f"compile=True decodes with the float32 weights, but the model is set "
                         f"to {model.quantization} (quantize); drop compile or call "
                         f"model.quantize('none')")

    end_token = model.end_token
    pad_id = pad_token_id if pad_token_id is not None else end_token
    rows = _prompt_rows(model, prompt, pad_id, attention_mask)
    V, W = model.config.vocab_size, model.max_seq_len
    for row in rows:
        if row.numel() == 0:
            raise ValueError("prompt is empty: give at least one token")
        if row.numel() > W:
            raise ValueError(f"prompt has {row.numel()} tokens but the model's context "
                             f"(max_seq_len) is {W}: keep the last {W} or fewer tokens")
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {lo if lo < 0 else hi}")
    longest = max(r.numel() for r in rows)
    if max_new_tokens is not None:
        budgets = [min(int(max_new_tokens), _ENDLESS)] * len(rows)
    else:
        if max_length <= longest:
            raise ValueError(f"max_length ({max_length}) must be greater than the prompt length "
                             f"({longest} tokens); it counts prompt plus generated tokens")
        budgets = [min(int(max_length), _ENDLESS) - r.numel() for r in rows]

    device = model.device
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError("generator must be a torch.Generator")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}")
    elif seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    greedy = temperature == 0 or not do_sample
    return _Plan(rows, budgets, 0.0 if greedy else float(temperature), top_k, top_p,
                 float(repetition_penalty), generator, end_token,
                 pad_id if pad_id is not None else 0, bool(compile),
                 int(top_logprobs) if return_logprobs else None)


# -- the loop -------------------------------------------------------------------------------------


@torch.no_grad()
def _loop(model, plan: _Plan, check_every: int) -> Iterator[Any]:
    """Yield each step's (B,) tokens, or (tokens, TokenLogprobs) when the plan records them.

    The rows run on a `DecodeEngine` of their own (`model/engine.py`), all sampled by one
    sampler call per step from the plan's generator. A row that has finished stays in the batch
    (its tokens are replaced by the pad id) until every row has, so the generator draws the same
    numbers for the others whenever a row ends.
    """
    from model.engine import DecodeEngine, Sampling

    device = model.device
    B = len(plan.rows)
    budgets = torch.tensor(plan.budgets, device=device)
    steps = max(plan.budgets)
    stops_early = plan.end_token is not None or min(plan.budgets) != steps
    # NaN/inf logits (broken weights, or a float16 overflow) would sample garbage silently. The
    # engine flags them per row on the device; the flag is read where the loop syncs anyway.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def check_finite(step: int) -> None:
        if bool(nonfinite):
            raise NonFiniteLogitsError(
                f"the model produced non-finite logits (NaN or inf) by new token {step + 1}: its "
                "weights are broken (a diverged checkpoint?) or --dtype float16 overflowed")

    sampling = Sampling(plan.temperature, plan.top_k, plan.top_p, plan.repetition_penalty,
                        plan.generator, plan.top_logprobs)
    engine = DecodeEngine(model, B, compile=plan.compile)
    try:
        for row in plan.rows:
            engine.add(row, sampling)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(steps):
            out = engine.step()
            tok = out.tokens
            nonfinite |= out.nonfinite.any()
            if step % check_every == 0 or step == steps - 1:
                check_finite(step)
            if plan.top_logprobs is not None:
                probs = out.records[0][1]
                if stops_early:
                    probs = probs.blank(finished)  # a finished row's step is padding
            if stops_early:
                tok = tok.masked_fill(finished, plan.pad_id)
                finished |= budgets <= step + 1
                if plan.end_token is not None:
                    finished |= tok == plan.end_token
            if plan.top_logprobs is not None:
                probs.tokens = tok
                yield tok, probs
            else:
                yield tok
            if stops_early and (step + 1) % check_every == 0 and bool(finished.all()):
                check_finite(step)
                break
    finally:
        engine.close()


def stream(model, prompt: Any, max_length: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, *,
           max_new_tokens: int | None = None, do_sample: bool = True,
           repetition_penalty: float = 1.0, seed: int | None = None,
           generator: torch.Generator | None = None, pad_token_id: int | None = None,
           attention_mask: Any = None, compile: bool = False, return_logprobs: bool = False,
           top_logprobs: int = 5) -> Iterator[Any]:
    """Validate the arguments now; return an iterator of (B,) next-token tensors, one per step.

    Rows that have finished (sampled `model.end_token`, or used their budget) yield the pad id.
    The iterator ends when every row has finished. Arguments as in `generate`; with
    `return_logprobs=True` each step yields `(tokens, TokenLogprobs)` instead, the record's
    tensors (B,) and (B, top_logprobs), NaN for finished rows (see `model.scoring`).
    """
    plan = _plan(model, prompt, max_length, temperature, top_k, top_p, max_new_tokens, do_sample,
                 repetition_penalty, seed, generator, pad_token_id, attention_mask, compile,
                 return_logprobs, top_logprobs)
    return _loop(model, plan, check_every=1)


def generate(model, prompt: Any, max_length: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, *,
             max_new_tokens: int | None = None, do_sample: bool = True,
             repetition_penalty: float = 1.0, seed: int | None = None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             attention_mask: Any = None, compile: bool = False, return_logprobs: bool = False,
             top_logprobs: int = 5) -> Any:
    """Generate continuations; returns (B, T) token ids on the model's device, prompt included.

    Args:
        model: a `LanguageModel`.
        prompt: a 1-D tensor / list of ids / str (one row), or a 2-D tensor / list of those.
        max_length: prompt plus generated tokens per row (ignored if `max_new_tokens` is set).
        temperature: divides the logits; 0 means greedy.
        top_k: keep the k most likely tokens (None: all).
        top_p: keep the smallest set of tokens with probability >= top_p (None: all).
        max_new_tokens: new tokens per row, instead of `max_length`.
        do_sample: False for greedy decoding whatever the temperature.
        repetition_penalty: CTRL's penalty on tokens already present (1.0: off).
        seed: seed for a fresh generator on the model's device, for reproducible samples.
        generator: a `torch.Generator` to draw from (wins over `seed`).
        pad_token_id: id of padding, in a 2-D prompt and in the output (default: end_token, else 0).
        attention_mask: for a 2-D prompt, 1 where a token is real (default: strip right padding).
        compile: decode with a static-shape step compiled by `torch.compile` (CUDA graphs on
            CUDA); worth it for long generations on a GPU.
        return_logprobs: also return the chosen tokens' log-probabilities and the likeliest
            alternatives, under the sampling and the raw model distribution.
        top_logprobs: how many alternatives `return_logprobs` keeps per step.

    Returns:
        The (B, T) ids; with `return_logprobs`, `(ids, TokenLogprobs)` whose tensors are
        (B, n) and (B, n, top_logprobs) over the n new-token columns, NaN past a row's end.

    Raises:
        ValueError: naming the argument, for any invalid value or prompt.
    """
    plan = _plan(model, prompt, max_length, temperature, top_k, top_p, max_new_tokens, do_sample,
                 repetition_penalty, seed, generator, pad_token_id, attention_mask, compile,
                 return_logprobs, top_logprobs)
    check_every = 1 if model.device.type == "cpu" else 8  # each check is a device sync
    new = list(_loop(model, plan, check_every))
    probs = None
    if plan.top_logprobs is not None:
        from model.scoring import TokenLogprobs

        new, steps = [t for t, _ in new], [p for _, p in new]
        probs = TokenLogprobs.stack([p.cpu() for p in steps])
    gen = torch.stack(new, dim=1).cpu()  # (B, n)
    lens, n = [r.numel() for r in plan.rows], gen.size(1)
    used = []
    for b in range(len(plan.rows)):
        k = min(plan.budgets[b], n)
        if plan.end_token is not None:
            hits = (gen[b, :k] == plan.end_token).nonzero()
            if hits.numel():
                k = int(hits[0]) + 1  # the end token is part of the output
        used.append(k)
    width = max(length + k for length, k in zip(lens, used, strict=True))
    out = torch.full((len(plan.rows), width), plan.pad_id, dtype=torch.long)
    for b, row in enumerate(plan.rows):
        out[b, :lens[b]] = row
        out[b, lens[b]:lens[b] + used[b]] = gen[b, :used[b]]
    if probs is not None:  # aligned with the new tokens: NaN past each row's end
        n_used = max(used)
        past_end = torch.arange(n_used)[None, :] >= torch.tensor(used)[:, None]  # (B, n_used)
        return out.to(model.device), probs.index(slice(None), slice(0, n_used)).blank(past_end)
    return out.to(model.device)
