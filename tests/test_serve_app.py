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
