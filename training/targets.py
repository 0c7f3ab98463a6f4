"""What the losses share about targets."""

from __future__ import annotations

IGNORE_INDEX = -100  # a target no loss counts (PyTorch's cross_entropy default)
