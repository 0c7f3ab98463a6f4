"""Soak: a real `serve_lm.py` process under a mixed load for a fixed number of requests (or
minutes), with the checks of issue 32 printed as PASS/FAIL lines.

Run: python bench/soak.py                         (10,000 requests, the server's default limits)
     python bench/soak.py --requests 2000 --out bench/results/soak_cpu_2core.txt
     python bench/soak.py --minutes 30            (requests until 30 minutes have passed)
     python bench/soak.py --checkpoint lm_shakespeare --server_args "--quantize int8"

The model is random weights of the default config (`LanguageModel()`: 15 M parameters, context
256), saved once in a temporary folder, unless `--checkpoint` names one. `--clients` clients
(default 24, more than the server's 16 rows, so some requests queue) each send requests one
after another; each request is drawn (seeded) from a mix: whole and streamed completions,
`echo` with `logprobs`, `n` > 1, stop strings, seeded sampling, random temperatures, streams
the client closes after the first chunk and whole requests it abandons after a few
milliseconds (both counted as "cancelled"), and malformed ones (bad JSON, an unknown field, a
bad value, `max_tokens` over the server's limit, a wrong model, a body over 4 MiB).

Before the load: the time a `max_tokens` over the limit takes to get its 400 (target: within
100 ms), and whether a 50 MB body sent by `urllib` (the whole body, then the answer is read)
gets its 413. During the load: the server's resident memory (VmRSS) every `--sample_every`
requests. After it: requests/s, the answers by status, p50/p95 latency of the completed
requests, then SIGTERM and the exit status. The checks: no traceback in the server's log, no
dropped connection other than those the load cancelled, the resident memory at the end within
`--rss_margin` (5%) of its value after the first `--warmup` (1,000) requests, exit status 0.
The script exits 1 if a check fails. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, printed_to  # noqa: E402
from bench.serving import Proc, make_checkpoint  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
           PYTHONUNBUFFERED="1")
PROMPTS = [
    "The history of the city begins with a small harbour where",
    "Once upon a time, in a kingdom far away,",
    "In the future, we will travel between the planets",
    "The recipe calls for two cups of flour and",
    "ROMEO:",
    "She opened the letter slowly, knowing",
    "Deep in the forest, the old wooden house",
    "1, 2, 3, 4,",
]
KINDS = {  # kind: weight (out of 100)
    "whole": 22, "stream": 22, "echo_logprobs": 10, "n": 8, "stop": 8, "seeded": 6,
    "cancel_stream": 6, "cancel_whole": 4, "bad_json": 3, "bad_field": 3, "bad_value": 3,
    "over_limit": 2, "wrong_model": 2, "huge_body": 1,
}


@dataclass
class Tally:
    """What the load saw: answers by status, latencies of completed requests, RSS samples."""

    status: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    error_chunks: int = 0
    dropped: list[str] = field(default_factory=list)  # what went wrong, per dropped request
    rss: list[tuple[int, float, float]] = field(default_factory=list)  # (done, seconds, MiB)
    done: int = 0


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def request_for(kind: str, rng: random.Random) -> dict | bytes:
    """The body of one request of `kind` (bytes: sent as is)."""
    body: dict = {"model": "soak", "prompt": rng.choice(PROMPTS),
                  "max_tokens": rng.randint(4, 40), "temperature": round(rng.uniform(0, 1.2), 2)}
    if kind in ("stream", "cancel_stream"):
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "echo_logprobs":
        body.update(echo=True, logprobs=rng.randint(0, 5), max_tokens=rng.randint(0, 12))
    elif kind == "n":
        body.update(n=rng.randint(2, 4), stream=rng.random() < 0.5)
    elif kind == "stop":
        body.update(stop=["\n", " the", "."], logprobs=1)
    elif kind == "seeded":
        body.update(seed=rng.randint(0, 1000), top_p=0.9, top_k=40)
    elif kind == "bad_json":
        return b'{"model": "soak", "prompt": "Hi", '
    elif kind == "bad_field":
        body["max_token"] = 5
    elif kind == "bad_value":
        body["temperature"] = -1
    elif kind == "over_limit":
        body["max_tokens"] = 10**9
    elif kind == "wrong_model":
        body["model"] = "gpt-4"
    elif kind == "huge_body":
        return b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    return body


async def one(http, kind: str, rng: random.Random, tally: Tally) -> None:
    """Send one request of `kind`; count its outcome in `tally`."""
    import httpx

    body = request_for(kind, rng)
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    t0 = time.perf_counter()
    try:
        if kind == "cancel_whole":  # abandoned after a few ms: the server frees its rows
            try:
                await asyncio.wait_for(http.post("/v1/completions", **kw),
                                       rng.uniform(0.005, 0.1))
            except asyncio.TimeoutError:
                tally.status["cancelled"] += 1
                return
            tally.status[200] += 1  # it finished first
            tally.latencies.append(time.perf_counter() - t0)
            return
        if isinstance(body, dict) and body.get("stream"):
            await stream(http, kw, kind, t0, tally)
            return
        r = await http.post("/v1/completions", **kw)
        tally.status[r.status_code] += 1
        if r.status_code == 200:
            tally.latencies.append(time.perf_counter() - t0)
            json.loads(r.content)["choices"]  # noqa: B018 - a whole, valid body
    except (httpx.TransportError, json.JSONDecodeError, KeyError) as exc:
        tally.status["dropped"] += 1
        tally.dropped.append(f"{kind}: {type(exc).__name__}: {exc}")


async def stream(http, kw: dict, kind: str, t0: float, tally: Tally) -> None:
    """A streamed request: read it to `[DONE]` (or close it after its first chunk)."""
    async with http.stream("POST", "/v1/completions", **kw) as r:
        if r.status_code != 200:
            await r.aread()
            tally.status[r.status_code] += 1
            return
        done = False
        async for line in r.aiter_lines():
            if not line:
                continue
            if kind == "cancel_stream":
                tally.status["cancelled"] += 1
                return  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                done = True
            elif line.startswith('data: {"error"'):
                tally.error_chunks += 1
        if not done:
            tally.status["dropped"] += 1
            tally.dropped.append(f"{kind}: the stream ended without [DONE]")
            return
        tally.status[200] += 1
        tally.latencies.append(time.perf_counter() - t0)


async def load(url: str, pid: int, args: argparse.Namespace, tally: Tally) -> float:
    """The clients, until `args.requests` requests (or `args.minutes`); returns the seconds."""
    import httpx

    rng = random.Random(args.seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    plan = rng.choices(kinds, weights, k=args.requests) if not args.minutes else None
    next_i = [0]
    t0 = time.perf_counter()
    end = t0 + args.minutes * 60 if args.minutes else float("inf")
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients)

    def sample() -> None:
        tally.rss.append((tally.done, time.perf_counter() - t0, rss_mib(pid)))
        done, secs, mib = tally.rss[-1]
        print(f"  {done:>6} requests  {secs:>7.1f} s  RSS {mib:7.1f} MiB  "
              f"{done / max(secs, 1e-9):6.1f} requests/s", flush=True)

    async def client(c: int) -> None:
        crng = random.Random(args.seed * 1000 + c)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            while True:
                i = next_i[0]
                if (plan is not None and i >= len(plan)) or time.perf_counter() >= end:
                    return
                next_i[0] += 1
                kind = plan[i] if plan is not None else crng.choices(kinds, weights)[0]
                tally.kinds[kind] += 1
                await one(http, kind, crng, tally)
                tally.done += 1
                if tally.done % args.sample_every == 0 or tally.done == args.warmup:
                    sample()

    sample()
    await asyncio.gather(*(client(c) for c in range(args.clients)))
    if not tally.rss or tally.rss[-1][0] != tally.done:
        sample()
    return time.perf_counter() - t0


def probes(url: str, pid: int, target_ms: float) -> list[tuple[bool, str]]:
    """Before the load: the over-limit 400's time, and a 50 MB body sent by urllib."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(20):
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json={"model": "soak", "prompt": "Hi",
                                                "max_tokens": 10**9})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 400, r.text
    ms = statistics.median(times) * 1000
    checks = [(ms < target_ms, f"max_tokens 1e9: a 400 in {ms:.1f} ms (median of 20; the "
                               f"slowest {max(times) * 1000:.1f} ms; target {target_ms:g} ms)")]
    before = rss_mib(pid)
    req = urllib.request.Request(url + "/v1/completions", data=b"x" * 50_000_000,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        urllib.request.urlopen(req, timeout=120)
        got = "200"
    except urllib.error.HTTPError as exc:
        got = f"{exc.code} {json.loads(exc.read())['error']['code']}"
    except OSError as exc:
        got = f"{type(exc).__name__}: {exc}"
    secs = time.perf_counter() - t0
    grew = rss_mib(pid) - before
    checks.append((got == "413 request_too_large",
                   f"a 50 MB body sent by urllib: {got} in {secs:.2f} s (RSS {grew:+.1f} MiB)"))
    return checks


def report(tally: Tally, seconds: float, args: argparse.Namespace, log: str,
           status: int, probe_checks: list[tuple[bool, str]]) -> bool:
    """Print the figures and the checks; True if every check passed."""
    n = tally.done
    print(f"\n{n} requests in {seconds:.1f} s: {n / seconds:.1f} requests/s")
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    print("answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.status.items(),
                                                                   key=lambda kv: str(kv[0]))))
    print(f"error chunks in streams: {tally.error_chunks}")
    lat = sorted(tally.latencies)
    if lat:
        p50, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        print(f"latency of the {len(lat)} completed requests: p50 {p50:.3f} s, p95 {p95:.3f} s")
    for line in tally.dropped[:10]:
        print(f"  dropped: {line}")
    ref = next((mib for done, _, mib in tally.rss if done >= min(args.warmup, n)), None)
    end = tally.rss[-1][2]
    growth = (end - ref) / ref if ref else float("nan")
    tracebacks = log.count("Traceback")
    checks = probe_checks + [
        (tracebacks == 0, f"{tracebacks} tracebacks in the server's log"),
        (tally.status["dropped"] == 0,
         f"{tally.status['dropped']} dropped connections (besides the "
         f"{tally.status['cancelled']} the load cancelled)"),
        (abs(growth) <= args.rss_margin,
         f"RSS at the end {end:.1f} MiB, after the first {min(args.warmup, n)} requests "
         f"{ref:.1f} MiB: {growth:+.1%} (margin {args.rss_margin:.0%})"),
        (status == 0, f"SIGTERM after the load: exit status {status}"),
    ]
    print("\nchecks:")
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    return all(ok for ok, _ in checks)


