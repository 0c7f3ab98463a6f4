"""Run a script's command line many times in one child Python (one torch import for all)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Runs each case as `python <script> ARGS` inside one child process (one torch import for all
# cases): exit code from SystemExit, stdout and stderr captured, an escaping exception printed as
# a traceback.
_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
script, cases = sys.argv[1], json.loads(sys.stdin.read())
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
results = {}
for name, argv in cases.items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_many(script: Path, cases: dict[str, list], cwd: Path, **env: str) -> dict:
    """Run `script` as a command once per case, all in one child Python process.

    Returns:
        {case name: (exit code, stdout, stderr)}.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(script)],
        input=json.dumps({k: list(map(str, v)) for k, v in cases.items()}),
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},
    )
    assert proc.returncode == 0, proc.stderr
    return {k: tuple(v) for k, v in json.loads(proc.stdout).items()}


def assert_usage_errors(script: Path, cases: dict[str, tuple[list, str]], cwd: Path,
                        **env: str) -> None:
    """Each case `name: (argv, expected text)` exits 2 with exactly one stderr line,
    `<script name>: error: ...` holding the expected text, no traceback and no stdout."""
    results = run_many(script, {k: v[0] for k, v in cases.items()}, cwd, **env)
    prefix = f"{script.name}: error:"
    for name, (code, out, err) in results.items():
        expect = cases[name][1]
        assert code == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix), (name, err)
        assert expect in lines[0], (name, lines[0])
        assert out == "", (name, out)


def run_main_many(module: str, commands: list[tuple[list[str], bytes | None]], cwd: Path,
                  env: dict[str, str], timeout: float = 300) -> list[tuple[int, str, str]]:
    """`<module>.main(argv)` for each (argv, stdin bytes or None) in one child interpreter
    (each start imports torch: seconds on a busy machine); (status, stdout, stderr) of each,
    split out of the child's whole output (stdout strictly UTF-8)."""
    code = ("import io, sys, " + module + "\n"
            f"for argv, data in {commands!r}:\n"
            "    if data is not None:\n"
            "        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding='utf-8')\n"
            "    try:\n"
            f"        rc = {module}.main(argv)\n"
            "    except SystemExit as exc:\n"
            "        rc = exc.code\n"
            "    for stream in (sys.stdout, sys.stderr):\n"
            "        stream.write(f'<<rc={rc}>>\\n')\n"
            "        stream.flush()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=cwd, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()
    outs = re.split(r"<<rc=(\w+)>>\n", proc.stdout.decode("utf-8"))
    errs = re.split(r"<<rc=\w+>>\n", proc.stderr.decode("utf-8", errors="replace"))
    assert len(outs) == 2 * len(commands) + 1, proc.stderr.decode()
    return [(int(outs[2 * i + 1]), outs[2 * i], errs[i]) for i in range(len(commands))]
