"""The trainer's usage error (its own module, so that every part can raise it)."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag or flag combination; reported as one line with exit status 2."""
