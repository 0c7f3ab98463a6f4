"""lm-evaluation-harness's own command line, with this repo's model registered as `small-lm`.

    small-lm-eval --model small-lm --model_args checkpoint=lm_x/snapshots/latest.pt \
        --tasks hellaswag --limit 200            # after: pip install -e ".[eval]"
    python -m downstream.cli --model small-lm --model_args checkpoint=lm_x --tasks arc_easy

Every flag is the harness's (`lm_eval --help`). The harness (0.4.13) has no plugin mechanism
for models: its `lm_eval` command knows only the models in its own source, so this command is
`lm_eval` with `small-lm` added. The package also declares the model under the entry-point group
`lm_eval.models` for harness versions that read it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the harness's command line with `small-lm` registered; returns the exit status."""
    try:
        import downstream.harness  # noqa: F401 - registers the model
    except ValueError as exc:  # the harness is not installed
        print(f"small-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
