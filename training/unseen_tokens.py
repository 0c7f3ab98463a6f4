"""`--unseen_tokens shared`: the tokens that never occur in the training split share one row.

A corpus uses a part of its tokenizer's vocabulary: Tiny Shakespeare's training split holds
11,234 of GPT-2's 50,257 tokens. With tied embeddings, a token that never occurs there is never an
input and never a target, so its row of `wte` (the LM head's weight) gets only the softmax's
gradient, p_j * h summed over positions, and AdamW treats each row on its own. Rows that start
equal therefore get equal gradients and stay equal for the whole run. If the U unseen rows all
equal u, the full-vocabulary normaliser of a position with hidden state h is

    logsumexp(h @ W_seen.T, h @ u + log U)

so the loss needs only the seen rows and one more column with a log U offset (11,235 columns
instead of 50,257 here: the head, most of a small model's step, costs 4.5x less), and the
gradient of that column is U times each unseen row's gradient. A run with the shared row is
full-vocabulary training of a model whose unseen rows start equal (at their mean): the same loss,
gradients and updates, up to float rounding (`tests/training/test_unseen_tokens.py` checks it
against the full head). The model keeps its full (V, C) matrix: snapshots, generation,
`evaluate_lm.py` and every export read it unchanged. The trainer's validation uses the same
identity, which is exact also for validation tokens that never occur in training (each gets
probability p_shared / U).

It needs a new run (`--init_from` weights have unequal unseen rows); a resumed run checks that its
unseen rows are still equal.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from training.targets import IGNORE_INDEX

_COUNT_CHUNK = 1 << 24  # tokens per bincount pass: bounded memory on a memory-mapped split


def seen_token_mask(tokens, vocab_size: int) -> np.ndarray:
    """A (vocab_size,) bool array: which ids occur in `tokens` (a 1-D array or memmap)."""
    seen = np.zeros(vocab_size, dtype=bool)
    for start in range(0, len(tokens), _COUNT_CHUNK):
        chunk = np.asarray(tokens[start:start + _COUNT_CHUNK])
        if len(chunk) and int(chunk.max()) >= vocab_size:
            raise ValueError(f"token id {int(chunk.max())} is outside the vocabulary "
                             f"({vocab_size})")
        seen |= np.bincount(chunk, minlength=vocab_size).astype(bool)
    return seen


class _SubsetRows(torch.autograd.Function):
    """`weight[columns]` forward; backward spreads the shared column's gradient over the unseen
    rows (divided by their count) and gives every seen row its own."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, subset: UnseenTokens) -> torch.Tensor:
        ctx.subset = subset
        ctx.shape = weight.shape
        return weight.index_select(0, subset.rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        subset = ctx.subset
        # Every unseen row's gradient is the shared column's over U; the seen rows' are their own.
        full = (grad[-1] / subset.num_unseen).expand(ctx.shape).contiguous()
        full.index_copy_(0, subset.seen_ids, grad[:-1])
        return full, None


class UnseenTokens:
    """The head's columns when unseen tokens share a row: the seen ids, then one unseen id.

    Attributes:
        seen_ids: (S,) the ids that occur in the training split, ascending.
        unseen_ids: (U,) the others.
        rows: (S + 1,) the weight rows the head reads: `seen_ids`, then `unseen_ids[0]`.
        num_unseen: U.
        logit_bias: (S + 1,) float32: 0, and log U for the shared column.
        column_of: (V,) each id's column: its own for a seen id, S for an unseen one.
    """

    def __init__(self, seen: np.ndarray, device: torch.device | str = "cpu") -> None:
        """Args: seen: a (V,) bool mask of the ids that occur in training, with at least one
        unseen id (`from_tokens` returns None when there is none)."""
        seen_t = torch.from_numpy(np.asarray(seen, dtype=bool))
        self.seen_ids = torch.nonzero(seen_t).squeeze(1).to(device)
        self.unseen_ids = torch.nonzero(~seen_t).squeeze(1).to(device)
        if len(self.unseen_ids) == 0:
            raise ValueError("every token occurs in the training split: nothing to share")
        self.num_unseen = len(self.unseen_ids)
        s = len(self.seen_ids)
        self.rows = torch.cat([self.seen_ids, self.unseen_ids[:1]])
        self.logit_bias = torch.zeros(s + 1, dtype=torch.float32, device=device)
        self.logit_bias[-1] = math.log(self.num_unseen)
        self.column_of = torch.full((len(seen_t),), s, dtype=torch.long, device=device)
        self.column_of[self.seen_ids] = torch.arange(s, device=device)

    @classmethod
    def from_tokens(cls, tokens, vocab_size: int, device: torch.device | str = "cpu"
                    ) -> UnseenTokens | None:
        """The sharing for a training split; None when every id of the vocabulary occurs."""
        return cls.from_seen(seen_token_mask(tokens, vocab_size), device)

    @classmethod
    def from_seen(cls, seen: np.ndarray, device: torch.device | str = "cpu"
                  ) -> UnseenTokens | None:
        """The sharing for a (V,) mask of the ids training meets; None when it holds them all."""
        return None if seen.all() else cls(seen, device)

    @property
    def columns(self) -> int:
        """Columns of the head's product: seen ids + 1."""
        return len(self.rows)

    def describe(self) -> str:
        """One line for the run's log."""
        vocab = len(self.column_of)
        return (f"unseen tokens shared: {len(self.seen_ids):,} of {vocab:,} token ids occur in "
                f"the training split; the other {self.num_unseen:,} share one row, so the LM "
                f"head computes {self.columns:,} columns instead of {vocab:,} (exact)")

    # -- the weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def equalize(self, weight: torch.Tensor) -> None:
        """Set every unseen row to the mean of the unseen rows (a new run's start)."""
        weight[self.unseen_ids] = weight[self.unseen_ids].mean(0, keepdim=True)

    @torch.no_grad()
    def rows_equal(self, weight: torch.Tensor) -> bool:
        """Whether the unseen rows are all equal (what training with the shared row keeps)."""
        unseen = weight[self.unseen_ids]
        return bool(torch.equal(unseen, unseen[:1].expand_as(unseen)))

    def head_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(S + 1, C) rows of the (V, C) head weight that the loss uses; differentiable."""
        return _SubsetRows.apply(weight, self)

    def target_columns(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as columns of the subset head (-100 stays -100)."""
        ignored = targets == IGNORE_INDEX
        return torch.where(ignored, targets, self.column_of[targets.masked_fill(ignored, 0)])

    # -- validation ------------------------------------------------------------------------------

    def nll_sum(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float | None = None) -> torch.Tensor:
        """Summed full-vocabulary negative log-likelihood of `targets` (1-D, no -100) given
        `hidden` (N, C): exact when the unseen rows of `weight` are equal. `softcap`: the
        model's `logit_softcap`, applied before the shared column's log U."""
        logits = F.linear(hidden, weight.index_select(0, self.rows)).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits + self.logit_bias
        columns = self.column_of[targets]
        nll = F.cross_entropy(logits, columns, reduction="sum")
        # An unseen target's own probability is the shared column's over U.
        unseen = (columns == len(self.seen_ids)).sum()
        return nll + unseen.to(nll.dtype) * math.log(self.num_unseen)
