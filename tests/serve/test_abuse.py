"""The server under abuse (issue 32), as real processes: bounded work per request, the time
limit, 413 for oversized bodies read by a send-then-read client, graceful shutdown under load,
and a short soak (`bench/soak.py`).

Waits are on events (a log line, a response, /health's state), never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
from serving import REPO, ServerProcess

from serve.limits import MAX_REQUEST_TOKENS, MAX_TOKENS_LIMIT

pytestmark = pytest.mark.xdist_group("serve")
BIG = ("--max_tokens_limit", "1000000", "--max_request_tokens", "10000000")


def _stop(srv: ServerProcess) -> None:
    status = srv.stop()
    log = srv.log_text()
    assert "Traceback" not in log, log
    assert status == 0, log


@pytest.fixture(scope="module")
def limited(endless_checkpoint):
    """A server with small limits: 64 new tokens per choice, 300 tokens per request."""
    srv = ServerProcess("--checkpoint", str(endless_checkpoint), "--max_batch", "4",
                        "--max_tokens_limit", "64", "--max_request_tokens", "300",
                        "--no_access_log")
    yield srv
    _stop(srv)


def _post(srv: ServerProcess, **body) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", json={"model": "endless", **body}, timeout=60)


def test_the_default_limits():
    assert (MAX_TOKENS_LIMIT, MAX_REQUEST_TOKENS) == (4096, 65536)  # as docs/serving.md says


def test_each_limit_gets_its_400_and_a_request_at_the_limit_completes(limited):
    over = [({"prompt": "Hi", "max_tokens": 65}, "65, over this server's limit of 64 new tokens "
                                                 "per choice (serve_lm.py --max_tokens_limit)"),
            ({"prompt": "Hi", "max_tokens": 64, "n": 5},
             "could use 321 tokens (1 prompt tokens + 5 choices x max_tokens 64), over this "
             "server's limit of 300 tokens per request (serve_lm.py --max_request_tokens)"),
            ({"prompt": [[7] * 30] * 4, "max_tokens": 46},
             "could use 304 tokens (120 prompt tokens + 4 choices x max_tokens 46)")]
    for body, needle in over:
        for stream in (False, True):
            t0 = time.perf_counter()
            r = _post(limited, stream=stream, **body)
            assert r.status_code == 400, (body, r.text)
            assert time.perf_counter() - t0 < 5  # a check, not a generation (100 ms idle)
            err = r.json()["error"]
            assert err["param"] == "max_tokens" and needle in err["message"], err
    # at the limits: 64 tokens per choice; 120 + 4 x 45 = 300 tokens per request
    r = _post(limited, prompt="Hi", max_tokens=64).json()
    assert r["usage"]["completion_tokens"] == 64 and r["choices"][0]["finish_reason"] == "length"
    r = _post(limited, prompt=[[7] * 30] * 4, max_tokens=45).json()
    assert r["usage"]["total_tokens"] == 300 and len(r["choices"]) == 4


def _urllib_post(url: str, data) -> tuple[int, dict]:
    """POST with urllib: it sends the whole body, then reads the answer."""
    req = urllib.request.Request(url + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_50_mb_body_gets_a_413_that_urllib_reads_with_or_without_content_length(limited):
    before = limited.rss_kib()
    status, body = _urllib_post(limited.url, b"x" * 50_000_000)  # Content-Length
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    # an iterable body: no Content-Length, Transfer-Encoding: chunked
    chunks = (b"y" * 1_000_000 for _ in range(50))
    status, body = _urllib_post(limited.url, chunks)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert "4 MiB" in body["error"]["message"]
    grew = limited.rss_kib() - before
    assert grew < 30 * 1024, f"RSS grew by {grew} KiB: the body was held"  # 100 MB went in
    assert _post(limited, prompt="Hi", max_tokens=2).status_code == 200  # and it serves on


def _raw(srv: ServerProcess, head: str) -> bytes:
    """Send a request head with no body; read the answer until the server closes."""
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_body_past_the_bound_or_awaiting_100_continue_gets_its_413_unread(limited):
    """A Content-Length past 64 MiB, or Expect: 100-continue: the 413 goes out at once (the
    server never asked for the body), then the connection closes."""
    for extra in ("Content-Length: 100000000\r\n",
                  "Content-Length: 5000000\r\nExpect: 100-continue\r\n"):
        answer = _raw(limited, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               f"Content-Type: application/json\r\n{extra}\r\n")
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"100 Continue" not in answer and b"request_too_large" in answer


@pytest.fixture(scope="module")
def timed(endless_checkpoint):
    """A server whose requests may decode for half a second."""
    srv = ServerProcess("--checkpoint", str(endless_checkpoint), "--max_batch", "2",
                        "--request_timeout_s", "0.5", "--stream_interval_ms", "0",
                        "--no_access_log", *BIG)
    yield srv
    _stop(srv)


def test_the_time_limit_ends_a_long_request_and_frees_its_rows(timed):
    mark = timed.mark()
    r = _post(timed, prompt="Hi", max_tokens=10**6, n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert 0 < body["usage"]["completion_tokens"] < 2 * 10**6
    assert len(body["choices"][0]["text"]) > 0
    health = httpx.get(timed.url + "/health", timeout=60).json()
    assert health["running"] == 0 and health["waiting"] == 0  # freed before the answer
    timed.wait_for(r"the time limit of 0.5 s ended it after \d+ tokens; 2 choices ended",
                   since=mark)
    # streamed: the last chunk has finish_reason "length" (no error chunk), then [DONE]
    r = _post(timed, prompt="Hi", max_tokens=10**6, stream=True, logprobs=0,
              stream_options={"include_usage": True})
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # no error chunk (the key, not the word: a sampled token may spell "terror")
    assert not any("error" in c for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    tokens = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks[:-1])
    assert 0 < tokens == chunks[-1]["usage"]["completion_tokens"] < 10**6
    assert httpx.get(timed.url + "/health", timeout=60).json()["running"] == 0


class _Client(threading.Thread):
    """One request in a thread: its status, its stream's lines (or whole body), when it ended."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first = threading.Event()  # the response started (a stream: its first chunk)
        self.status: int | None = None
        self.lines: list[str] = []
        self.ended = 0.0

    def run(self) -> None:
        with httpx.Client(timeout=120) as c, \
                c.stream("POST", self.url + "/v1/completions", json=self.body) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)
                    self.first.set()
        self.ended = time.monotonic()
        self.first.set()


