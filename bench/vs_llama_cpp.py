"""Decode speed next to llama.cpp on the same weights, and how a GGUF export agrees with us.

Run: python bench/vs_llama_cpp.py --llama_server PATH     (CPU; the figures in docs/benchmarks.md)
     python bench/vs_llama_cpp.py --llama_server PATH --agreement lm_shakespeare
         (also: a trained run's greedy tokens and logits in llama.cpp, through llama-cpp-python)

Speed. For each case (GPT-2 124M's shape, and the default config's) a model with random weights
(seed 0) is saved as one of our checkpoints and exported with `convert.py --to_gguf` as f32, f16
and q8_0. Each pair then decodes the same prompt (16 random tokens) to the same number of new
tokens (--new_tokens, no end token), at batch 1 with the same threads, under two samplings:

- "top-p": temperature 0.8, top-p 0.9 over the whole vocabulary (top-k and min-p off);
- "top-k": llama.cpp's defaults, temperature 0.8, top-k 40, top-p 0.9 and min-p 0.05 (ours: the
  same without min-p, which we do not have; after top-k 40 it is a cheap filter).

Pairs: our float32 / llama.cpp f32, our bf16 (`--quantize bf16`) / f16, our int8 / q8_0, our
int4 / q4_0 (the same 4-bit blocks of 32; `convert.py --to_gguf --outtype q4_0`).
llama.cpp runs as `llama-server` with one client and one slot; its rate is its own timing,
`timings.predicted_per_second` (generated tokens over the generation time, after the prompt).
Ours is measured the same way through the Python API: `model.stream(...)`, generated tokens
after the first over the time from the first to the last. Batch 1 is bound by memory bandwidth,
so each rate is also given as a fraction of it: tokens/s x the weight bytes a token reads in
that format (every matrix product's weights, the LM head included; bench/bandwidth.py) over the
read bandwidth this process measures with the same threads (`sum` over 512 MiB). Best of
--repeats; ours and llama.cpp's alternate within each round, so a slow spell of a shared
machine hits both.

After the pairs: where one of our batch-1 steps goes (its matrix products alone, every `Linear`
through the kernels decoding uses, and the rest), next to llama.cpp's whole step; then ours at
batch 1, 4 and 16 per format (--batches; all rows' tokens per second), to check that no format
slows down as the batch grows (llama.cpp is not run there).

Getting llama-server (what the recorded run used): the llama-cpp-python 0.3.36 source holds
llama.cpp. From PyPI (`pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:`):
    tar xzf llama_cpp_python-0.3.36.tar.gz
    pip install ./llama_cpp_python-0.3.36.tar.gz       # the Python binding (--agreement), ~3 min
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j2 --target llama-server       # ~7 min on 2 cores
then pass `--llama_server .../build/bin/llama-server` (or set LLAMA_SERVER, or put it on PATH).
Without it the llama.cpp columns are skipped with a note and only ours is printed.

Agreement (--agreement RUN, needs `llama_cpp`): the run's checkpoint exported as f32, f16 and
q8_0 (--agree_types), each loaded with llama.cpp's default f16 KV cache and with an f32 one:
its greedy continuation of the prompt (--agree_tokens, temperature 0) against ours token by
token, and its logits at every position of the prompt + our continuation against ours (largest
absolute difference), and against ours with llama.cpp's GELU (its CPU backend rounds GELU's
input to f16 and reads an f16 table: ggml-cpu/vec.h), which shows how much of the difference
that one op makes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import convert  # noqa: E402
from bench import record  # noqa: E402
from bench.bandwidth import GGUF, our_token_bytes, read_bandwidth, token_bytes  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.lm import LanguageModel, Linear, LMConfig  # noqa: E402

CASES = {
    "gpt2-124M": LMConfig(d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024,
                          dropout=0.0),
    "default": LMConfig(dropout=0.0),
}
PAIRS = [("none", "f32"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]  # ours, llama.cpp
SAMPLINGS = {
    "top-p": dict(ours=dict(temperature=0.8, top_p=0.9),
                  llama=dict(temperature=0.8, top_p=0.9, top_k=0, min_p=0.0)),
    "top-k": dict(ours=dict(temperature=0.8, top_k=40, top_p=0.9),
                  llama=dict(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05)),
}


def cpu_flags() -> str:
    """The vector extensions that decide which kernels are fast (AVX-512, AMX, VNNI...)."""
    flags = record.cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "f16c")
    return " ".join(f for f in wanted if f in flags)


# -- llama-server ----------------------------------------------------------------------------------


def find_llama_server(path: str | None) -> str | None:
    for candidate in (path, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A `llama-server` process on 127.0.0.1 with one slot, waited for through /health."""

    def __init__(self, binary: str, model: Path, n_ctx: int, threads: int) -> None:
        self.port = _free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "-c", str(n_ctx), "-np", "1", "-t", str(threads), "-tb", str(threads),
             "--no-webui"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-1500:]
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or loading the model (503)
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("llama-server did not become healthy within 120 s")
            time.sleep(0.1)

    def complete(self, prompt: list[int], n: int, seed: int, **sampling) -> dict:
        body = dict(prompt=prompt, n_predict=n, ignore_eos=True, cache_prompt=False, seed=seed,
                    stream=False, **sampling)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- ours ------------------------------------------------------------------------------------------


