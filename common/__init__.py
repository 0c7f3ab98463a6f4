"""Helpers every package and script may use: crash-safe writes, the one-line-error parser."""
