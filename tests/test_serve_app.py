"""The server's app in this process (httpx's ASGI transport): the loading state and a model
whose logits are NaN. The real process is tested in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch

from model.checkpoint import build_model
from model.tokenizer import load_tokenizer
from serve.app import Server, create_app
from serve.completions import ChoiceText, TokenTexts
from serve.scheduler import Scheduler


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _model(tiny_checkpoint, tokenizer, nan: bool):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    if nan:  # one NaN in the last MLP: every logit is NaN
        sd = dict(ckpt["model_state_dict"])
        w = sd["transformer.h.1.mlp.c_fc.weight"].clone()
        w[0, 0] = math.nan
        sd["transformer.h.1.mlp.c_fc.weight"] = w
        ckpt = {**ckpt, "model_state_dict": sd}
    return build_model(ckpt, "cpu", tokenizer, allow_nonfinite=nan)


async def _requests(server: Server, attach) -> dict:
    app = create_app(server)
    out = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        out["loading"] = await c.get("/health")
        out["early"] = await c.post("/v1/completions", json={"model": "m", "prompt": "Hi"})
        attach()
        body = {"model": "m", "prompt": "Hi", "max_tokens": 5}
        out["whole"] = await c.post("/v1/completions", json=body)
        out["stream"] = await c.post("/v1/completions", json={**body, "stream": True})
        out["health"] = await c.get("/health")
    return out


def test_loading_state_and_nonfinite_logits(tiny_checkpoint, tokenizer, one_thread):
    model = _model(tiny_checkpoint, tokenizer, nan=True)
    server = Server(name="m")
    scheduler = Scheduler(model, max_batch=2, max_queue=2)

    def attach():
        scheduler.start()
        server.attach(model, tokenizer, scheduler)

    try:
        out = asyncio.run(_requests(server, attach))
    finally:
        scheduler.stop()
    assert out["loading"].status_code == 503 and out["loading"].json()["status"] == "loading"
    assert out["early"].status_code == 503 and "loading" in out["early"].json()["error"]["message"]
    whole = out["whole"]
    assert whole.status_code == 500 and "non-finite" in whole.json()["error"]["message"]
    events = out["stream"].text.split("\n\n")
    assert out["stream"].status_code == 200 and events[-2:] == ["data: [DONE]", ""]
    assert "non-finite" in json.loads(events[-3].removeprefix("data: "))["error"]["message"]
    health = out["health"].json()
    assert health["status"] == "ok" and health["running"] == 0  # and it serves on


def test_choice_text_holds_entries_until_their_text_is_out(tokenizer):
    """A token's entry comes out with its text (so streamed and whole offsets agree); the
    offsets of tokens cut off by a stop string end at the cut."""
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(" one two three four")  # " one", " two", " three", " four"

    def run(stop: str) -> tuple[ChoiceText, list]:
        ct = ChoiceText(texts, [50256], (stop,), None, logprobs=True, start=3)
        pieces = []
        for t in ids:
            ct.feed(t, -1.0, [(t, -1.0)], finish="length" if t == ids[-1] else None)
            pieces.append(ct.take())
        return ct, pieces

    ct, pieces = run(" two x")  # " two" could begin the stop string: held, then released
    assert [p[0] for p in pieces] == [" one", "", " two three", " four"]
    assert [[e.token for e in p[1]] for p in pieces] == [[" one"], [], [" two", " three"],
                                                       [" four"]]
    assert ct.finish_reason == "length" and ct.tokens == 4
    ct, pieces = run("o th")
    assert [p[0] for p in pieces] == [" one", " tw", "", ""]  # cut before "o th"
    entries = [e for p in pieces for e in p[1]]
    assert [e.offset for e in entries] == [3, 7, 10]  # " three" starts past the cut: at it
    assert ct.finish_reason == "stop" and ct.tokens == 3


def _held_batches(tiny_checkpoint, tokenizer, interval: float, script) -> list[tuple[float, list]]:
    """Run one streamed request's `pieces(interval)` against a job queue fed by `script`
    (an async function of (post, batches, ready)); returns (loop time, batch) per batch."""
    from serve.app import _Completion
    from serve.protocol import parse_completion_request

    model = _model(tiny_checkpoint, tokenizer, nan=False)
    server = Server(name="m")
    server.attach(model, tokenizer, scheduler=None)
    req = parse_completion_request({"model": "m", "prompt": "Hi", "max_tokens": 8,
                                    "stream": True, "logprobs": 0})

    async def main() -> list[tuple[float, list]]:
        run = _Completion(server, req, request=None)
        loop = asyncio.get_running_loop()
        batches: list[tuple[float, list]] = []
        ready = asyncio.Event()

        async def consume() -> None:
            async for batch in run.pieces(interval):
                batches.append((loop.time(), batch))
                ready.set()

        def post(token: int, finish: str | None = None) -> None:
            run.job.queue.put_nowait(("tokens", [(0, token, -1.0, [], finish)]))

        consumer = asyncio.ensure_future(consume())
        await asyncio.wait_for(script(post, batches, ready), 30)
        await asyncio.wait_for(consumer, 30)
        return batches

    return asyncio.run(main())


def test_streamed_tokens_closer_than_the_interval_go_out_together(tiny_checkpoint, tokenizer):
    ids = tokenizer.encode(" one two three four five")

    async def wait_batch(batches, ready, n: int, timeout: float = 5.0) -> None:
        while len(batches) < n:  # an event per batch; a held batch would time out here
            ready.clear()
            await asyncio.wait_for(ready.wait(), timeout)

    # A long interval: the first token goes out at once, the rest is held until the choice
    # ends, which sends it at once too (well before the interval would).
    async def ends(post, batches, ready) -> None:
        post(ids[0])
        await wait_batch(batches, ready, 1)
        post(ids[1])
        post(ids[2])
        await asyncio.sleep(0)  # let the consumer see them (and hold them)
        assert len(batches) == 1
        post(ids[3], "length")
        await wait_batch(batches, ready, 2)

    batches = _held_batches(tiny_checkpoint, tokenizer, 30.0, ends)
    assert [[piece[1] for piece in batch] for _, batch in batches] == [[" one"],
                                                                       [" two three four"]]
    assert [e.token for e in batches[1][1][0][2]] == [" two", " three", " four"]
    assert batches[1][1][0][3] == "length" and batches[0][1][0][3] is None

    # A short interval: held tokens go out when it is up, without another token to wake them.
    async def timer(post, batches, ready) -> None:
        post(ids[0])
        await wait_batch(batches, ready, 1)
        post(ids[1])
        post(ids[2])
        await wait_batch(batches, ready, 2)
        post(ids[3])
        await wait_batch(batches, ready, 3)
        post(ids[4], "length")
        await wait_batch(batches, ready, 4)

    batches = _held_batches(tiny_checkpoint, tokenizer, 0.2, timer)
    assert [[piece[1] for piece in batch] for _, batch in batches] == [
        [" one"], [" two three"], [" four"], [" five"]]
    times = [t for t, _ in batches]
    assert times[1] - times[0] >= 0.2 - 1e-3 and times[2] - times[1] >= 0.2 - 1e-3
    # interval 0: every token as it comes
    async def each(post, batches, ready) -> None:
        for i, t in enumerate(ids[:4]):
            post(t, "length" if i == 3 else None)
            await wait_batch(batches, ready, i + 1)

    batches = _held_batches(tiny_checkpoint, tokenizer, 0.0, each)
    assert [[piece[1] for piece in batch] for _, batch in batches] == [
        [" one"], [" two"], [" three"], [" four"]]


def test_a_long_stream_interval_sends_the_first_token_then_the_rest(tiny_checkpoint, tokenizer,
                                                                     one_thread):
    """Through the app and a real scheduler: with `stream_interval` longer than the whole
    generation, the stream is at most two chunks (the first token; the rest with the finish),
    the same text and token entries as the whole response."""
    model = _model(tiny_checkpoint, tokenizer, nan=False)
    server = Server(name="m", stream_interval=60.0)
    scheduler = Scheduler(model, max_batch=2, max_queue=2)
    scheduler.start()
    server.attach(model, tokenizer, scheduler)
    body = {"model": "m", "prompt": "Hi", "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "stream_options": {"include_usage": True}}

    async def requests() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                                     base_url="http://test", timeout=30) as c:
            whole = await c.post("/v1/completions", json={k: v for k, v in body.items()
                                                           if k != "stream_options"})
            stream = await c.post("/v1/completions", json={**body, "stream": True})
            return whole, stream

    try:
        whole, stream = asyncio.run(requests())
    finally:
        scheduler.stop()
    assert whole.status_code == 200 and stream.status_code == 200, (whole.text, stream.text)
    events = stream.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    texts = [c["choices"][0] for c in chunks if c["choices"]]
    # the first chunk holds what had come when the stream began (a token, or more on a busy
    # machine), the second the rest; without the interval there would be a chunk per step
    assert 1 <= len(texts) <= 2 and chunks[-1]["usage"]["completion_tokens"] == 12
    assert sum(len(t["logprobs"]["tokens"]) for t in texts) == 12
    assert [t["finish_reason"] for t in texts] == [None] * (len(texts) - 1) + ["length"]
    choice = whole.json()["choices"][0]
    assert "".join(t["text"] for t in texts) == choice["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((t["logprobs"][key] for t in texts), []) == choice["logprobs"][key]
