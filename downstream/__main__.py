"""`python -m downstream`: the harness's command line with `small-lm` registered, the same as
the `small-lm-eval` script (`downstream/cli.py`), without installing the repo."""

import sys

from downstream.cli import main

sys.exit(main())
