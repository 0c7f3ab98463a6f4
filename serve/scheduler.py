"""Continuous batching: one thread steps the decode engine; requests join and leave between steps.

The HTTP handlers (asyncio, `serve/app.py`) hand the scheduler a `Job`: the rows (choices) of
one request. The scheduler's thread owns the model and a `model.engine.DecodeEngine` of
`max_batch` slots. Before every step it applies releases (a finished stop string, a client that
went away), admits waiting rows into free slots (a request that arrives while others decode
joins at the next step), then runs one step for every row and posts each row's new token to its
job's asyncio queue (a streamed job's at most every `Job.interval` seconds, several at once). A
row that used its `max_tokens`, or sampled the end-of-text token, leaves at once. Requests that
cannot start wait in a queue of at most `max_queue`; beyond it `submit` refuses them (HTTP 429).
A job with a `timeout` ends when that many seconds have passed since its first row started:
its rows are freed at the next step and its choices end with finish_reason "length".

`drain(grace)` (SIGTERM) stops taking jobs: those not started yet get a 503 error at once, the
running ones decode on for up to `grace` seconds, then get the 503 error; the thread ends when
none is left.

Every row is sampled by the engine with the samplers of `model/sampling.py`: there is no
second sampler here. Rows with the same settings and no seed share one `Sampling` (one sampler
call per step for all of them); a seeded row has its own generator, so its text does not depend
on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.engine import DecodeEngine, Row
from model.sampling import Sampling

log = logging.getLogger("serve")


@dataclass
class ChoiceSpec:
    """One row to generate: a prompt's `n`-th sample."""

    index: int  # the choice's index in the response
    prompt: list[int]
    sampling: Sampling
    max_tokens: int  # >= 1
    end_tokens: frozenset[int] = frozenset()  # more ids that end it (a chat's end of turn)


