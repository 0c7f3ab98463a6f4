"""The server's app in this process (httpx's ASGI transport): the loading state and a model
whose logits are NaN. The real process is tested in tests/serve/test_server.py."""

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


def _posted(interval: float, steps: list[tuple[float, str | None]], flush_at: float | None = None
            ) -> list[list[int]]:
    """Feed a `Job` one token event per (monotonic time, finish) in `steps` (token ids 0, 1,
    ...), then `flush` it at `flush_at` if given; returns the token ids of each item it posted."""
    from serve.scheduler import Job

    async def main() -> list[list[int]]:
        job = Job("j", [], asyncio.get_running_loop(), interval=interval)
        for tok, (now, finish) in enumerate(steps):
            job.post_tokens([(0, tok, -1.0, None, finish)], now)
        if flush_at is not None:
            job.flush(flush_at)
        await asyncio.sleep(0)  # run the loop's call_soon_threadsafe callbacks
        items = []
        while not job.queue.empty():
            item = job.queue.get_nowait()
            assert item[0] == "tokens"
            items.append([ev[1] for ev in item[1]])
        return items

    return asyncio.run(main())


def test_token_events_closer_than_the_interval_are_posted_together():
    # 20 ms: the first step's token at once; the next ones held until a step ends 20 ms or more
    # after that post; the step where the choice ends posts what is held at once.
    steps = [(100.000, None), (100.005, None), (100.012, None), (100.021, None),
             (100.030, None), (100.041, None), (100.045, "length")]
    assert _posted(0.02, steps) == [[0], [1, 2, 3], [4, 5, 6]]
    # interval 0: every step's token as it comes
    assert _posted(0.0, steps) == [[i] for i in range(7)]
    # a long interval: the first token, then the rest when the choice ends
    assert _posted(60.0, steps) == [[0], [1, 2, 3, 4, 5, 6]]
    # held tokens go out on `flush` (before an error); nothing held, nothing posted
    assert _posted(60.0, steps[:3], flush_at=100.013) == [[0], [1, 2]]
    assert _posted(60.0, steps[:1], flush_at=100.013) == [[0]]


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