def run(args: argparse.Namespace) -> bool:
    import torch

    print(f"cpu: {machine()} | torch {torch.__version__} | python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint("default", Path(tmp))
        log = Path(tmp) / "server.log"
        extra = args.server_args.split()
        srv = Proc([sys.executable, str(ROOT / "serve_lm.py"), "--checkpoint", str(ckpt),
                    "--port", "0", "--model_name", "soak", "--no_access_log", *extra], log,
                   url=None, env=ENV)
        try:
            srv.wait_ready(300)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}\n{log.read_text()[-3000:]}") from None
        print(f"server: serve_lm.py {' '.join(extra) or '(default flags)'}; model "
              f"{'random weights, default config' if not args.checkpoint else ckpt.name}")
        what = f"{args.minutes} minutes" if args.minutes else f"{args.requests} requests"
        print(f"load: {what}, {args.clients} clients, seed {args.seed}; RSS every "
              f"{args.sample_every} requests:")
        tally = Tally()
        try:
            probe_checks = probes(srv.url, srv.proc.pid, args.target_400_ms)
            seconds = asyncio.run(load(srv.url, srv.proc.pid, args, tally))
        finally:
            status = srv.stop(60)
        text = log.read_text(errors="replace")
        ok = report(tally, seconds, args, text, status, probe_checks)
        if not ok or args.show_log:
            print("\nthe server's log (last 40 lines):\n" + "\n".join(text.splitlines()[-40:]))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="run for this long instead of a number of requests")
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--checkpoint", help="the model (default: random weights, default config)")
    ap.add_argument("--server_args", default="", help="more serve_lm.py flags, in one string")
    ap.add_argument("--warmup", type=int, default=1000,
                    help="the RSS check's reference: after this many requests (default 1000)")
    ap.add_argument("--rss_margin", type=float, default=0.05,
                    help="the RSS at the end may differ from the reference by this fraction")
    ap.add_argument("--sample_every", type=int, default=500, help="RSS every N requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target_400_ms", type=float, default=100.0,
                    help="the over-limit 400's median time must be under this (default 100)")
    ap.add_argument("--show_log", action="store_true", help="print the server's log's end")
    ap.add_argument("--out", type=Path, help="also write what is printed to this file")
    args = ap.parse_args()
    with printed_to(args.out, "bench/soak.py"):
        ok = run(args)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