@dataclass(eq=False)
class Job:
    """One request's rows and the queue their tokens arrive on (in the request's event loop).

    Items put on `queue`: `("started",)` first, when the job leaves the queue for the engine
    (nothing comes before it but an error); `("scores", [TokenScores | None per prompt])`
    once, when the job starts and `score_prompts` is set (echo with logprobs);
    `("tokens", [event, ...])` after a step (see `interval`), an event being
    `(index, token, logprob, top, finish)` with `top` a list of `(id, logprob)` (None without
    `top_logprobs`) and `finish` "length", "stop" (end-of-text, or one of the choice's
    `end_tokens`) or None, or
    `(index, None, None, None, "length")` for a choice the time limit (`timeout`) ended;
    `("error", message, status)` if generation failed (status: the HTTP status a response not
    yet started gets: 500, or 503 when the server shuts down); `("done",)` for a job without
    rows.

    `interval` (seconds) is the least time between two `"tokens"` items: a step's events that
    come sooner after the last item are held, and go with those of the first step that ends
    after the interval is up (so a stream's chunks are that far apart, and its event loop
    wakes that rarely). The first events, and a step's events where a choice ends, go at once.
    0: an item after every step.

    `timeout` (seconds, None: none) bounds the job's decoding, counted from when its first row
    starts (time waiting in the queue is not counted).
    """

    id: str
    choices: list[ChoiceSpec]
    loop: asyncio.AbstractEventLoop
    score_prompts: list[list[int]] | None = None
    score_k: int = 0
    interval: float = 0.0
    timeout: float | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: deque = field(init=False)
    rows: dict[int, Row] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    started: bool = False
    closed: bool = False
    held: list = field(default_factory=list, init=False)  # events not yet posted (`interval`)
    posted_at: float = field(default=float("-inf"), init=False)  # of the last post (monotonic)
    deadline: float = field(default=float("inf"), init=False)  # monotonic; set when it starts

    def __post_init__(self) -> None:
        self.pending = deque(self.choices)

    def post(self, item: Any) -> None:
        """Put an item on the job's queue from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    def post_tokens(self, events: list, now: float) -> None:
        """Post a step's token events, or hold them if the last post is under `interval`
        seconds old and no choice ends (engine thread; `now`: `time.monotonic()`)."""
        self.held += events
        if now - self.posted_at >= self.interval or any(e[4] is not None for e in events):
            self.flush(now)

    def flush(self, now: float) -> None:
        """Post the held token events, if any (before an error, so none is lost)."""
        if self.held:
            self.post(("tokens", self.held))
            self.held, self.posted_at = [], now


class QueueFullError(Exception):
    """The waiting queue is full; the request should be retried later."""


class ShuttingDownError(Exception):
    """The server is shutting down and takes no new requests."""


class Scheduler:
    """The engine's thread and its queue. Thread-safe: `submit`, `release`, `stats`, `stop`.

    Args:
        model: a `LanguageModel` (with `end_token` set); used by this scheduler's thread only.
        max_batch: rows that decode together (the engine's slots).
        max_queue: requests that may wait for a slot.
        autocast: a dtype to run the model under `torch.autocast` (GPU bf16/fp16), or None.
    """

    def __init__(self, model: Any, max_batch: int, max_queue: int,
                 autocast: torch.dtype | None = None) -> None:
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.autocast = autocast
        self.end_token = model.end_token
        self._cond = threading.Condition(threading.RLock())  # RLock: see `shutdown`
        self._waiting: deque[Job] = deque()
        self._releases: list[tuple[Job, int | None, str]] = []
        self._owner: dict[int, tuple[Job, ChoiceSpec]] = {}  # slot -> its job and choice
        self._stopping = False
        self._draining = False
        self._drain_deadline = float("inf")
        self._on_drained: Callable[[], None] | None = None
        self._running_rows = 0
        self.steps = 0
        self.peak_rows = 0
        self.tokens = 0
        self.engine: DecodeEngine | None = None
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop taking requests and end every job (with a 503 error) at the next step; returns
        at once (safe in a signal handler: the lock is reentrant)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def drain(self, grace: float, on_done: Callable[[], None] | None = None) -> None:
        """Stop taking requests, gracefully; returns at once (safe in a signal handler).

        Jobs not started yet get a 503 error at the next step; running ones decode on for up
        to `grace` seconds, then get the 503 error. Then the engine's thread ends and calls
        `on_done` (from that thread). A second call changes nothing; `shutdown` ends it now.
        """
        with self._cond:
            if self._draining or self._stopping:
                return
            self._draining = True
            self._drain_deadline = time.monotonic() + grace
            self._on_drained = on_done
            self._cond.notify()

    @property
    def draining(self) -> bool:
        """True once `drain` or `shutdown` was called: no new request is taken."""
        return self._draining or self._stopping

    def stop(self, timeout: float = 10.0) -> None:
        """`shutdown`, then wait for the engine's thread to end."""
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _queued_jobs(self) -> int:
        """Waiting jobs that cannot start at the next step (their rows do not fit)."""
        free = self.max_batch - self._running_rows
        queued = 0
        for job in self._waiting:
            need = len(job.pending)
            if need <= free and not queued:
                free -= need
            else:
                queued += 1
        return queued

    def submit(self, job: Job) -> None:
        """Queue a job; its rows start as slots free up.

        Raises:
            QueueFullError: `max_queue` jobs already wait and this one cannot start now.
            ShuttingDownError: the server is shutting down.
        """
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDownError("the server is shutting down")
            free = self.max_batch - self._running_rows - sum(len(j.pending)
                                                             for j in self._waiting)
            if len(job.pending) > free and self._queued_jobs() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def release(self, job: Job, index: int | None = None, reason: str = "") -> None:
        """Free a job's row `index` (None: all its rows, and its place in the queue) before the
        next step. `reason` is logged ("disconnect", ...)."""
        with self._cond:
            self._releases.append((job, index, reason))
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": self._running_rows, "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "steps": self.steps, "peak_running": self.peak_rows,
                    "tokens_generated": self.tokens}

    # -- the engine's thread --------------------------------------------------------------------

    def _compute(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.autocast)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with self._compute():
            self.engine = DecodeEngine(self.model, self.max_batch)
            try:
                while True:
                    with self._cond:
                        while not (self._waiting or self._owner or self._releases
                                   or self._stopping or self._draining):
                            self._cond.wait()
                        if self._stopping:
                            break
                        releases, self._releases = self._releases, []
                    self._apply(releases)
                    if self._draining and self._drained():
                        break
                    self._expire()
                    self._admit()
                    if self._owner:
                        self._step()
            finally:
                self._fail_all("the server is shutting down", 503)
                self.engine.close()
                if self._on_drained is not None:
                    self._on_drained()

    def _drained(self) -> bool:
        """While draining: refuse the jobs not started (503); True when the running ones are
        done or the grace period is over (the caller then ends the rest)."""
        with self._cond:
            refused = [j for j in self._waiting if not j.started]
            for job in refused:
                self._waiting.remove(job)
        for job in refused:
            job.closed = True
            job.pending.clear()
            job.post(("error", "the server is shutting down", 503))
        if refused:
            log.info("shutting down: %d queued requests refused (503)", len(refused))
        if not self._owner and not self._waiting:
            return True
        if time.monotonic() >= self._drain_deadline:
            log.info("shutting down: the grace period is over; %d rows end with an error",
                     len(self._owner))
            return True
        return False

    def _expire(self) -> None:
        """End the jobs whose time limit is up: free their rows, end their choices ("length")."""
        now = time.monotonic()
        jobs = {id(j): j for j, _ in self._owner.values() if j.deadline <= now}
        with self._cond:
            if self._waiting and self._waiting[0].deadline <= now:
                job = self._waiting.popleft()  # started, some choices not yet admitted
                jobs[id(job)] = job
        for job in jobs.values():
            indices = list(job.rows) + [spec.index for spec in job.pending]
            done = sum(job.generated.values())
            for row in job.rows.values():
                self._drop(row)
            job.rows.clear()
            job.pending.clear()
            job.closed = True
            job.post_tokens([(i, None, None, None, "length") for i in indices], now)
            log.info("%s: the time limit of %g s ended it after %d tokens; %d choices ended",
                     job.id, job.timeout, done, len(indices))

    def _apply(self, releases: list[tuple[Job, int | None, str]]) -> None:
        for job, index, reason in releases:
            if index is None:
                with self._cond:
                    if job in self._waiting:
                        self._waiting.remove(job)
                job.pending.clear()
                job.closed = True
            freed = 0
            for i, row in list(job.rows.items()):
                if index is None or i == index:
                    self._drop(row)
                    del job.rows[i]
                    freed += 1
            if index is None:
                job.post(("error", "the request was cancelled", 500))
            if reason == "disconnect":
                done = sum(job.generated.values())
                log.info("%s: the client went away after %d tokens; %d rows freed before "
                         "step %d", job.id, done, freed, self.steps + 1)

    def _drop(self, row: Row) -> None:
        """Free a row's slot; `stats` counts it at once (before its job hears it ended)."""
        self.engine.release(row)
        self._owner.pop(row.slot, None)
        self._count_rows()

    def _count_rows(self) -> None:
        with self._cond:
            self._running_rows = len(self._owner)
            self.peak_rows = max(self.peak_rows, self._running_rows)

    def _admit(self) -> None:
        """Move waiting rows into free slots, in arrival order."""
        while True:
            with self._cond:
                if not self._waiting:
                    break
                job = self._waiting[0]
                if job.pending and not self.engine.free_slots:
                    break
            if not job.started:
                job.started = True
                if job.timeout is not None:
                    job.deadline = time.monotonic() + job.timeout
                job.post(("started",))
                if job.score_prompts is not None:
                    job.post(("scores", self._score(job)))
            if job.pending:
                spec = job.pending.popleft()
                row = self.engine.add(torch.tensor(spec.prompt, dtype=torch.long),
                                      spec.sampling)
                job.rows[spec.index] = row
                job.generated[spec.index] = 0
                self._owner[row.slot] = (job, spec)
            if not job.pending:
                with self._cond:
                    if self._waiting and self._waiting[0] is job:
                        self._waiting.popleft()
                if not job.choices:
                    job.post(("done",))
        self._count_rows()

    def _score(self, job: Job) -> list[Any]:
        """The prompts' own token scores (echo with logprobs), on this thread's model."""
        from model.scoring import score

        out = []
        for ids in job.score_prompts:
            if len(ids) < 2:
                out.append(None)  # a lone token has nothing before it to be scored from
            else:
                out.append(score(self.model, torch.tensor(ids), top_k=job.score_k))
        return out

    def _step(self) -> None:
        engine = self.engine
        try:
            out = engine.step()
            tokens = out.tokens.tolist()
            bad = out.nonfinite.tolist()
            probs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
            for members, rec in out.records:
                lps = rec.raw_logprobs.tolist()
                ids, tops = rec.raw_top_ids.tolist(), rec.raw_top_logprobs.tolist()
                for j, r in enumerate(members):
                    probs[r.slot] = (lps[j], list(zip(ids[j], tops[j], strict=True)))
        except Exception as exc:  # noqa: BLE001 - a failed step must not stop the server
            log.exception("a decode step failed; its requests get an error")
            self._fail_all(f"generation failed: {type(exc).__name__}", 500)
            engine.close()
            self.engine = DecodeEngine(self.model, self.max_batch)
            return
        self.steps += 1
        now = time.monotonic()
        events: dict[int, tuple[Job, list]] = {}
        for slot, (job, spec) in list(self._owner.items()):
            if job.closed:  # another of its rows failed this step
                continue
            if bad[slot]:  # freed before the job hears of it: /health counts it at once
                self._release_job(job)
                job.flush(now)
                job.post(("error", "the model produced non-finite logits (NaN or inf): its "
                                   "weights are broken or the dtype overflowed", 500))
                continue
            tok = tokens[slot]
            done = job.generated[spec.index] = job.generated[spec.index] + 1
            finish = ("stop" if tok == self.end_token or tok in spec.end_tokens
                      else "length" if done >= spec.max_tokens else None)
            lp, top = probs.get(slot, (None, None))
            events.setdefault(id(job), (job, []))[1].append((spec.index, tok, lp, top, finish))
            self.tokens += 1
            if finish is not None:
                self._drop(job.rows.pop(spec.index))
        for job, evs in events.values():
            job.post_tokens(evs, now)
        self._count_rows()

    def _release_job(self, job: Job) -> None:
        for row in job.rows.values():
            self._drop(row)
        job.rows.clear()
        job.pending.clear()
        job.closed = True

    def _fail_all(self, message: str, status: int) -> None:
        jobs = {id(j): j for j, _ in self._owner.values()}
        with self._cond:
            jobs.update({id(j): j for j in self._waiting})
            self._waiting.clear()
        for job in jobs.values():
            if self.engine is not None:
                self._release_job(job)
        self._owner.clear()
        self._count_rows()
        now = time.monotonic()
        for job in jobs.values():  # after the rows are freed, so /health already counts them
            job.flush(now)
            job.post(("error", message, status))


def now() -> int:
    return int(time.time())
