"""Epoch-based batches: every training window once per epoch, in a seeded order.

The token stream (a split's shards joined into one sequence: `corpus.shards.TokenShards`) is
cut into `num_windows` windows of `seq_len + 1` tokens (inputs and shifted targets) that start
`seq_len` apart, from an offset drawn per epoch (so window boundaries move between epochs);
windows run across shard boundaries as they run across document boundaries. The windows are
visited in a permutation drawn from a generator seeded with (seed, epoch): the order depends on
nothing but those two numbers, which is what makes a resumed run see exactly the batches an
uninterrupted one would.

A step consumes `global_batch = batch_size * grad_accum * world_size` windows. Micro-batch `m` of
rank `r` takes windows `[(m * world_size + r) * batch_size, ... + batch_size)` of the step's
share, so ranks see disjoint data and the global batch is the same set of windows whatever the
split into ranks and micro-batches.

With a `TokenSplitter` (`--split_tokens`), each window's tokens are re-segmented
(`corpus.token_splitting`) from a generator seeded with (seed, epoch, step, micro-batch, rank):
a resumed run still sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from corpus.datasets import DataError
from corpus.shards import TokenShards
from corpus.token_splitting import TokenSplitter


class EpochBatches:
    """Deterministic epoch/step -> batch mapping over a 1-D token array.

    Args:
        tokens: token ids: a split's `TokenShards` (from `load_split`), or any 1-D array.
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch per rank.
        grad_accum: micro-batches per optimizer step.
        world_size: data-parallel ranks.
        rank: this process's rank.
        seed: the run's seed.
        splitter: re-segments every window (`--split_tokens`); None: the tokens as prepared.

    Raises:
        DataError: when the data cannot fill one window or one global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0,
                 splitter: TokenSplitter | None = None) -> None:
        self.tokens = tokens
        self.splitter = splitter
        self.seq_len, self.batch_size = seq_len, batch_size
        self.grad_accum, self.world_size, self.rank, self.seed = grad_accum, world_size, rank, seed
        n = len(tokens)
        if n < seq_len + 1:
            raise DataError(f"the training data has {n:,} tokens, shorter than one training window "
                            f"of {seq_len + 1:,}; use more text or a smaller --seq_len")
        self.num_windows = (n - 1) // seq_len
        self.slack = (n - 1) - self.num_windows * seq_len  # room to shift the window grid
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = self.num_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training data has {self.num_windows:,} windows of {seq_len} "
                            f"tokens, fewer than one global batch of {self.global_batch:,} "
                            "(batch_size x grad_accum x processes); lower them or add text")
        self._epoch: int | None = None
        self._starts: np.ndarray | None = None
        self._arange = np.arange(seq_len + 1, dtype=np.int64)

    @property
    def data_id(self) -> str | None:
        """The prepared data's identity (`TokenShards.data_id`), saved with the position."""
        return getattr(self.tokens, "data_id", None)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Start positions of all windows of `epoch`, in visiting order."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.slack + 1))
            order = rng.permutation(self.num_windows)
            self._starts = offset + order.astype(np.int64) * self.seq_len
            self._epoch = epoch
        return self._starts

    def window_starts(self, epoch: int, step_in_epoch: int, micro: int) -> np.ndarray:
        """Token positions where this rank's windows of micro-batch `micro` of that step start."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} outside epoch of {self.steps_per_epoch}")
        first = step_in_epoch * self.global_batch + (
            micro * self.world_size + self.rank) * self.batch_size
        return self.epoch_starts(epoch)[first:first + self.batch_size]

    def get(self, epoch: int, step_in_epoch: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch `micro` of step `step_in_epoch`: (inputs, targets), (B, T)."""
        starts = self.window_starts(epoch, step_in_epoch, micro)
        if isinstance(self.tokens, TokenShards):  # gathered per shard
            rows = self.tokens.windows(starts, len(self._arange)).astype(np.int64)
        else:
            rows = np.asarray(self.tokens[starts[:, None] + self._arange], dtype=np.int64)
        if self.splitter is not None:
            # its own stream: the epoch's order is drawn from [seed, epoch]
            rng = np.random.default_rng([self.seed, epoch, step_in_epoch, micro, self.rank, 1])
            rows = self.splitter.split_rows(rows, rng)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
