"""A real `serve_lm.py` process for tests: a free port, its log read line by line, waited for
through its log and /health (events, never sleeps), stopped by the test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120  # a busy 2-core machine can take a while to import torch and load


class ServerProcess:
    """`python serve_lm.py ARGS --port 0` in the background; `url` once it is ready.

    `wait_for(pattern)` blocks until a log line (stderr) matching the regex appears after
    line `since` (default: any line so far), and returns the match.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("SERVE_LM_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "serve_lm.py"), *args, "--port", "0", "--threads", "1"],
            cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.url = self.wait_for(r"serving \S+ on (http://\S+) ").group(1)
            self.wait_for(r"INFO serve: ready: ")
            health = httpx.get(self.url + "/health", timeout=30)
            assert health.status_code == 200, health.text
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, since: int = 0, timeout: float = START_TIMEOUT_S
                 ) -> re.Match:
        regex = re.compile(pattern)
        seen = since
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._eof:
                    raise AssertionError(f"the server exited ({self.proc.poll()}) before a line "
                                         f"matching {pattern!r}:\n" + "\n".join(self.lines))
                if not self._cond.wait(timeout):
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:"
                                         "\n" + "\n".join(self.lines[-30:]))

    def wait_health(self, predicate, timeout: float = 60) -> dict:
        """GET /health until `predicate(its JSON)` holds (each answer is the next event: no
        sleeps); returns that JSON."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=timeout) as c:
            while True:
                health = c.get("/health").json()
                if predicate(health):
                    return health
                if time.monotonic() > deadline:
                    raise AssertionError(f"/health never matched within {timeout} s: {health}")

    def rss_kib(self) -> int:
        """The server's resident memory (KiB, from /proc: Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def mark(self) -> int:
        """The number of log lines so far (a `since` for `wait_for`)."""
        with self._cond:
            return len(self.lines)

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (SIGKILL if it hangs); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # 120 s: at a load average of 8-10 on 2 cores the interpreter's exit after
                # uvicorn's "Finished server process" was seen to take over 28 s
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode
