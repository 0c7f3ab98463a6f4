"""Serving under load: our server (continuous batching, and one row at a time) vs llama.cpp's
`llama-server` on the same weights as GGUF, driven by the official `openai` client.

Run: python bench/serving.py                      (both configs, 1/4/16 clients, both samplings)
     python bench/serving.py --configs gpt2-124M --clients 16 --samplings top-p,top-k
     python bench/serving.py --llama_server PATH  (default: $LLAMA_SERVER, else on PATH)
     python bench/serving.py --out bench/results/serving_cpu_2core.txt   (also to a file)

Each config gets random weights (seeded), saved as a checkpoint and exported to GGUF with
`python convert.py --checkpoint CKPT --to_gguf FILE --outtype f32|f16` (llama-server's rows are
skipped, with a note, when that or llama-server is missing). For every server, C clients each
send R streamed completions of N tokens one after another (`stream_options.include_usage`
counts the tokens), all clients at once; the same prompts go to every server. Printed per row:
total generated tokens/s (all tokens over the wall time of the whole load), p50/p95 request
latency and p95 time to the first token. Samplings: "top-p" is temperature 0.8, top-p 0.9 over
the whole vocabulary (llama-server: top-k 0 and min-p 0, i.e. off); "top-k" adds top-k 40 (for
llama-server: its default sampling, top-k 40 and min-p 0.05). Ours runs in float32 and with
`--quantize bf16`, llama-server with f32 and f16 weights (and q8_0 with --llama_types). With one
client, `generate_lm.py` on the same checkpoint, prompt and settings gives the no-HTTP
reference: the two are run in turn (`--pairs` of each, seconds apart, because this CPU's
speed drifts by 10-40% over minutes) and the ratio printed is the median of the adjacent
pairs'. Servers run one at a time, each with the machine's cores (llama-server `-t` = the
cores; ours: torch's default); the client runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, printed_to  # noqa: E402

CONFIGS = {
    "default": dict(),
    "gpt2-124M": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024),
}
SAMPLINGS = {
    # ours: the request's fields; llama-server: the same plus what sets its other samplers
    "top-p": (dict(temperature=0.8, top_p=0.9), dict(top_k=0, min_p=0.0)),
    "top-k": (dict(temperature=0.8, top_p=0.9, top_k=40), dict(top_k=40, min_p=0.05)),
}
PROMPTS = [
    "The history of the city begins with a small harbour where fishermen",
    "Once upon a time, in a kingdom far away, there lived a young",
    "In the future, we will travel between the planets in ships that",
    "The recipe calls for two cups of flour, a pinch of salt and",
    "Scientists announced today that the new telescope had observed",
    "She opened the letter slowly, knowing that the words inside would",
    "The committee met on Tuesday to discuss the budget for the next",
    "Deep in the forest, the old wooden house stood empty until one",
]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))


@dataclass
class Result:
    tokens: int
    wall: float
    latencies: list[float]
    ttfts: list[float]
    client_cpu: float = 0.0  # CPU seconds this process (the client) used during the load
    server_cpu: tuple[float, float] = (0.0, 0.0)  # the server's (main thread, other threads)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @staticmethod
    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process, its log in a file, waited for through /health."""

    def __init__(self, cmd: list[str], log: Path, url: str | None, env=None) -> None:
        self.log = log
        self.fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env or ENV,
                                     cwd=ROOT, stdin=subprocess.DEVNULL)
        self.url = url

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            if self.url is None:  # ours with --port 0: the address is in its log
                m = re.search(r"serving \S+ on (http://\S+) ", self.log.read_text())
                if m:
                    self.url = m.group(1)
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)  # a bench may poll; tests wait on events
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; the exit status (SIGKILL after `timeout` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()
        return self.proc.returncode


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int,
               fields: dict, server_pid: int | None = None) -> Result:
    """`clients` concurrent clients, each sending `requests` streamed completions in turn."""
    import httpx
    import openai

    # A fresh connection per request: llama-server closes kept-alive connections it has served
    # a stream on, and a request sent on one fails (both servers get the same client).
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4,
                                                 max_keepalive_connections=0), timeout=600)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0,
                                http_client=http)
    latencies, ttfts, tokens = [], [], [0]

    async def one(c: int, r: int) -> None:
        prompt = PROMPTS[(c + r) % len(PROMPTS)]
        extra = {k: v for k, v in fields.items() if k not in ("temperature", "top_p")}
        t0 = time.perf_counter()
        first = None
        n_chunks, usage = 0, None
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
            temperature=fields["temperature"], top_p=fields["top_p"],
            stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                n_chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        latencies.append(time.perf_counter() - t0)
        ttfts.append(first if first is not None else latencies[-1])
        tokens[0] += usage if usage is not None else n_chunks

    async def client_loop(c: int) -> None:
        for r in range(requests):
            await one(c, r)

    t0, c0 = time.perf_counter(), time.process_time()
    before = thread_cpu(server_pid)
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = thread_cpu(server_pid)
    await http.aclose()
    main = after.get(server_pid, 0.0) - before.get(server_pid, 0.0)
    rest = sum(v - before.get(t, 0.0) for t, v in after.items() if t != server_pid)
    return Result(tokens[0], wall, latencies, ttfts, cpu, (main, rest))


def thread_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, from /proc (Linux; {}
    elsewhere). Our server's main thread runs the HTTP side, the others the model."""
    out: dict[int, float] = {}
    if pid is None:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def make_checkpoint(name: str, work: Path) -> Path:
    import torch

    from model.lm import LanguageModel

    path = work / f"{name}.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    model = LanguageModel(**CONFIGS[name], dropout=0.0)
    tmp = path.with_suffix(".tmp")
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": "gpt2"}, tmp)
    tmp.replace(path)
    return path


def export_gguf(ckpt: Path, outtype: str, convert: Path) -> tuple[Path | None, str]:
    out = ckpt.with_name(f"{ckpt.stem}-{outtype}.gguf")
    if out.exists():
        return out, ""
    proc = subprocess.run([sys.executable, str(convert), "--checkpoint", str(ckpt),
                           "--to_gguf", str(out), "--outtype", outtype], env=ENV,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"convert.py --to_gguf {outtype} failed: {last}"
    return out, ""


def generate_lm_rate(ckpt: Path, fields: dict, max_tokens: int, quantize: str) -> float | None:
    """generate_lm.py's own tokens/s (its --verbose summary) for the first client's request."""
    cmd = [sys.executable, str(ROOT / "generate_lm.py"), "--checkpoint", str(ckpt), "--prompt",
           PROMPTS[0], "--max_new_tokens", str(max_tokens), "--seed", "0", "--verbose",
           "--quantize", quantize, "--temperature", str(fields["temperature"]),
           "--top_p", str(fields["top_p"])]
    if fields.get("top_k"):
        cmd += ["--top_k", str(fields["top_k"])]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"\(([\d.]+) tokens/s", proc.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="default,gpt2-124M")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="streamed completions per client")
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--samplings", default="top-p,top-k")
    ap.add_argument("--formats", default="fp32,bf16", help="ours: fp32 and/or bf16")
    ap.add_argument("--llama_types", default="f32,f16", help="llama-server's GGUF types")
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--stream_interval_ms", type=float, default=None,
                    help="our server's --stream_interval_ms (default: the server's default)")
    ap.add_argument("--sequential", default="default",
                    help="configs that also run our server with one row (--max_batch 1)")
    ap.add_argument("--llama_server", default=os.environ.get("LLAMA_SERVER")
                    or shutil.which("llama-server"))
    ap.add_argument("--convert", type=Path, default=ROOT / "convert.py",
                    help="the convert.py that writes the GGUF files (--to_gguf)")
    ap.add_argument("--skip_llama", action="store_true")
    ap.add_argument("--out", type=Path, help="also write what is printed to this file")
    ap.add_argument("--skip_generate_lm", action="store_true")
    ap.add_argument("--pairs", type=int, default=5,
                    help="one client: server and generate_lm.py runs taken in turn (default 5)")
    ap.add_argument("--work_dir", help="keep checkpoints and GGUF files here (reused)")
    args = ap.parse_args()
    with printed_to(args.out, "bench/serving.py"):
        run(args)


