"""The model side of downstream evaluation, in plain torch (no lm-evaluation-harness import).

Three kinds of request, as lm-evaluation-harness defines them:

- `loglikelihoods`: log P(ending | context) for (context, ending) token pairs, and whether the
  ending is the greedy continuation. A multiple-choice question's endings share one context,
  so the context is computed once: its tokens and every ending's tokens go into one row
  ("packed"), each ending at the positions that follow the context and attending only to the
  context and to itself (a tree-shaped attention mask). The language-model head runs only where
  an ending's token is predicted. Inputs longer than the model's context are cut on the left as
  the harness's `hf` backend cuts them, `(context + ending)[-(max_len + 1):][:-1]`, and counted.
- `rolling_pairs`: the harness's rolling windows for a whole-text log-likelihood (perplexity
  tasks): the first window predicts the first `max_len` tokens after a prefix token (EOT), each
  later one the next `stride` tokens with the tokens before them as context, filled back to a
  full `max_len` (`stride == max_len`, the default, is the harness's own rule). Each window is a
  (context, ending) pair for `loglikelihoods`.
- `generate`: continuations until a stop string, the end-of-text token or a token budget, on the
  decode engine (`model/engine.py`): rows join as others finish, greedy or sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.engine import DecodeEngine
from model.sampling import Sampling

HEAD_CHUNK = 1024  # predicted positions per LM-head matmul (bounds the (n, V) logits' memory)
SOFTMAX_ROWS = 32  # logit rows per log-softmax slice (a float32 slice of 32 x 50,257: 6.4 MB)


@dataclass
class ScoringStats:
    """What the model was asked to do, for reports and for the "how many were cut" lines.

    Attributes:
        requests: (context, ending) pairs scored.
        truncated: pairs whose context was cut on the left to fit the model's context.
        endings_cut: pairs whose ending alone was longer than the context (only its last
            `max_len` tokens were scored).
        rows: packed rows run (a context and all its endings, or part of them).
        forward_passes: batched forward passes.
        tokens_run: tokens fed to the model, padding excluded.
        head_positions: positions the LM head computed (one per scored ending token).
        generated: generation requests, and `gen_truncated` of them with prompts cut on the left.
    """

    requests: int = 0
    truncated: int = 0
    endings_cut: int = 0
    rows: int = 0
    forward_passes: int = 0
    tokens_run: int = 0
    head_positions: int = 0
    generated: int = 0
    gen_truncated: int = 0

    def add(self, other: ScoringStats) -> None:
        """Add another's counts to these."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def fit_to_context(context: Sequence[int], ending: Sequence[int], max_len: int
                   ) -> tuple[list[int], list[int], int]:
    """Cut a (context, ending) pair to the model's context, as the harness's `hf` backend does.

    The model reads `(context + ending)[-(max_len + 1):][:-1]`: the context loses tokens on the
    left; an ending longer than `max_len` keeps its last `max_len` tokens after one of context.

    Returns:
        (context, ending, how): how is 0 when nothing was cut, 1 when the context was cut, 2 when
        the ending was.
    """
    context, ending = list(context), list(ending)
    full = context + ending
    if len(full) <= max_len + 1:
        return context, ending, 0
    full = full[-(max_len + 1):]
    if len(ending) <= max_len:
        return full[:len(full) - len(ending)], ending, 1
    return full[:1], full[1:], 2


