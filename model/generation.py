"""The generation loop behind `LanguageModel.generate`/`.stream`, the CLI and the REPL.

The samplers and the sampling settings live in `model/sampling.py`. `stream` validates its
arguments at once, then returns a generator that yields the next token of every row, one (B,)
tensor per step; `generate` collects that stream into a (B, T) tensor that includes the prompt.

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from model.engine import DecodeEngine
from model.logprobs import TokenLogprobs
from model.sampling import Sampling


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits, so no token can be sampled; one-line message."""


_ENDLESS = 2**62  # budgets past this are endless in practice, and must fit a torch int64


# -- argument handling ----------------------------------------------------------------------------


@dataclass
class _Plan:
    rows: list[torch.Tensor]  # 1-D CPU prompts, padding removed
    budgets: list[int]  # new tokens allowed per row
    sampling: Sampling  # shared by every row: one sampler call per step
    end_token: int | None
    pad_id: int
    compile: bool


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
    """Check `generate`'s arguments (the sampling ones by `Sampling`) and plan the rows; a seed
    becomes a generator on the model's device when the engine adds the rows."""
    if not isinstance(return_logprobs, bool):
        raise ValueError(f"return_logprobs must be True or False, got {return_logprobs!r}")
    if top_logprobs is None:  # always an int here (None would mean "don't record")
        raise ValueError("top_logprobs must be an integer >= 0, got None")
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, generator, top_logprobs,
                        seed)
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens is None and not _is_int(max_length):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")

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
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")
    if not do_sample:
        sampling.temperature = 0.0
    if not return_logprobs:
        sampling.top_logprobs = None
    return _Plan(rows, budgets, sampling, end_token, pad_id if pad_id is not None else 0,
                 bool(compile))


# -- the loop -------------------------------------------------------------------------------------


@torch.no_grad()
def _loop(model, plan: _Plan, check_every: int) -> Iterator[Any]:
    """Yield each step's (B,) tokens, or (tokens, TokenLogprobs) when the plan records them.

    The rows run on a `DecodeEngine` of their own (`model/engine.py`), all sampled by one
    sampler call per step from the plan's generator. A row that has finished stays in the batch
    (its tokens are replaced by the pad id) until every row has, so the generator draws the same
    numbers for the others whenever a row ends.
    """
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

    records = plan.sampling.top_logprobs is not None
    engine = DecodeEngine(model, B, compile=plan.compile)
    try:
        for row in plan.rows:
            engine.add(row, plan.sampling)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(steps):
            out = engine.step()
            tok = out.tokens
            nonfinite |= out.nonfinite.any()
            if step % check_every == 0 or step == steps - 1:
                check_finite(step)
            if records:
                probs = out.records[0][1]
                if stops_early:
                    probs = probs.blank(finished)  # a finished row's step is padding
            if stops_early:
                tok = tok.masked_fill(finished, plan.pad_id)
                finished |= budgets <= step + 1
                if plan.end_token is not None:
                    finished |= tok == plan.end_token
            if records:
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
            CUDA; on CPU one graph per power-of-two bucket of cache lengths, each compiled once
            per process); worth it for long generations, and on CPU for long-running ones.
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
    if plan.sampling.top_logprobs is not None:
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
