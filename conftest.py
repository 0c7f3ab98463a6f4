"""Fixtures shared by test_lm.py (the model's core unit tests) and tests/ (everything else)."""

from __future__ import annotations

import pytest

TINY_CONFIG = dict(vocab_size=50257, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                   max_seq_len=32, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """Constructor arguments of a tiny model with the GPT-2 vocabulary."""
    return dict(TINY_CONFIG)
