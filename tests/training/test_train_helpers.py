"""The training tests' own helpers (tests/train_helpers.py)."""

from __future__ import annotations

from train_helpers import write_text


def test_write_text_is_deterministic(tmp_path):
    a = write_text(tmp_path / "a.txt", 200, seed=3).read_text()
    b = write_text(tmp_path / "b.txt", 200, seed=3).read_text()
    assert a == b and len(a.split()) == 200