@dataclass
class _Row:
    """One packed row: a context, then endings that each attend to the context and themselves."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)  # 0: the context, i: the i-th ending
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (column, token, request)


def _pack(context: list[int], endings: list[tuple[int, list[int]]]) -> _Row:
    """A row holding `context` once and every ending's tokens but its last (which is only
    predicted) at the positions after the context."""
    n = len(context)
    row = _Row(list(context), list(range(n)), [0] * n)
    for seg, (req, ending) in enumerate(endings, 1):
        row.targets.append((n - 1, ending[0], req))  # the context's last token predicts it
        start = len(row.tokens)
        for j, tok in enumerate(ending[:-1]):
            row.tokens.append(tok)
            row.positions.append(n + j)
            row.segments.append(seg)
            row.targets.append((start + j, ending[j + 1], req))
    return row


def _rows(groups: dict[tuple[int, ...], list[tuple[int, list[int]]]], cap: int) -> list[_Row]:
    """Pack each context's endings into rows of at most `cap` tokens (a context with too many
    endings for one row is repeated in the next)."""
    rows = []
    for context, endings in groups.items():
        part: list[tuple[int, list[int]]] = []
        size = len(context)
        for req, ending in endings:
            extra = len(ending) - 1
            if part and size + extra > cap:
                rows.append(_pack(list(context), part))
                part, size = [], len(context)
            part.append((req, ending))
            size += extra
        rows.append(_pack(list(context), part))
    return rows


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head (and logit soft-cap) on final hidden states (n, C) -> (n, V)."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "logit_softcap", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _run_rows(model: Any, rows: list[_Row], sums: torch.Tensor, greedy: torch.Tensor) -> None:
    """One batched forward over right-padded rows; adds each target's log-probability to
    `sums[request]` and clears `greedy[request]` where the target is not the argmax."""
    device = model.device
    B, T = len(rows), max(len(r.tokens) for r in rows)
    idx = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(rows):
        n = len(r.tokens)
        idx[b, :n] = torch.tensor(r.tokens)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segments)
    mask = None  # one ending per row: plainly causal (the padding is after every real token)
    if int(seg.max()) > 1:
        q = torch.arange(T)
        causal = q[None, :] <= q[:, None]  # [query, key]
        seg_q, seg_k = seg[:, :, None], seg[:, None, :]
        # the context, and the query's own ending; padding sees padding (never an empty row)
        mask = (causal & ((seg_k == 0) | (seg_k == seg_q)))[:, None].to(device)
    hidden = model.forward_hidden(idx.to(device), position_ids=pos.to(device), attn_mask=mask)
    where = torch.tensor([(b, col, tok, req) for b, r in enumerate(rows)
                          for col, tok, req in r.targets], dtype=torch.long)
    for start in range(0, where.size(0), HEAD_CHUNK):
        w = where[start:start + HEAD_CHUNK].to(device)
        logits = head_logits(model, hidden[w[:, 0], w[:, 1]])
        chosen, is_top = target_logprobs(logits, w[:, 2])
        req = w[:, 3].cpu()
        sums.index_add_(0, req, chosen.double().cpu())
        greedy[req[~is_top.cpu()]] = False


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: int = SOFTMAX_ROWS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits)[i, targets[i]] in float32, and whether targets[i] is the argmax
    (the first index of the largest logit, as `argmax`), for (n, V) logits of any float dtype.

    Slices of `rows` rows at a time: each slice's float32 copy stays in the CPU's cache through
    its max, exp and sum, where the whole chunk's log_softmax (a float32 copy, then a (n, V)
    output, then an argmax pass) streams several times its size through memory.
    """
    chosen = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    is_top = torch.empty(logits.size(0), dtype=torch.bool, device=logits.device)
    for i in range(0, logits.size(0), rows):
        x = logits[i:i + rows].to(torch.float32, copy=True)  # (r, V), changed in place below
        t = targets[i:i + rows, None]  # (r, 1)
        top, arg = x.max(dim=-1, keepdim=True)  # (r, 1) each
        picked = x.gather(1, t)
        lse = x.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)  # logsumexp
        chosen[i:i + rows] = (picked - lse)[:, 0]
        is_top[i:i + rows] = (arg == t)[:, 0]
    return chosen, is_top


