"""The HTTP routes: OpenAI-compatible completions and chat completions, models, health, and the
playground page.

`/v1/chat/completions` serves a model whose tokenizer has a chat template (`model.chat`): the
messages go through the template, the reply ends at its end-of-turn token, and the rest is the
completions machinery (`_ChatCompletion`); a base model's gets a 404 that points at
`/v1/completions`, and a broken template a 400 that says what is wrong with it.

`create_app(server)` builds the FastAPI app around a `Server` (the loaded model, its scheduler
and the limits). Every error is the OpenAI error body (`serve/protocol.py`): 400 for a bad
field (never the framework's 422), 401 for a missing or wrong API key, 404 for an unknown
model or path, 413 for a body over the limit (read and dropped first, up to a bound, so a
client that sends all before reading gets it), 429 with `Retry-After` when the queue is full,
503 while the model loads and once the server shuts down. A stream's response starts when its
request leaves the queue, so a queued request refused at shutdown is a 503 too; after a stream
has started, an error is sent as an error chunk, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.chat import ChatFormat, ChatTemplateError, chat_format
from model.sampling import SEED_LIMIT, Sampling
from serve.completions import (
    ChoiceText,
    TokenTexts,
    chat_choice,
    chat_delta,
    chat_logprobs,
    chat_object,
    choice_object,
    completion_object,
    prompt_entries,
    usage_object,
)
from serve.limits import Limits
from serve.protocol import (
    MAX_BODY_BYTES,
    MAX_DISCARD_BYTES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    bad,
    error_body,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
)
from serve.scheduler import ChoiceSpec, Job, QueueFullError, Scheduler, ShuttingDownError

log = logging.getLogger("serve")
STATIC = Path(__file__).resolve().parent / "static"
RETRY_AFTER_S = 1
# Unseeded settings seen recently, each with the one `Sampling` its rows share; a client can send
# any number of distinct temperatures, so the oldest are forgotten past this many.
MAX_SHARED_SAMPLINGS = 256
NOT_CHAT = ("This is not a chat model and thus not supported in the v1/chat/completions "
            "endpoint: it is a base model that continues text (its tokenizer has no chat "
            "template). Use v1/completions with a prompt (client.completions.create).")


@dataclass
class Server:
    """What the routes serve: set `model`, `tokenizer` and `scheduler` once loaded (`ready`)."""

    name: str
    api_key: str | None = None
    stream_interval: float = 0.0  # seconds: streamed tokens closer together go out in one chunk
    limits: Limits = field(default_factory=Limits)
    model: Any = None
    tokenizer: Any = None
    scheduler: Scheduler | None = None
    info: dict[str, Any] = field(default_factory=dict)  # shown by /health and the playground
    chat: ChatFormat | None = None  # the chat template, for /v1/chat/completions
    chat_error: str | None = None  # why the template cannot be used (a broken one)
    created: int = field(default_factory=lambda: int(time.time()))
    _texts: TokenTexts | None = None
    _shared: dict[tuple, Sampling] = field(default_factory=dict)  # unseeded settings -> Sampling
    _max_chars: int = 0

    def attach(self, model: Any, tokenizer: Any, scheduler: Scheduler) -> None:
        """The model is loaded: start serving it."""
        self.model, self.tokenizer, self.scheduler = model, tokenizer, scheduler
        self._texts = TokenTexts(tokenizer)
        try:
            self.chat = chat_format(tokenizer)
        except ChatTemplateError as exc:
            self.chat_error = str(exc)
            log.warning("%s: /v1/chat/completions answers 400", exc)
        if self.chat is not None:
            log.info("chat: /v1/chat/completions applies the tokenizer's chat template; replies "
                     "end at %s", self.chat.end_names())
        # The longest token, in characters: a text longer than context x this is over the
        # context whatever it encodes to, so it is refused without encoding it.
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        longest = max((len(p) for p in pieces if isinstance(p, str)), default=64)
        self._max_chars = model.max_seq_len * max(longest, 64) * 4

    @property
    def ready(self) -> bool:
        """True once the model is loaded and its scheduler runs."""
        return self.scheduler is not None

    # -- a request's rows ---------------------------------------------------------------------

    def encode(self, prompt: str | list[int] | None, i: int, many: bool) -> list[int]:
        """A prompt's token ids, checked against the vocabulary and the context (400s)."""
        W, V = self.model.max_seq_len, self.model.config.vocab_size
        where = f"prompt {i}" if many else "prompt"
        if prompt is None:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise bad("prompt", "prompt is null but the tokenizer has no end-of-text token")
            return [eos]
        if isinstance(prompt, str):
            if len(prompt) > self._max_chars:
                raise bad("prompt", f"{where} is {len(prompt)} characters, more than the "
                                    f"model's context of {W} tokens can hold",
                          code="context_length_exceeded")
            ids = self.tokenizer.encode(prompt, verbose=False)
            if not ids:
                raise bad("prompt", f"{where} encodes to no tokens")
        else:
            ids = prompt
            bad_ids = [t for t in ids if not 0 <= t < V]
            if bad_ids:
                raise bad("prompt", f"{where} has token id {bad_ids[0]}, outside the "
                                    f"vocabulary [0, {V})")
        if len(ids) > W:
            raise bad("prompt", f"{where} has {len(ids)} tokens, but the model's context is {W} "
                                f"tokens; send at most {W} (generation past the context slides "
                                "the window)", code="context_length_exceeded")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied to `messages`: the prompt's ids (400s for messages the
        template refuses or that are over the context)."""
        W = self.model.max_seq_len
        chars = sum(len(m["content"]) for m in messages)
        if chars > self._max_chars:
            raise bad("messages", f"the messages are {chars} characters, more than the model's "
                                  f"context of {W} tokens can hold",
                      code="context_length_exceeded")
        try:
            ids = self.chat.prompt_ids(messages)
        except ChatTemplateError as exc:
            raise bad("messages", f"the model's chat template refused these messages: "
                                  f"{exc.detail}") from None
        if len(ids) > W:
            raise bad("messages", f"the messages are {len(ids)} tokens with the chat template, "
                                  f"but the model's context is {W} tokens; send fewer or "
                                  "shorter messages", code="context_length_exceeded")
        return ids

    def sampling(self, req: CompletionRequest, sample: int) -> Sampling:
        """The `Sampling` of a request's `sample`-th choice: a seeded one has its own
        generator (seed + sample); unseeded choices with equal settings share one."""
        k = req.logprobs
        if req.temperature == 0:
            key = ("greedy", req.repetition_penalty, k)
            settings: dict[str, Any] = dict(temperature=0.0)
        else:
            key = (req.temperature, req.top_k, req.top_p, req.repetition_penalty, k)
            settings = dict(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
        settings.update(repetition_penalty=req.repetition_penalty, top_logprobs=k)
        if req.seed is not None and req.temperature != 0:  # the engine seeds its generator
            return Sampling(seed=(req.seed + sample) % SEED_LIMIT, **settings)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= MAX_SHARED_SAMPLINGS:  # clients choose the keys: bounded
                del self._shared[next(iter(self._shared))]  # the oldest
            shared = self._shared[key] = Sampling(**settings)
        return shared


def create_app(server: Server) -> FastAPI:
    """The ASGI app serving `server`."""
    app = FastAPI(title="small-lm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; see GET /v1/models and "
                        "POST /v1/completions",
                   405: f"method {request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("the client of %s %s went away before sending its whole request",
                 request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("the request is not valid"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc_info=exc)
        return JSONResponse(error_body("internal server error", type="server_error"),
                            status_code=500)

    def check_access(request: Request) -> None:
        if server.api_key is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                    key.strip().encode(), server.api_key.encode()):
                raise ApiError(401, "Incorrect API key provided: send Authorization: Bearer "
                                    "KEY with the server's --api_key", code="invalid_api_key")
        if not server.ready:
            raise ApiError(503, "the model is still loading; GET /health says when it is "
                                "ready", type="server_error", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.ready:
            return JSONResponse({"status": "loading", "model": server.name}, status_code=503)
        if server.scheduler.draining:
            return JSONResponse({"status": "shutting down", "model": server.name,
                                 **server.scheduler.stats()}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.name, **server.info,
                             **server.scheduler.stats()})

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created,
                "owned_by": "small-lm"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_access(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        check_access(request)
        if model_id != server.name:
            raise ApiError(404, f"The model `{model_id}` does not exist; this server serves "
                                f"`{server.name}`", param="model", code="model_not_found")
        return JSONResponse(model_card())

    def check_model(name: str) -> None:
        if name != server.name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{server.name}` (GET /v1/models)", param="model",
                           code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        check_access(request)
        if server.chat is None and server.chat_error is None:
            raise ApiError(404, NOT_CHAT, param="model")
        chat_req = parse_chat_request(parse_json_body(await _read_body(request)))
        check_model(chat_req.model)
        if server.chat is None:
            raise ApiError(400, f"{server.chat_error}; chat is unavailable until it is fixed "
                                "(v1/completions still serves the model)",
                           param="model", code="invalid_chat_template")
        req = _chat_completion_request(server, chat_req)
        run = _ChatCompletion(server, req, request, server.chat.end_tokens)
        return await _respond(run, req)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_access(request)
        req = parse_completion_request(parse_json_body(await _read_body(request)))
        check_model(req.model)
        too_many = server.limits.max_tokens_error(req.max_tokens)
        if too_many:
            raise bad("max_tokens", too_many)
        return await _respond(_Completion(server, req, request), req)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        files = {"playground.js": "text/javascript", "playground.css": "text/css"}
        if name not in files:
            raise StarletteHTTPException(404)
        return FileResponse(STATIC / name, media_type=files[name])

    return app


async def _respond(run: _Completion, req: CompletionRequest) -> Response:
    """Queue an accepted request; answer with its stream or its whole response."""
    run.submit()
    if req.stream:
        await run.started()  # a 503 if the server shuts down before it leaves the queue
        return StreamingResponse(run.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    return JSONResponse(await run.whole())


def _chat_completion_request(server: Server, chat_req: ChatRequest) -> CompletionRequest:
    """A chat request as the completions machinery runs it: the template's prompt, and
    `max_tokens` (when not given: what is left of the context, within the server's limits)."""
    ids = server.chat_prompt(chat_req.messages)
    max_tokens = chat_req.max_tokens
    if max_tokens is None:
        n, limits = chat_req.fields["n"], server.limits
        max_tokens = max(1, min(server.model.max_seq_len - len(ids), limits.max_tokens,
                                (limits.request_tokens - len(ids)) // n))
    too_many = server.limits.max_tokens_error(max_tokens)
    if too_many:
        raise bad("max_completion_tokens", too_many)
    return chat_req.completion(ids, max_tokens)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES.

    A body over the limit is read on and dropped, a chunk at a time, up to MAX_DISCARD_BYTES in
    all, before the 413 goes out: a client that sends its whole body before reading (urllib)
    then reads the 413 rather than a reset connection, and the connection serves on. A
    Content-Length over that bound, or `Expect: 100-continue` (the client waits for a go-ahead
    before sending), gets the 413 at once, unread, as does a body without a length that passes
    the bound; then the connection is closed (`Connection: close`).
    """
    message = f"the request body is over {MAX_BODY_BYTES // 2**20} MiB"
    length = request.headers.get("content-length")
    body = request.stream()  # one generator, read on after a `break`
    read = 0
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        expects = request.headers.get("expect", "").lower() == "100-continue"
        if expects or int(length) > MAX_DISCARD_BYTES:
            read = MAX_DISCARD_BYTES + 1  # not read
    else:
        chunks = []
        async for chunk in body:
            read += len(chunk)
            if read > MAX_BODY_BYTES:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
        chunks.clear()
    if read <= MAX_DISCARD_BYTES:
        async for chunk in body:
            read += len(chunk)
            if read > MAX_DISCARD_BYTES:
                break
    await body.aclose()
    headers = {"Connection": "close"} if read > MAX_DISCARD_BYTES else None
    raise ApiError(413, message, code="request_too_large", headers=headers)


class CompletionError(Exception):
    """Generation failed after the request was accepted (non-finite logits, shutdown)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Completion:
    """One accepted request: its job in the scheduler and its choices' text.

    `end_tokens`: ids that end a choice besides the model's end-of-text token (a chat's end of
    turn).
    """

    ID_PREFIX = "cmpl-"

    def __init__(self, server: Server, req: CompletionRequest, request: Request,
                 end_tokens: tuple[int, ...] = ()) -> None:
        self.server, self.req, self.request = server, req, request
        self.id = self.ID_PREFIX + secrets.token_hex(12)
        self.created = int(time.time())
        many = len(req.prompts) > 1
        self.prompts = [server.encode(p, i, many) for i, p in enumerate(req.prompts)]
        too_many = server.limits.request_error(sum(len(p) for p in self.prompts),
                                               len(self.prompts) * req.n, req.max_tokens)
        if too_many:
            raise bad("max_tokens", too_many)
        self.choices: list[ChoiceText] = []
        self.echo: list[str] = []  # each choice's echoed prompt text
        specs = []
        end, ends = server.model.end_token, frozenset(end_tokens)
        for p, ids in enumerate(self.prompts):
            for s in range(req.n):
                index = p * req.n + s
                self.choices.append(ChoiceText(server._texts, ids, req.stop, end,
                                               req.logprobs is not None, end_tokens=ends))
                if req.max_tokens > 0:
                    specs.append(ChoiceSpec(index, ids, server.sampling(req, s), req.max_tokens,
                                            ends))
        score = req.echo and req.logprobs is not None
        self.job = Job(self.id, specs, asyncio.get_running_loop(),
                       score_prompts=self.prompts if score else None,
                       score_k=req.logprobs or 0,
                       interval=server.stream_interval if req.stream else 0.0,
                       timeout=server.limits.timeout)
        self.needs_job = bool(specs) or score
        self.done = False

    def submit(self) -> None:
        if not self.needs_job:
            return
        try:
            self.server.scheduler.submit(self.job)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry after {RETRY_AFTER_S} s",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDownError as exc:
            raise ApiError(503, str(exc), type="server_error") from None

    async def started(self) -> None:
        """Wait until the job leaves the queue (a client that goes away meanwhile frees its
        place). Raises `ApiError` (503 at shutdown) if it ends before it starts."""
        if not self.needs_job:
            return
        watcher = asyncio.ensure_future(self._watch_disconnect())
        try:
            item = await self.job.queue.get()
        finally:
            watcher.cancel()
        if item[0] == "error":
            self.done = True
            raise ApiError(item[2], item[1], type="server_error")

    async def _get(self) -> tuple:
        """The job's next item, past the `("started",)` mark."""
        item = await self.job.queue.get()
        return await self.job.queue.get() if item[0] == "started" else item

    def close(self, reason: str) -> None:
        if self.needs_job and not self.done:
            self.done = True
            self.server.scheduler.release(self.job, None, reason)

    # -- the pieces of the response, in order ---------------------------------------------------

    def _echo(self, scores: list[Any] | None) -> list[tuple[int, str, list | None]]:
        """The echoed prompts, one piece per choice: (index, text, entries or None)."""
        out = []
        want = self.req.logprobs is not None
        for p, ids in enumerate(self.prompts):
            text, entries = prompt_entries(self.server._texts, ids,
                                           None if scores is None else scores[p])
            for s in range(self.req.n):
                index = p * self.req.n + s
                self.choices[index].start = len(text)
                out.append((index, text, list(entries) if want else None))
        return out

    async def pieces(self) -> AsyncIterator[list[tuple[int, str, list | None, str | None]]]:
        """Batches of `(index, text, entries or None, finish_reason)` as they become ready: one
        per item of generated tokens the scheduler posts (it holds a stream's tokens for
        `Server.stream_interval`: see `Job.interval`), or several items if they came at once."""
        req, job = self.req, self.job
        want = req.logprobs is not None
        if req.echo:
            scores = None
            if want:
                item = await self._get()
                if item[0] == "error":
                    raise CompletionError(item[1], item[2])
                scores = item[1]
            first = self._echo(scores)
            if req.max_tokens == 0:
                for ct in self.choices:
                    ct.finish("length")
                yield [(i, text, entries, "length") for i, text, entries in first]
                self.done = True
                return
            yield [(i, text, entries, None) for i, text, entries in first]
        elif req.max_tokens == 0:
            for ct in self.choices:
                ct.finish("length")
            yield [(i, "", [] if want else None, "length") for i in range(len(self.choices))]
            return
        open_choices = len(self.choices)
        while open_choices:
            items = [await self._get()]
            while not job.queue.empty():
                items.append(job.queue.get_nowait())
            touched: dict[int, None] = {}  # choices fed by these items, in order
            for item in items:
                if item[0] == "error":
                    raise CompletionError(item[1], item[2])
                if item[0] != "tokens":
                    continue
                for index, tok, lp, top, finish in item[1]:
                    ct = self.choices[index]
                    if ct.finished:
                        continue
                    if tok is None:  # the time limit ended it
                        ct.finish(finish)
                    else:
                        ct.feed(tok, lp, top, finish)
                    touched[index] = None
                    if ct.finished:
                        open_choices -= 1
                        if ct.stopped_by_string and finish is None:
                            self.server.scheduler.release(job, index, "stop")
            batch = []
            for index in touched:
                ct = self.choices[index]
                text, entries = ct.take()
                if text or entries or ct.finished:
                    batch.append((index, text, entries if want else None, ct.finish_reason))
            if batch:
                yield batch
        self.done = True

    def usage(self) -> dict[str, int]:
        return usage_object(sum(len(p) for p in self.prompts),
                            sum(ct.tokens for ct in self.choices))

    async def whole(self) -> dict[str, Any]:
        """The whole response (stream: false); a client that goes away frees its rows."""
        watcher = asyncio.ensure_future(self._watch_disconnect())
        texts = {i: [] for i in range(len(self.choices))}
        entries: dict[int, list] = {i: [] for i in range(len(self.choices))}
        try:
            async for batch in self.pieces():
                for index, text, ents, _ in batch:
                    texts[index].append(text)
                    if ents:
                        entries[index] += ents
        except CompletionError as exc:
            raise ApiError(exc.status, str(exc), type="server_error") from None
        finally:
            watcher.cancel()
            self.close("")
        want = self.req.logprobs is not None
        return self._whole_object({i: "".join(t) for i, t in texts.items()},
                                  entries if want else None)

    def _whole_object(self, texts: dict[int, str], entries: dict[int, list] | None
                      ) -> dict[str, Any]:
        choices = [choice_object(i, texts[i], None if entries is None else entries[i],
                                 ct.finish_reason) for i, ct in enumerate(self.choices)]
        return completion_object(self.id, self.created, self.server.name, choices, self.usage())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None, with_usage: bool
               ) -> bytes:
        """One streamed event; `usage` null on all but the last when `with_usage`."""
        obj = completion_object(self.id, self.created, self.server.name, choices, usage)
        if not with_usage:
            del obj["usage"]
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def _stream_choice(self, index: int, text: str, entries: list | None,
                       reason: str | None) -> dict[str, Any]:
        return choice_object(index, text, entries, reason)

    def _opening(self, with_usage: bool) -> bytes:
        """What a stream sends before its first piece (nothing for completions)."""
        return b""

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.close("disconnect")
                return

    async def sse(self) -> AsyncIterator[bytes]:
        """The streamed response: one chunk per choice and step (as ready), `[DONE]` last."""
        with_usage = self.req.include_usage
        finished = False
        try:
            try:
                opening = self._opening(with_usage)
                if opening:
                    yield opening
                async for batch in self.pieces():
                    yield b"".join(self._chunk([self._stream_choice(i, text, ents, reason)],
                                               None, with_usage)
                                   for i, text, ents, reason in batch)
                if with_usage:
                    yield self._chunk([], self.usage(), True)
            except CompletionError as exc:
                err = error_body(str(exc), type="server_error")
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
            finished = True
            yield b"data: [DONE]\n\n"
        finally:
            # not finished: the client went away (the task was cancelled) or a send failed
            self.close("" if finished else "disconnect")


class _ChatCompletion(_Completion):
    """A chat completion: the completions machinery on the template's prompt, in OpenAI's chat
    objects (`message`, streamed `delta`s opened by the assistant's role, logprobs `content`)."""

    ID_PREFIX = "chatcmpl-"

    def _logprobs(self, entries: list | None) -> dict[str, Any] | None:
        return None if entries is None else chat_logprobs(self.server._texts, entries)

    def _whole_object(self, texts: dict[int, str], entries: dict[int, list] | None
                      ) -> dict[str, Any]:
        choices = [chat_choice(i, texts[i], self._logprobs(None if entries is None
                                                           else entries[i]),
                               ct.finish_reason) for i, ct in enumerate(self.choices)]
        return chat_object(self.id, self.created, self.server.name, choices, self.usage())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None, with_usage: bool
               ) -> bytes:
        obj = chat_object(self.id, self.created, self.server.name, choices, usage, chunk=True)
        if not with_usage:
            del obj["usage"]
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def _stream_choice(self, index: int, text: str, entries: list | None,
                       reason: str | None) -> dict[str, Any]:
        return chat_delta(index, {"content": text} if text else {}, self._logprobs(entries),
                          reason)

    def _opening(self, with_usage: bool) -> bytes:
        """Each choice's first delta: the assistant's role, no text yet."""
        return b"".join(self._chunk([chat_delta(i, {"role": "assistant", "content": ""}, None,
                                                None)], None, with_usage)
                        for i in range(len(self.choices)))
