#!/usr/bin/env python
"""Training tokens/s of this checkout next to an earlier revision's, same machine, same run.

    python bench/training_before_after.py                       # vs the last GPT-2-only commit
    python bench/training_before_after.py --before <rev> --rounds 5 --iters 10

Checks that a change to the model code (for instance the architecture fields of `LMConfig`)
does not slow the default GPT-2 blocks down. The revision is checked out into a temporary git
worktree; `bench/training.py` (nanoGPT's Shakespeare config on a CPU, our step as `train_lm.py`
runs it) then runs in each tree in turn, `--rounds` times, alternating before/after so that a
change in machine load hits both; the median of each tree's rounds is reported, with every
round's figure. Each run is its own process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name  # noqa: E402

# main before the architecture fields landed (GPT-2 blocks only)
DEFAULT_BEFORE = "6bceec6"


def run_once(tree: Path, iters: int, out: Path) -> float:
    """Tokens/s of our training step in `tree` (one `bench/training.py` process)."""
    subprocess.run([sys.executable, str(tree / "bench" / "training.py"), "--device", "cpu",
                    "--iters", str(iters), "--no_compile", "--json", str(out)],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    ours = [r for r in rows if r["step"].startswith("ours")]
    return float(ours[0]["tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=DEFAULT_BEFORE, help="the git revision to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8, help="timed steps per bench/training.py run")
    args = p.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before_tree), rev],
                       cwd=ROOT, check=True)
        try:
            figures: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(args.rounds):
                for name, tree in (("before", before_tree), ("after", ROOT)):
                    figures[name].append(run_once(tree, args.iters, Path(tmp) / f"{name}.json"))
                print(f"round {i + 1}: before {figures['before'][-1]:,.0f} tokens/s, after "
                      f"{figures['after'][-1]:,.0f} tokens/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT,
                           check=False)
    b, a = statistics.median(figures["before"]), statistics.median(figures["after"])
    print(f"CPU: {cpu_name()}; bench/training.py (nanoGPT's Shakespeare config, our step, "
          f"GPT-2 blocks), median of {args.rounds} alternating rounds of {args.iters} steps")
    print(f"before ({rev}): {b:,.0f} tokens/s | after ({head}): {a:,.0f} tokens/s | "
          f"after/before {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