def print_side_by_side(rows: dict[tuple, Result], pairs: dict[tuple, list[float]],
                       max_batch: int) -> None:
    """The comparisons of our continuous batching against the other rows, with the issue's
    targets: llama-server, one row at a time, generate_lm.py, CPU per token, time to first
    token."""
    print("\nside by side (the issue's targets in brackets):")
    for (cfg, label, wts, s, c), res in rows.items():
        if label != "ours (continuous)":
            continue
        ref_t = {"fp32": "f32", "bf16": "f16"}.get(wts)
        ref = rows.get((cfg, f"llama-server -np {max_batch}", ref_t, s, c))
        seq = rows.get((cfg, "ours (one row)", wts, s, c))
        bits = []
        if ref:
            bits.append(f"{res.rate / ref.rate:.2f}x llama-server {ref_t}"
                        + (" [>= 1.0x]" if c == 16 and cfg == "gpt2-124M" else ""))
        if seq and c > 1:
            bits.append(f"{res.rate / seq.rate:.2f}x one row at a time"
                        + (" [>= 4x]" if c == 16 and cfg == "default" else ""))
        if c == 1 and (cfg, wts, s) in pairs:
            each = ", ".join(f"{r:.2f}" for r in pairs[(cfg, wts, s)])
            # median_high: the pair whose generate_lm.py rate the table shows (`paired`)
            bits.append(f"{statistics.median_high(pairs[(cfg, wts, s)]):.2f}x generate_lm.py "
                        f"[>= 0.9x] (median of {len(pairs[(cfg, wts, s)])} adjacent pairs: "
                        f"{each})")
        if c == 1 and res.tokens:
            ms = 1000 / res.tokens
            bits.append(f"CPU per token: the openai client {res.client_cpu * ms:.2f} ms, the "
                        f"server's HTTP thread {res.server_cpu[0] * ms:.2f} ms, its model "
                        f"threads {res.server_cpu[1] * ms:.2f} ms, wall {res.wall * ms:.2f} ms")
        if c == 16 and cfg == "gpt2-124M":
            bits.append(f"p95 TTFT {Result.pct(res.ttfts, 0.95):.2f} s [<= 0.5 s]")
        if bits:
            print(f"  {cfg} {wts} {s}, {c} clients: ours is " + ", ".join(bits))


