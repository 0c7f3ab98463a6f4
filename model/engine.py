"""The decode engine: rows that join and leave a batch between steps (continuous batching).

`DecodeEngine` is what every generation runs on: `model.generate`/`.stream` (one batch of rows
added together, `model/generation.py`) and the HTTP server's scheduler (`serve/scheduler.py`,
rows of different requests added and released while others decode). Its shape is vLLM's:

    engine = DecodeEngine(model, max_rows=8)
    row = engine.add(prompt_ids, Sampling(temperature=0.8, top_p=0.9))
    out = engine.step()          # one new token for every row: out.tokens[row.slot]
    engine.release(row)          # at any time; its slot is free for the next `add`

Each row owns a slot of the model's KV cache and its own position, so a row decodes exactly
as it would alone, whatever else is in the batch (up to floating-point rounding). A step:

1. feeds the token each row sampled at the previous step (one batched forward pass; rows at
   different lengths attend through a mask), or, for a row whose cache is full, recomputes its
   sliding window (the policy in `model/generation.py`);
2. prefills the rows added since (one batched pass over their right-padded prompts);
3. samples the next token of every row with the samplers of `model/sampling.py`.

Rows that share one `Sampling` object (settings and random generator) are sampled by one call,
in slot order: `generate`'s batch draws from one generator, as before. Rows with different
settings or generators are sampled group by group, so a seeded row draws the same numbers alone
or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model.logprobs import TokenLogprobs, step_logprobs
from model.sampling import Sampling, apply_repetition_penalty, sample

__all__ = ["DecodeEngine", "Row", "Sampling", "Step"]  # Sampling: re-exported (model/sampling.py)


@dataclass(eq=False)
class Row:
    """One sequence in the engine. `slot` indexes the KV cache and every step's tensors."""

    slot: int
    prompt: torch.Tensor  # 1-D CPU ids
    sampling: Sampling
    length: int = 0  # tokens held in its cache (0 until prefilled)
    fed: bool = False  # it has a sampled token waiting to be fed
    active: bool = True


@dataclass
class Step:
    """What one step produced, indexed by slot.

    Attributes:
        tokens: (n,) the next token of every slot below n (idle slots hold junk); on the
            model's device.
        nonfinite: (n,) bool, True where a row's logits held NaN or inf (its token is junk).
        records: `(rows, TokenLogprobs)` per sampling group that records log-probabilities,
            the record's tensors indexed like `rows` (see `model.logprobs.step_logprobs`).
    """

    tokens: torch.Tensor
    nonfinite: torch.Tensor
    records: list[tuple[list[Row], TokenLogprobs]] = field(default_factory=list)


