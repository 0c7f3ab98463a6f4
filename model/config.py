"""`LMConfig`: the hyper-parameters of `model.lm.LanguageModel`, as stored in checkpoints.

A module of its own (no torch) so that the Hugging Face mapping (`model/hf_interop.py`) and the
checkpoint readers can describe a network without importing the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any


@dataclass
class LMConfig:
    """Hyper-parameters of `LanguageModel`; stored in checkpoints as a plain dict (`to_dict`)."""

    vocab_size: int = 50257
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    d_ff: int = 512
    max_seq_len: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, Real) or not (0.0 <= p < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        self.dropout = float(p)

    def to_dict(self) -> dict[str, Any]:
        """The constructor's keyword arguments as a plain dict (safe for `weights_only` loads)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Build a config from a dict with exactly the constructor's keys.

        Raises:
            ValueError: naming unknown or missing keys, or an invalid value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"model_config must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(
                f"model_config keys do not match: unknown {unknown}, missing {missing}"
            )
        return cls(**d)