def run(args: argparse.Namespace) -> None:
    """Run every server under every load the arguments ask for, printing a row per run."""
    import torch

    from serve_lm import STREAM_INTERVAL_MS

    cores = os.cpu_count() or 1
    cpu = machine()
    interval = STREAM_INTERVAL_MS if args.stream_interval_ms is None else args.stream_interval_ms
    clients = [int(c) for c in args.clients.split(",")]
    samplings = args.samplings.split(",")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    llama = None if args.skip_llama else args.llama_server
    notes = []
    if not args.skip_llama and not llama:
        notes.append("llama-server not found (--llama_server or $LLAMA_SERVER): its rows are "
                     "skipped")
    llama_version = ""
    if llama:
        lib_env = dict(ENV, LD_LIBRARY_PATH=str(Path(llama).parent) + ":"
                       + ENV.get("LD_LIBRARY_PATH", ""))
        v = subprocess.run([llama, "--version"], capture_output=True, text=True, env=lib_env)
        llama_version = " ".join((v.stdout + v.stderr).split())[:80]
    print(f"cpu: {cpu}, {cores} cores | torch {torch.__version__} | python "
          f"{platform.python_version()}" + (f" | llama.cpp {llama_version}" if llama else ""))
    print(f"load: C clients at once, each {args.requests} streamed completions of "
          f"{args.max_tokens} tokens in turn; openai client; our --max_batch {args.max_batch}"
          f" --stream_interval_ms {interval:g}, llama-server -np {args.max_batch}")
    header = (f"{'config':<10} {'server':<24} {'weights':<7} {'sampling':<8} {'clients':>7} "
              f"{'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'p95 TTFT':>8}")
    rows: dict[tuple, Result] = {}
    cli: dict[tuple, float] = {}  # generate_lm.py's tokens/s per (config, format, sampling)
    pairs: dict[tuple, list[float]] = {}  # ours / generate_lm.py, run by run (one client)

    def paired(first: Result, server_run, cli_run, key: tuple) -> Result:
        """One client: the server's load and generate_lm.py run in turn, `--pairs` times, so
        each ratio compares runs seconds apart (this CPU's speed drifts 10-40% over minutes).
        Returns the server's median run; the ratio kept is the median of the pairs' ratios."""
        runs, ratios = [], []
        for i in range(args.pairs):
            res = first if i == 0 else server_run()
            rate = cli_run()
            if rate is None:
                return res
            runs.append(res)
            ratios.append((res.rate / rate, rate))
        ratios.sort()
        cli[key] = ratios[len(ratios) // 2][1]
        pairs[key] = [r for r, _ in ratios]
        return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]

    def run_server(cfg: str, label: str, wts: str, proc: Proc, model_id: str,
                   pair=None) -> None:
        try:
            proc.wait_ready()
            warm = dict(SAMPLINGS["top-p"][0])
            asyncio.run(load(proc.url, model_id, 1, 1, 8, warm))
            for s in samplings:
                ours_fields, llama_fields = SAMPLINGS[s]
                fields = {**ours_fields, **llama_fields} if label.startswith("llama") \
                    else ours_fields
                for c in clients:
                    res = asyncio.run(load(proc.url, model_id, c, args.requests,
                                           args.max_tokens, fields, proc.proc.pid))
                    if pair is not None and c == 1:
                        def again(f: dict = fields) -> Result:
                            return asyncio.run(load(proc.url, model_id, 1, args.requests,
                                                    args.max_tokens, f, proc.proc.pid))
                        res = paired(res, again, partial(pair, s), (cfg, wts, s))
                    rows[(cfg, label, wts, s, c)] = res
                    print(f"{cfg:<10} {label:<24} {wts:<7} {s:<8} {c:>7} {res.rate:>7.1f} "
                          f"{Result.pct(res.latencies, 0.5):>6.2f} "
                          f"{Result.pct(res.latencies, 0.95):>6.2f} "
                          f"{Result.pct(res.ttfts, 0.95):>8.2f}", flush=True)
        finally:
            proc.stop()

    print(header)
    for cfg in args.configs.split(","):
        ckpt = make_checkpoint(cfg, work)
        for fmt in args.formats.split(","):
            quantize = {"fp32": "none"}.get(fmt, fmt)
            cmd = [sys.executable, str(ROOT / "serve_lm.py"), "--checkpoint", str(ckpt),
                   "--port", "0", "--max_batch", str(args.max_batch), "--no_access_log",
                   "--quantize", quantize, "--stream_interval_ms", f"{interval:g}"]
            pair = None
            if 1 in clients and not args.skip_generate_lm:
                def pair(s: str, q: str = quantize, ckpt: Path = ckpt) -> float | None:
                    return generate_lm_rate(ckpt, SAMPLINGS[s][0], args.max_tokens, q)
            run_server(cfg, "ours (continuous)", fmt,
                       Proc(cmd, work / f"ours-{cfg}-{fmt}.log", None), cfg, pair)
            if cfg in args.sequential.split(","):
                cmd = [*cmd[:cmd.index("--max_batch") + 1], "1",
                       *cmd[cmd.index("--max_batch") + 2:]]
                run_server(cfg, "ours (one row)", fmt,
                           Proc(cmd, work / f"seq-{cfg}-{fmt}.log", None), cfg)
        if llama:
            ctx = {**dict(max_seq_len=256), **CONFIGS[cfg]}["max_seq_len"]
            for t in args.llama_types.split(","):
                gguf, note = export_gguf(ckpt, t, args.convert)
                if gguf is None:
                    notes.append(note)
                    continue
                port = free_port()
                cmd = [llama, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                       "-np", str(args.max_batch), "-c", str(ctx * args.max_batch),
                       "-t", str(cores), "-tb", str(cores), "--no-warmup"]
                run_server(cfg, f"llama-server -np {args.max_batch}", t,
                           Proc(cmd, work / f"llama-{cfg}-{t}.log", f"http://127.0.0.1:{port}",
                                env=lib_env), cfg)
        for fmt in args.formats.split(","):
            for s in samplings:
                if (cfg, fmt, s) in cli:
                    print(f"{cfg:<10} {'generate_lm.py (no HTTP)':<24} {fmt:<7} {s:<8} "
                          f"{1:>7} {cli[(cfg, fmt, s)]:>7.1f}", flush=True)
    print_side_by_side(rows, pairs, args.max_batch)
    for note in notes:
        print("note:", note)

if __name__ == "__main__":
    main()
