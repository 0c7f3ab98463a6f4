"""Helpers every package and script may use: the command-line layer (cli.py: one parser with
one-line errors, range-checked argument types, the runtime flags), crash-safe writes (fileio.py)
and the bundled GPT-2 path (paths.py)."""