def our_rate(model: LanguageModel, prompt: list[int], n: int, seed: int, **sampling) -> float:
    """Generated tokens/s after the first token, as llama-server times its generation."""
    stamps = []
    for tok in model.stream(prompt, max_new_tokens=n, seed=seed, **sampling):
        tok.tolist()  # the token exists on the host: what a caller would do with it
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def products_ms(model: LanguageModel, rows: int, repeats: int = 5) -> float:
    """One decode step's matrix products alone: every `Linear` of the model, in order, called
    on `rows` random rows of its width (the decode copies and kernels a step uses); best of
    `repeats`, ms."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    xs = [torch.randn(rows, 1, m.in_features) for m in linears]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            for m, x in zip(linears, xs, strict=True):
                m(x)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def speed(args, binary: str | None, tmp: Path) -> None:
    threads = torch.get_num_threads()
    print(f"speed: batch 1, prompt {args.prompt_len} random tokens, {args.new_tokens} new "
          f"tokens, {threads} threads each, best of {args.repeats}; tokens/s")
    if binary is None:
        print("llama-server not found (--llama_server, LLAMA_SERVER or PATH): llama.cpp columns "
              "skipped; see this script's docstring for how to build it")
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth {bandwidth:.1f} GB/s ({threads} threads); 'of bw': tokens/s x "
          f"weight bytes per token over it")
    print(f"{'case':<11}{'sampling':>9}{'ours':>9}{'llama.cpp':>11}{'ours tok/s':>12}"
          f"{'llama tok/s':>13}{'ratio':>8}{'ours of bw':>12}{'llama of bw':>13}")
    split = []  # (case, format, ours ms/token, products ms, llama.cpp ms/token) at top-k
    for case in args.cases.split(","):
        cfg = CASES[case]
        torch.manual_seed(0)
        base = LanguageModel.from_config(cfg).eval()
        ckpt = tmp / f"{case}.pt"
        torch.save({"model_config": cfg.to_dict(), "model_state_dict": base.state_dict(),
                    "tokenizer": "gpt2"}, ckpt)
        del base
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
        for fmt, outtype in PAIRS:
            model, _ = load_model(ckpt, device="cpu", quantize=fmt)
            our_bytes, theirs_bytes = our_token_bytes(model, fmt), token_bytes(model, GGUF[outtype])
            server = None
            if binary is not None:
                gguf = convert.to_gguf(ckpt, tmp / f"{case}-{outtype}.gguf", outtype,
                                       force=True, verify=False)
                server = LlamaServer(binary, gguf, cfg.max_seq_len, threads)
            try:
                with model:  # one KV cache and weight copies for every call
                    for name, s in SAMPLINGS.items():
                        ours, theirs = [], []
                        our_rate(model, prompt, args.new_tokens, 0, **s["ours"])  # warm-up
                        if server is not None:
                            server.complete(prompt, args.new_tokens, 0, **s["llama"])
                        for r in range(args.repeats):
                            ours.append(our_rate(model, prompt, args.new_tokens, r, **s["ours"]))
                            if server is not None:
                                t = server.complete(prompt, args.new_tokens, r, **s["llama"])
                                if t["timings"]["predicted_n"] != args.new_tokens:
                                    raise RuntimeError(f"llama-server generated "
                                                       f"{t['timings']['predicted_n']} tokens")
                                theirs.append(t["timings"]["predicted_per_second"])
                        o = max(ours)
                        frac = f"{o * our_bytes / 1e9 / bandwidth:>12.0%}"
                        if theirs:
                            frac += f"{max(theirs) * theirs_bytes / 1e9 / bandwidth:>13.0%}"
                        cols = (f"{max(theirs):>13.0f}{o / max(theirs):>7.2f}x" if theirs
                                else f"{'-':>13}{'-':>8}")
                        label = "float32" if fmt == "none" else fmt
                        print(f"{case:<11}{name:>9}{label:>9}{outtype:>11}{o:>12.0f}{cols}{frac}",
                              flush=True)
                        if name == "top-k":
                            split.append((case, label, 1e3 / o, products_ms(model, 1),
                                          1e3 / max(theirs) if theirs else None))
            finally:
                if server is not None:
                    server.close()
            del model
    print("\nwhere a batch-1 step goes (top-k sampling above; ms per token): ours = its matrix "
          "products (every Linear alone, same kernels) + the rest (attention, LayerNorm, GELU, "
          "sampling, Python)")
    print(f"{'case':<11}{'ours':>9}{'step':>8}{'products':>10}{'rest':>7}{'llama.cpp step':>16}")
    for case, label, step, prod, theirs in split:
        t = f"{theirs:>16.2f}" if theirs is not None else f"{'-':>16}"
        print(f"{case:<11}{label:>9}{step:>8.2f}{prod:>10.2f}{step - prod:>7.2f}{t}")


def batches(args, tmp: Path) -> None:
    """Ours at several batch sizes per format: all rows' new tokens per second."""
    sizes = [int(b) for b in args.batches.split(",")]
    s = SAMPLINGS[args.batch_sampling]["ours"]
    print(f"\nbatches: ours only, {args.batch_case}, {args.batch_sampling} sampling, "
          f"{args.batch_tokens} new tokens per row, best of {args.repeats}; tokens/s of all rows")
    ratio = f"{f'{sizes[-1]} vs {sizes[-2]}':>10}" if len(sizes) > 1 else ""
    print(f"{'weights':>8}" + "".join(f"{f'batch {b}':>10}" for b in sizes) + ratio)
    cfg = CASES[args.batch_case]
    torch.manual_seed(0)
    model = LanguageModel.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for fmt, _ in PAIRS:
        model.quantize(fmt)
        rates = []
        with model:
            for b in sizes:
                prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=g)
                best = 0.0
                for r in range(args.repeats + 1):  # the first call warms up
                    t0 = time.perf_counter()
                    model.generate(prompt, max_new_tokens=args.batch_tokens, seed=r, **s)
                    if r:
                        best = max(best, b * args.batch_tokens / (time.perf_counter() - t0))
                rates.append(best)
        label = "float32" if fmt == "none" else fmt
        tail = f"{rates[-1] / rates[-2]:>9.2f}x" if len(rates) > 1 else ""
        print(f"{label:>8}" + "".join(f"{r:>10.0f}" for r in rates) + tail, flush=True)
    model.quantize("none")