def _attention_backends(device: torch.device):
    """On CUDA, attention kernels without cuDNN's: it prepares a new plan for every new cache
    length (about 40 ms each in bf16 on an H200), which made eager decoding 30x slower."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _static_step(model, tok, input_pos, position_ids, attn_mask):
    """One decode step with static shapes (whole cache, masked): the function we compile."""
    return model.forward_cached(tok, input_pos=input_pos, position_ids=position_ids,
                                attn_mask=attn_mask, last_only=True)[:, -1]


def _compiled_step(model):
    """The model's compiled static decode step, compiled on first use and kept on the model.

    One graph per shape (`dynamic=False`): on CPU the keys attended are a bucket of the cache
    (`attention_width`), so a new bucket compiles once more. The graph multiplies by the CPU
    decode copies of the weights (`model.lm.Linear`) without checking that they are current:
    every row's prefill runs eagerly first, and that remakes a copy whose weight has changed.
    """
    step_fn = getattr(model, "_compiled_step", None)
    if step_fn is None:
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        step_fn = torch.compile(_static_step, mode=mode, fullgraph=True, dynamic=False)
        model._compiled_step = step_fn
    return step_fn


def attention_width(needed: int, cache_len: int, device: torch.device) -> int:
    """Keys the compiled step attends to when the longest row needs `needed`: the whole cache
    on CUDA (one graph, CUDA graphs need fixed shapes), else the next power of two from 128
    up to the cache, so that a short sequence does not read and mask the whole cache, at the
    cost of one compile per bucket."""
    if device.type == "cuda":
        return cache_len
    width = 128
    while width < needed:
        width *= 2
    return min(width, cache_len)


class DecodeEngine:
    """Decode up to `max_rows` sequences together; rows join (`add`) and leave (`release`)
    between steps. See the module docstring.

    Args:
        model: a `LanguageModel`; it is put in eval mode while the engine is open (`close`
            restores it) and its KV cache is sized to `max_rows` (freed by `close` if the
            engine allocated it).
        max_rows: slots in the KV cache.
        compile: decode with the static-shape step compiled by `torch.compile` (every slot is
            computed at every step, so the shapes never change).
    """

    def __init__(self, model: Any, max_rows: int, compile: bool = False) -> None:
        self.model = model
        self.max_rows = int(max_rows)
        self.device = model.device
        self.W = model.max_seq_len
        self.keep = max(1, self.W - self.W // 4)  # the sliding window's kept tokens
        self.V = model.config.vocab_size
        self._step_fn = _compiled_step(model) if compile else None
        self._was_training = model.training
        self._owns_cache = not model.has_cache()
        model.eval()
        model.setup_cache(self.max_rows)
        self.slots: list[Row | None] = [None] * self.max_rows
        # The tokens of each row's cache (for the sliding window) and its last sampled token.
        self.ctx = torch.zeros((self.max_rows, self.W), dtype=torch.long, device=self.device)
        self.last = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        self.seen: torch.Tensor | None = None  # (max_rows, V) bool, for repetition penalties
        self.steps = 0  # steps run so far
        self.closed = False

    # -- rows ------------------------------------------------------------------------------------

    @property
    def rows(self) -> list[Row]:
        """The active rows, in slot order."""
        return [r for r in self.slots if r is not None]

    @property
    def free_slots(self) -> int:
        """How many more rows `add` can take now."""
        return sum(r is None for r in self.slots)

    def add(self, prompt: torch.Tensor, sampling: Sampling) -> Row:
        """Add a row; it is prefilled and gets its first token at the next `step`.

        Args:
            prompt: 1-D token ids, 1 to `max_seq_len` of them, within the vocabulary.
            sampling: its settings; rows sharing the object are sampled together.

        Raises:
            RuntimeError: no free slot.
        """
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise RuntimeError(f"all {self.max_rows} rows of the engine are in use") from None
        row = Row(slot, prompt.detach().to("cpu", torch.long).reshape(-1), sampling)
        if not 1 <= row.prompt.numel() <= self.W:
            raise ValueError(f"a row needs 1 to {self.W} prompt tokens, got {row.prompt.numel()}")
        sampling.generator_on(self.device)  # a seeded row gets its generator now
        self.slots[slot] = row
        if sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros((self.max_rows, self.V), dtype=torch.bool,
                                        device=self.device)
            self.seen[slot] = False
            self.seen[slot, row.prompt.to(self.device)] = True
        return row

    def release(self, row: Row) -> None:
        """Remove a row (finished, or its consumer went away); its slot is free at once."""
        if row.active:
            row.active = False
            self.slots[row.slot] = None

    def close(self) -> None:
        """Release every row, restore the model's mode and free a cache the engine allocated."""
        if self.closed:
            return
        self.closed = True
        for row in self.rows:
            self.release(row)
        self.model.train(self._was_training)
        if self._owns_cache:
            self.model.free_kv_cache()

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> Step:
        """Feed, prefill, sample: one new token for every active row (see the module docstring).

        Raises:
            RuntimeError: no active rows.
        """
        rows = self.rows
        if not rows:
            raise RuntimeError("the engine has no rows to step")
        n = self.max_rows if self._step_fn is not None else rows[-1].slot + 1
        feed = [r for r in rows if r.fed and r.length < self.W]
        window = [r for r in rows if r.fed and r.length >= self.W]
        new = [r for r in rows if not r.fed]
        logits = self._feed(feed, n) if feed else None
        if window or new:
            logits = self._prefill(window, new, n, logits)
        if logits.dtype != torch.float32:  # bf16/fp16 models sample in float32
            logits = logits.float()
        # NaN/inf logits (broken weights, a float16 overflow) would sample garbage silently.
        nonfinite = ~torch.isfinite(logits.sum(dim=-1))  # (n,): one reduction per row
        # Those rows are sampled from zeros (the caller raises for them). On CPU the test is
        # free; elsewhere it would be a device sync every step (generate checks every 8 steps),
        # so the fill runs unconditionally there (a no-op for finite rows).
        if logits.device.type != "cpu" or bool(nonfinite.any()):
            logits = logits.masked_fill(nonfinite[:, None], 0.0)
        tokens, records = self._sample(logits, rows, n)
        self.last[:n] = tokens
        for r in rows:
            r.fed = True
        self.steps += 1
        return Step(tokens, nonfinite, records)

    def _feed(self, feed: list[Row], n: int) -> torch.Tensor:
        """One decode forward over slots [0, n): each fed row's last token at its position; other
        slots run a harmless dummy token at position 0 (a slot being prefilled this step is
        overwritten after). Returns (n, V) logits."""
        device = self.device
        lengths = [0] * n
        for r in feed:
            lengths[r.slot] = r.length
        tok = self.last[:n].clone()
        same = len(feed) == n and min(lengths) == max(lengths)
        if same:
            self.ctx[:n, lengths[0]] = tok
        else:
            pos = torch.tensor(lengths, device=device)
            self.ctx[torch.arange(n, device=device), pos] = tok
        if self._step_fn is not None:
            pos = torch.tensor(lengths, device=device)
            S = attention_width(max(lengths) + 1, self.W, device)
            mask = (torch.arange(S, device=device)[None, :] <= pos[:, None])[:, None, None]
            logits = self._step_fn(self.model, tok[:, None], pos, pos[:, None], mask)
        elif same:  # every row at the same length: no mask (the fast path of equal prompts)
            with _attention_backends(device):
                logits = self.model.forward_cached(tok[:, None], input_pos=lengths[0],
                                                   last_only=True)[:, -1]
        else:
            S = max(lengths) + 1
            mask = (torch.arange(S, device=device)[None, :] <= pos[:, None])[:, None, None]
            with _attention_backends(device):
                logits = self.model.forward_cached(
                    tok[:, None], input_pos=pos, position_ids=pos[:, None], attn_mask=mask,
                    last_only=True)[:, -1]
        for r in feed:
            r.length += 1
        return logits

    def _prefill(self, window: list[Row], new: list[Row], n: int,
                 logits: torch.Tensor | None) -> torch.Tensor:
        """Prefill the new rows and recompute the windows of full rows, in one batched forward
        over their right-padded tokens; their logits go into `logits` (n, V) at their slots."""
        device = self.device
        seqs: list[torch.Tensor] = []
        for r in window:  # the most recent keep - 1 tokens, then the one just sampled
            seqs.append(torch.cat([self.ctx[r.slot, self.W - self.keep + 1:],
                                   self.last[r.slot:r.slot + 1]]))
        seqs += [r.prompt.to(device) for r in new]
        group = window + new
        lens = [s.numel() for s in seqs]
        T = max(lens)
        idx = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            idx[i, :lens[i]] = s
        slots = [r.slot for r in group]
        if sorted(slots) == list(range(min(slots), min(slots) + len(slots))) and \
                slots == sorted(slots):
            cache_rows: slice | torch.Tensor = slice(slots[0], slots[0] + len(slots))
        else:
            cache_rows = torch.tensor(slots, device=device)
        with _attention_backends(device):
            out = self.model.forward_cached(
                idx, input_pos=0, cache_rows=cache_rows,
                logits_at=None if min(lens) == T else torch.tensor(lens, device=device) - 1,
                last_only=True)[:, -1]
        for i, r in enumerate(group):
            self.ctx[r.slot, :lens[i]] = seqs[i]
            r.length = lens[i]
        if logits is None:
            if len(group) == n and slots == list(range(n)):
                return out
            logits = torch.zeros((n, out.size(-1)), dtype=out.dtype, device=device)
        logits[torch.tensor(slots, device=device)] = out.to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[Row], n: int):
        """The next token of every row, one sampler call per `Sampling` group."""
        groups: dict[int, list[Row]] = {}
        for r in rows:
            groups.setdefault(id(r.sampling), []).append(r)
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        records = []
        for members in groups.values():
            s = members[0].sampling
            whole = len(members) == n  # every slot, in order: no gather
            idx = None if whole else torch.tensor([r.slot for r in members], device=self.device)
            raw = logits if whole else logits.index_select(0, idx)
            lg = raw
            if s.repetition_penalty != 1.0:
                seen = self.seen[:n] if whole else self.seen.index_select(0, idx)
                lg = apply_repetition_penalty(raw, seen, s.repetition_penalty)
            tok = sample(lg, s.temperature, s.top_k, s.top_p, s.generator)
            if s.top_logprobs is not None:
                records.append((members, step_logprobs(raw, lg, tok, s.temperature, s.top_k,
                                                       s.top_p, s.top_logprobs)))
            if s.repetition_penalty != 1.0:
                if whole:
                    self.seen[:n].scatter_(1, tok[:, None], True)
                else:
                    self.seen[idx, tok] = True
            if whole:
                tokens = tok
            else:
                tokens[idx] = tok
        return tokens, records
