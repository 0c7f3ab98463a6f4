"""RunState: what a snapshot saves is what resume restores (and old snapshots still read)."""

from __future__ import annotations

import numpy as np

from corpus.batches import EpochBatches
from training.run_state import RunState


def _batches(seed: int = 1, batch_size: int = 4) -> EpochBatches:
    tokens = np.arange(2000, dtype=np.uint16) % 500
    return EpochBatches(tokens, 32, batch_size, 1, 1, 0, seed)


def test_fields_round_trip():
    batches = _batches()
    state = RunState(step=7, epoch=1, batch=3, tokens_seen=896, train_time=1.5, best_val=4.25,
                     best_name="snapshot_x.pt", last_val=(4.5, 90.0, 6), last_train=4.75,
                     init_from="gpt2")
    saved = {**state.fields(batches, seed=1), "epoch": 1}
    assert RunState.from_snapshot(saved, batches, 1, say=print) == state


def test_advance_wraps_epochs_and_counts_tokens():
    batches = _batches()
    state = RunState(batch=batches.steps_per_epoch - 1)
    assert state.advance(batches) == 0  # the step belonged to epoch 0
    assert (state.step, state.epoch, state.batch) == (1, 1, 0)
    assert state.tokens_seen == batches.tokens_per_step


def test_old_snapshot_without_new_keys_and_a_changed_grid():
    """A snapshot from before RunState (no init_from, no data_position) still resumes; a changed
    batch grid maps to the nearest position and says so."""
    notes = []
    old = {"step": 5, "epoch": 0, "val_loss": 5.0, "best_val_loss": 5.0}
    state = RunState.from_snapshot(old, _batches(batch_size=2), 1, say=notes.append)
    assert (state.step, state.epoch, state.batch, state.init_from) == (5, 0, 0, None)
    assert state.last_val[0] == 5.0 and state.last_val[2] == 5 and notes