# -- agreement -------------------------------------------------------------------------------------


def _ggml_gelu(h: torch.Tensor) -> torch.Tensor:
    """GELU as llama.cpp's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): the input
    rounded to f16, looked up in a table of f16 results; 0 at or below -10, x at or above 10."""
    y = torch.nn.functional.gelu(h.half().float(), approximate="tanh").half().float()
    return torch.where(h <= -10, 0.0, torch.where(h >= 10, h, y))


@contextlib.contextmanager
def ggml_gelu(model: LanguageModel):
    """Our model with llama.cpp's GELU in every block (to show what the logit differences are);
    a model without GELU (SwiGLU) as it is."""
    pre: dict[int, torch.Tensor] = {}
    handles = []
    if model.config.mlp != "gelu":
        yield model
        return
    for i, block in enumerate(model.transformer.h):
        handles.append(block.mlp.c_fc.register_forward_hook(
            lambda mod, inp, out, i=i: pre.__setitem__(i, out)))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(
            lambda mod, inp, i=i: (_ggml_gelu(pre.pop(i)),)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def agreement(args, tmp: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("agreement: skipped, llama-cpp-python is not installed (see the docstring)")
        return
    import numpy as np

    from model.tokenizer import load_checkpoint_tokenizer

    model, ckpt = load_model(args.agreement, device="cpu")
    tok = load_checkpoint_tokenizer(ckpt)  # the run's own (a preset's trained BPE, or GPT-2's)
    prompt = tok.encode(args.agree_prompt)
    n = min(args.agree_tokens, model.max_seq_len - len(prompt))
    mine = model.generate(prompt, max_new_tokens=n, temperature=0)[0, len(prompt):].tolist()
    seq = prompt + mine  # logits compared at every position of the prompt and our continuation
    with torch.no_grad():
        ours_logits = model(torch.tensor([seq]))[0]
        with ggml_gelu(model):
            ggml_logits = model(torch.tensor([seq]))[0]
    print(f"\nagreement: {ckpt['_path']}; prompt {args.agree_prompt!r} ({len(prompt)} tokens); "
          f"llama.cpp's greedy continuation of {n} tokens against ours, and its logits at all "
          f"{len(seq)} positions of the prompt + our continuation (ours up to "
          f"|{float(ours_logits.abs().max()):.1f}|), against ours and against ours with "
          f"llama.cpp's f16-table GELU")
    print(f"{'gguf':>6}{'kv cache':>10}{'greedy tokens equal':>21}{'first difference':>18}"
          f"{'max |logit diff|':>18}{'vs ours w/ its GELU':>21}")
    for outtype in args.agree_types.split(","):
        path = convert.to_gguf(args.agreement, tmp / f"agree-{outtype}.gguf", outtype,
                               force=True)
        for kv in ("f16", "f32"):  # llama.cpp's default KV cache is f16
            ggml_type = {"f16": 1, "f32": 0}[kv]
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.max_seq_len,
                                  n_threads=torch.get_num_threads(), logits_all=True,
                                  verbose=False, type_k=ggml_type, type_v=ggml_type)
            try:
                llm.eval(seq)
                theirs = torch.from_numpy(np.array(llm.scores[:len(seq)], dtype=np.float32))
                diff = float((theirs - ours_logits).abs().max())
                diff_g = float((theirs - ggml_logits).abs().max())
                llm.reset()
                got = []
                for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                    got.append(t)
                    if len(got) == n:
                        break
            finally:
                llm.close()
            same = sum(a == b for a, b in zip(got, mine, strict=True))
            first = next((i for i, (a, b) in enumerate(zip(got, mine, strict=True)) if a != b),
                         None)
            print(f"{outtype:>6}{kv:>10}{f'{same}/{n}':>21}"
                  f"{'none' if first is None else f'token {first + 1}':>18}{diff:>18.2e}"
                  f"{diff_g:>21.2e}", flush=True)
    print(f"ours: {tok.decode(mine)!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama_server", metavar="PATH", help="llama-server binary (see the top)")
    ap.add_argument("--cases", default="gpt2-124M,default")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_speed", action="store_true")
    ap.add_argument("--batches", default="1,4,16",
                    help="batch sizes of the batch table (ours only); empty to skip it")
    ap.add_argument("--batch_case", default="gpt2-124M", choices=sorted(CASES))
    ap.add_argument("--batch_sampling", default="top-p", choices=sorted(SAMPLINGS))
    ap.add_argument("--batch_tokens", type=int, default=32, help="new tokens per row")
    ap.add_argument("--agreement", metavar="RUN", help="trained run or checkpoint to compare")
    ap.add_argument("--agree_prompt", default="ROMEO:")
    ap.add_argument("--agree_tokens", type=int, default=50)
    ap.add_argument("--agree_types", default="f32,f16")
    args = ap.parse_args()
    print(f"cpu: {record.cpu_name()} ({cpu_flags()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            binary = find_llama_server(args.llama_server)
            speed(args, binary, Path(tmp))
            if args.batches:
                batches(args, Path(tmp))
        if args.agreement:
            agreement(args, Path(tmp))


if __name__ == "__main__":
    main()
