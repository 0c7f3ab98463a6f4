#!/usr/bin/env python
"""Serve a trained model over HTTP: an OpenAI-compatible completions API and a web playground.

    python serve_lm.py --checkpoint lm_shakespeare
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"model": "lm_shakespeare", "prompt": "ROMEO:", "max_tokens": 20}'

Open http://127.0.0.1:8000/ for the playground. Concurrent requests share the model's decode
steps (continuous batching, up to --max_batch rows). The server listens at once; /health
answers 503 until the model is loaded. Each request's work is bounded (--max_tokens_limit,
--max_request_tokens, --request_timeout_s). SIGTERM or Ctrl-C: new and queued requests get 503,
running ones may finish within --shutdown_grace_s, then the process exits 0 (a second signal
ends them at once). Bad flags exit with status 2 and a one-line `error: ...`. See
docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import NoReturn

from common.cli import OneLineParser, Runtime, add_runtime_flags, device_error, number
from serve.limits import MAX_REQUEST_TOKENS, MAX_TOKENS_LIMIT, SHUTDOWN_GRACE_S, Limits

EXAMPLES = """\
examples:
  python serve_lm.py --checkpoint lm_shakespeare
  python serve_lm.py --checkpoint lm_shakespeare --port 8080 --max_batch 8 --quantize int8
  python serve_lm.py --checkpoint lm_wikitext --host 0.0.0.0 --api_key "$SERVE_LM_API_KEY"