@torch.no_grad()
def loglikelihoods(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 8, dtype: torch.dtype | None = None,
                   stats: ScoringStats | None = None, max_len: int | None = None
                   ) -> list[tuple[float, bool]]:
    """log P(ending | context) of every (context, ending) token pair, and whether the ending is
    the greedy continuation; each distinct context is computed once across its endings.

    Args:
        model: a `LanguageModel`.
        pairs: (context ids, ending ids); a context needs at least one token.
        batch_size: packed rows per forward pass.
        dtype: an autocast dtype for the forward pass (None: the weights' own).
        stats: counts are added here (truncations, rows, passes).
        max_len: the context to fit the pairs to (default and maximum: the model's).

    Returns:
        (log-likelihood, is_greedy) per pair, in order; an empty ending gives (0.0, True).

    Raises:
        ValueError: an empty context, or token ids outside the vocabulary.
    """
    max_len = model.max_seq_len if max_len is None else min(int(max_len), model.max_seq_len)
    vocab = model.config.vocab_size
    stats = stats if stats is not None else ScoringStats()
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, ending) in enumerate(pairs):
        if not context:
            raise ValueError("a log-likelihood request needs at least one token of context")
        if not ending:
            continue
        ctx, end, how = fit_to_context(context, ending, max_len)
        if min(min(ctx), min(end)) < 0 or max(max(ctx), max(end)) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) for this model")
        stats.truncated += how == 1
        stats.endings_cut += how == 2
        groups.setdefault(tuple(ctx), []).append((i, end))
    stats.requests += len(pairs)
    rows = _rows(groups, cap=2 * max_len)
    rows.sort(key=lambda r: -len(r.tokens))  # similar lengths together: little padding
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    greedy = torch.ones(len(pairs), dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                _run_rows(model, batch, sums, greedy)
                stats.forward_passes += 1
                stats.tokens_run += sum(len(r.tokens) for r in batch)
                stats.head_positions += sum(len(r.targets) for r in batch)
    finally:
        model.train(was_training)
    stats.rows += len(rows)
    return [(float(s), bool(g)) for s, g in zip(sums.tolist(), greedy.tolist(), strict=True)]


def rolling_pairs(tokens: Sequence[int], prefix_token: int, max_len: int,
                  stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """The harness's rolling windows over a text as (context, ending) pairs (module docstring).

    Args:
        tokens: the text's token ids.
        prefix_token: the token that conditions the first one (EOT, or BOS).
        max_len: the model's context.
        stride: tokens predicted per window after the first (default and maximum: max_len);
            a smaller stride gives each window more context, at more compute.

    Returns:
        Pairs whose endings cover `tokens` exactly once, in order.
    """
    stride = max_len if stride is None else int(stride)
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be between 1 and the model's context {max_len}, "
                         f"got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    pairs = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + stride)
        pairs.append((tokens[max(0, end - max_len - 1):done], tokens[done:end]))
        done = end
    return pairs


@dataclass
class GenerationRequest:
    """One continuation to generate.

    Attributes:
        prompt: its token ids (already cut to fit; at least one).
        stops: strings that end it (the text is cut before the first one).
        max_new_tokens: its token budget.
        sampling: greedy (temperature 0) or sampled settings.
    """

    prompt: list[int]
    stops: list[str]
    max_new_tokens: int
    sampling: Sampling


def _finished(tokenizer: Any, tokens: list[int], req: GenerationRequest, eot: int | None) -> bool:
    if len(tokens) >= req.max_new_tokens or (eot is not None and tokens[-1] == eot):
        return True
    text = tokenizer.decode(tokens)
    return any(s and s in text for s in req.stops)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of each stop string, applied in order (as the
    harness's backends do)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


@torch.no_grad()
def generate(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest], *,
             batch_size: int = 8, eot: int | None = None,
             stats: ScoringStats | None = None) -> list[str]:
    """Generate every request's continuation on one decode engine (rows join as others end).

    Args:
        model: a `LanguageModel`.
        tokenizer: its tokenizer (`decode`).
        requests: prompts, stops, budgets and sampling settings; a prompt plus its budget must
            fit the model's context (the caller cuts prompts).
        batch_size: rows decoded together.
        eot: the end-of-text token, which ends a row.
        stats: counts are added here.

    Returns:
        The continuations as text (special tokens dropped), cut before the first stop string.

    Raises:
        ValueError: a prompt plus its budget beyond the context, or non-finite logits.
    """
    for req in requests:
        if not 1 <= len(req.prompt) <= model.max_seq_len - req.max_new_tokens:
            raise ValueError(f"a prompt of {len(req.prompt)} tokens and {req.max_new_tokens} new "
                             f"ones do not fit the model's context of {model.max_seq_len}")
    out: list[list[int]] = [[] for _ in requests]
    pending = list(range(len(requests)))[::-1]  # popped from the end: in order
    engine = DecodeEngine(model, max_rows=max(1, min(batch_size, len(requests))))
    active: dict[int, int] = {}  # slot -> request
    try:
        while pending or active:
            while pending and engine.free_slots:
                i = pending.pop()
                req = requests[i]
                row = engine.add(torch.tensor(req.prompt), req.sampling)
                active[row.slot] = i
            step = engine.step()
            if bool(step.nonfinite.any()):
                raise ValueError("the model produced NaN or infinite logits")
            tokens = step.tokens.tolist()
            for row in engine.rows:
                i = active[row.slot]
                out[i].append(tokens[row.slot])
                if _finished(tokenizer, out[i], requests[i], eot):
                    engine.release(row)
                    del active[row.slot]
    finally:
        engine.close()
    if stats is not None:
        stats.generated += len(requests)
    return [cut_at_stops(tokenizer.decode(toks, skip_special_tokens=True), req.stops)
            for toks, req in zip(out, requests, strict=True)]