def test_sigterm_with_a_full_batch_and_a_queue(endless_checkpoint):
    """Two rows running, two requests queued: SIGTERM answers the queued and new ones 503 and
    lets the short running stream finish while the endless one goes on; a second signal ends
    that one at once with an error chunk; exit status 0. (The end of the grace period itself:
    tests/serve/test_server.py's test_queue_full_answers_429_and_shutdown_ends_open_streams.)"""
    grace = 120.0  # longer than this test: only the second signal ends the endless stream
    srv = ServerProcess("--checkpoint", str(endless_checkpoint), "--max_batch", "2",
                        "--max_queue", "4", "--shutdown_grace_s", str(grace),
                        "--stream_interval_ms", "0", "--no_access_log", *BIG)
    body = {"model": "endless", "prompt": "Hi", "stream": True}
    try:
        endless = _Client(srv.url, {**body, "max_tokens": 10**6})
        short = _Client(srv.url, {**body, "max_tokens": 400})
        for c in (endless, short):
            c.start()
            assert c.first.wait(60) and c.status == 200
        queued = [_Client(srv.url, {**body, "max_tokens": 5}),
                  _Client(srv.url, {**body, "max_tokens": 5, "stream": False})]
        for c in queued:
            c.start()
        srv.wait_health(lambda h: h["waiting"] == 2)
        mark = srv.mark()
        srv.proc.send_signal(signal.SIGTERM)
        term = time.monotonic()
        running = srv.wait_for(r"shutting down: no new requests; (\d) rows running may finish "
                               r"within 120 s, 2 queued requests get 503", since=mark)
        assert running.group(1) in ("1", "2")  # 1: the short one was done already
        for c in queued:  # refused at once
            c.join(60)
            assert c.status == 503 and "shutting down" in c.lines[0], c.lines
        new = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False},
                         timeout=60)
        assert new.status_code == 503 and "shutting down" in new.json()["error"]["message"]
        health = httpx.get(srv.url + "/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        short.join(60)
        assert short.lines[-1] == "data: [DONE]"
        assert not any(line.startswith('data: {"error"') for line in short.lines)
        assert json.loads(short.lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert endless.is_alive() and srv.proc.poll() is None  # the drain waits for it
        srv.proc.send_signal(signal.SIGTERM)  # a second signal: end it now
        endless.join(60)
        assert endless.lines[-1] == "data: [DONE]"
        error = json.loads(endless.lines[-2][6:])["error"]
        assert "shutting down" in error["message"] and endless.ended - term < grace
        assert srv.proc.wait(60) == 0
    finally:
        status = srv.stop()
    assert status == 0 and "Traceback" not in srv.log_text(), srv.log_text()


def test_a_short_soak(tiny_checkpoint):
    """bench/soak.py at a few hundred requests: every check passes (the memory one with a
    generous margin, the 400's time with a loose bound: the machine may be busy)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--checkpoint", str(tiny_checkpoint),
         "--requests", "300", "--clients", "8", "--warmup", "100", "--sample_every", "100",
         "--rss_margin", "0.25", "--target_400_ms", "2000", "--server_args=--threads 1"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "FAIL" not in out and out.count("\nPASS ") == 6, out
    assert "300 requests in" in out and "answers: 200: " in out
    assert "PASS 0 dropped connections" in out and "PASS 0 tracebacks" in out