Then: POST /v1/completions (the openai client's client.completions.create), POST
/v1/chat/completions for a model whose tokenizer has a chat template, GET /v1/models,
GET /health, and the playground at /.
"""
API_KEY_ENV = "SERVE_LM_API_KEY"
# Streamed chunks at most 50 a second: a reader sees no difference, while a fast model's
# per-token chunks cost the openai client 0.5-1 ms of CPU each, on the model's cores
# (bench/serving.py).
STREAM_INTERVAL_MS = 20.0


def build_parser() -> argparse.ArgumentParser:
    """The command line (no heavy imports, so `--help` and usage errors are instant)."""
    p = OneLineParser(prog="serve_lm.py",
                      description="Serve a language model over HTTP with an OpenAI-compatible "
                                  "completions API and a web playground.",
                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint file (.pt or .safetensors), run directory or snapshots "
                        "directory (default: the most recently trained lm_*/ run in the "
                        "current directory)")
    p.add_argument("--model_name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the run "
                        "directory's or the file's name)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    n.add_argument("--port", type=number("--port", 0, 65535, cast=int), default=8000,
                   metavar="N", help="port to listen on; 0 picks a free one (default: 8000)")
    n.add_argument("--api_key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ routes (default: "
                        f"${API_KEY_ENV} if set, else none; /health and / stay public)")
    b = p.add_argument_group("batching")
    b.add_argument("--max_batch", type=number("--max_batch", 1, 1024, cast=int), default=16,
                   metavar="N", help="rows (completions) that decode together; each holds a KV "
                                     "cache of the model's context (default: 16)")
    b.add_argument("--max_queue", type=number("--max_queue", 0, 100000, cast=int), default=64,
                   metavar="N", help="requests that may wait for a free row; more are answered "
                                     "429 with Retry-After (default: 64)")
    b.add_argument("--stream_interval_ms", type=number("--stream_interval_ms", 0, 1000),
                   default=STREAM_INTERVAL_MS, metavar="MS",
                   help="a stream's chunks are at least this far apart: tokens that come sooner "
                        "go out together in the next chunk (the first token and the last go out "
                        "at once); 0 sends every token as it comes, at a higher CPU cost per "
                        f"token for the client (default: {STREAM_INTERVAL_MS:g})")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max_tokens_limit", type=number("--max_tokens_limit", 1, 2**31 - 1,
                                                       cast=int),
                     default=MAX_TOKENS_LIMIT, metavar="N",
                     help="the most new tokens (max_tokens) one choice may ask for; more is "
                          f"a 400 (default: {MAX_TOKENS_LIMIT})")
    lim.add_argument("--max_request_tokens", type=number("--max_request_tokens", 1, 2**40,
                                                         cast=int),
                     default=MAX_REQUEST_TOKENS, metavar="N",
                     help="the most tokens one request may use: its prompts' tokens plus "
                          "choices x max_tokens; more is a 400 (default: "
                          f"{MAX_REQUEST_TOKENS})")
    lim.add_argument("--request_timeout_s", type=number("--request_timeout_s", 0, 10**6),
                     default=0.0, metavar="S",
                     help="a request that has decoded this long ends: its rows are freed and "
                          "its choices finish with finish_reason \"length\"; 0: no limit "
                          "(default: 0)")
    lim.add_argument("--shutdown_grace_s", type=number("--shutdown_grace_s", 0, 10**6),
                     default=SHUTDOWN_GRACE_S, metavar="S",
                     help="on SIGTERM or Ctrl-C, new and queued requests get 503 and running "
                          "ones may finish for this long; the rest end with an error (a second "
                          f"signal ends them at once) (default: {SHUTDOWN_GRACE_S:g})")
    r = p.add_argument_group("runtime")
    add_runtime_flags(r)
    r.add_argument("--threads", type=number("--threads", 1, 1024, cast=int), metavar="N",
                   help="torch threads for the model (default: torch's, one per core)")
    r.add_argument("--allow_nonfinite", action="store_true",
                   help="load a checkpoint with NaN/inf weights (to debug a diverged run; "
                        "requests then get an error)")
    r.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level on stderr (default: info)")
    r.add_argument("--no_access_log", action="store_true",
                   help="do not log one line per HTTP request")
    return p


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _default_name(checkpoint: str | None) -> str:
    """The model id: the run directory's name, or the checkpoint file's."""
    if checkpoint is None:
        return "lm"
    path = Path(checkpoint).expanduser().resolve()
    if path.is_dir():
        return path.parent.name if path.name == "snapshots" else path.name
    if path.parent.name == "snapshots":
        return path.parent.parent.name
    return path.stem


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        _fail(f"--host {host}: cannot resolve it ({exc.strerror})")
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it a kept-alive connection's response (headers, then body: two writes) waits
    # for the client's delayed ACK, 40 ms on Linux.
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
              "(0 picks a free one)")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _web_server_class():
    import uvicorn

    class Web(uvicorn.Server):
        """uvicorn's server, but SIGINT/SIGTERM end `main` with its status (uvicorn re-raises
        the signal after its graceful shutdown, which would skip stopping the scheduler), and
        drain the scheduler first: it keeps listening, answering 503 to new requests, while
        the running ones finish (up to `grace` seconds; then streams get an error chunk and
        `[DONE]`), so uvicorn's own shutdown has no open stream to cancel. A second signal
        ends the running requests at once."""

        scheduler = None  # set once the model is loaded
        grace = SHUTDOWN_GRACE_S
        _draining = False

        def handle_exit(self, sig, frame) -> None:
            self._captured_signals.clear()
            if self.scheduler is not None and not self._draining:
                self._draining = True
                stats = self.scheduler.stats()
                logging.getLogger("serve").info(
                    "shutting down: no new requests; %d rows running may finish within %g s, "
                    "%d queued requests get 503 (a second signal ends them now)",
                    stats["running"], self.grace, stats["waiting"])
                self.scheduler.drain(self.grace, on_done=self._drained)
                return
            if self.scheduler is not None:
                self.scheduler.shutdown()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

        def _drained(self) -> None:  # the scheduler's thread: uvicorn polls the flag
            self.should_exit = True

    return Web


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; return the exit status."""
    args = build_parser().parse_args(argv)
    if device_error(args.device):
        _fail(device_error(args.device))
    if args.checkpoint is not None and not os.path.exists(os.path.expanduser(args.checkpoint)):
        _fail(f"--checkpoint: not found: {args.checkpoint}")
    if args.api_key is not None and not args.api_key.strip():
        _fail("--api_key is empty; give a key, or leave the flag out for no key")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("serve")
    sock = _listen(args.host, args.port)

    import uvicorn

    from serve.app import Server, create_app
    from serve.scheduler import Scheduler

    _Web = _web_server_class()
    name = args.model_name or _default_name(args.checkpoint)
    limits = Limits(max_tokens=args.max_tokens_limit, request_tokens=args.max_request_tokens,
                    timeout=args.request_timeout_s or None)
    server = Server(name=name, api_key=args.api_key,
                    stream_interval=args.stream_interval_ms / 1000, limits=limits)
    config = uvicorn.Config(create_app(server), log_config=None, log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_graceful_shutdown=3,
                            lifespan="off")
    web = _Web(config)
    web.grace = args.shutdown_grace_s
    status = {"code": 0}

    def load() -> None:
        try:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            from model.loading import LoadError, load_runtime

            try:
                loaded = load_runtime(args.checkpoint, Runtime.from_args(args),
                                      allow_nonfinite=args.allow_nonfinite)
            except LoadError as exc:
                _fail(str(exc))
            sys.stderr.write(loaded.describe() + "\n")
            if args.log_level == "debug":
                sys.stderr.write(f"loaded in {loaded.seconds:.2f} s; tokenizer "
                                 f"{loaded.tokenizer_name}\n")
            model, tokenizer, amp_dtype = loaded.model, loaded.tokenizer, loaded.amp_dtype
            scheduler = Scheduler(model, args.max_batch, args.max_queue, autocast=amp_dtype)
            scheduler.start()
            weights = {"none": "float32"}.get(model.quantization, model.quantization)
            if amp_dtype is not None:
                weights = str(amp_dtype).replace("torch.", "") + " autocast"
            server.info.update(context=model.max_seq_len, device=str(model.device),
                               weights=weights)
            server.attach(model, tokenizer, scheduler)
            web.scheduler = scheduler
            log.info("ready: %s (%s, context %d, max_batch %d, max_queue %d)", name,
                     server.info["weights"], model.max_seq_len, args.max_batch, args.max_queue)
        except SystemExit as exc:  # _fail's one-line errors: already written to stderr
            status["code"] = exc.code if isinstance(exc.code, int) else 2
            web.should_exit = True
        except Exception as exc:  # noqa: BLE001
            log.error("error: could not load the model (%s: %s)", type(exc).__name__, exc)
            status["code"] = 1
            web.should_exit = True

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d (loading the model; /health says when it is ready)",
             name, shown, port)
    loader = threading.Thread(target=load, name="load-model", daemon=True)
    loader.start()
    try:
        web.run(sockets=[sock])
    finally:
        if server.scheduler is not None:
            server.scheduler.stop()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
