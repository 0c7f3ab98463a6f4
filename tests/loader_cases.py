"""Helpers of the checkpoint-loader tests (tests/model/test_checkpoint_loader.py and
tests/cli/test_hostile_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_model


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg

