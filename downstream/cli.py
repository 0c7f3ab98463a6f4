"""lm-evaluation-harness's own command line, with this repo's model registered as `small-lm`.

    small-lm-eval --model small-lm --model_args checkpoint=lm_x/snapshots/latest.pt \
        --tasks hellaswag --limit 200            # after: pip install -e ".[eval]"
    python -m downstream --model small-lm --model_args checkpoint=lm_x --tasks arc_easy

Every flag is the harness's (`lm_eval --help`). The harness's releases up to 0.4.13 (the newest
on PyPI, and the version pinned here) have no plugin mechanism for models: `lm_eval` knows only
the models listed in its own source (`lm_eval/models/__init__.py`), reads no entry points and
imports nothing named by a flag or an environment variable, so `lm_eval --model small-lm` stops
with "no model for this name found". This command is `lm_eval` with `small-lm` registered. The
package also declares the model under the entry-point group `lm_eval.models`, the group that the
harness's pull request #4013 (merged upstream after 0.4.13) reads: with a release that has it,
plain `lm_eval --model small-lm` works once the repo is pip-installed.
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
