"""/v1/chat/completions through the official openai client: a tiny model whose tokenizer has a
ChatML template (tests/chat_model.py). The prompt is exactly the template's tokens, the reply is
the model's own greedy one cut at the end of the turn, streamed equals whole; a base model keeps
the 404, a broken template is a one-line 400, and bad messages are 400s.

The chat server is a real process (tests/serving.py); the refusals run the app in this process.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from chat_model import BROKEN, CHATML, CONTEXT, IM_END, STOPPING, save_chat_checkpoint
from serving import ServerProcess

from model.loading import load_for_inference
from model.scoring import score
from serve.app import Server, create_app
from serve.scheduler import Scheduler

NAME = "chat"
REFUSES_SYSTEM = ("{% if messages[0]['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-models")
    return {kind: save_chat_checkpoint(root / f"{kind}.pt", template)
            for kind, template in (("chat", CHATML), ("base", None), ("broken", BROKEN),
                                   ("no-system", REFUSES_SYSTEM))}


@pytest.fixture(scope="module")
def local(checkpoints, one_thread):
    loaded = load_for_inference(checkpoints["chat"], device="cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def server(checkpoints):
    srv = ServerProcess("--checkpoint", str(checkpoints["chat"]), "--model_name", NAME,
                        "--max_batch", "4", "--max_tokens_limit", "200")
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log_text()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                       timeout=120) as c:
        yield c


def template_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]


def greedy_reply(local, messages, max_tokens: int) -> tuple[list[int], list[int], bool]:
    """In this process: (the template's prompt ids, the greedy reply's ids up to the end of
    the turn, whether the turn ended)."""
    model, tok = local
    ids = template_ids(tok, messages)
    ends = {tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)}
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), max_new_tokens=max_tokens, temperature=0)
    new = out[0, len(ids):].tolist()
    for k, t in enumerate(new):
        if t in ends:
            return ids, new[:k], True
    return ids, new, False


def test_prompt_is_the_templates_and_the_reply_the_models_greedy_one(client, local):
    model, tok = local
    ids, reply, ended = greedy_reply(local, STOPPING, 20)
    assert ended and len(reply) >= 2  # the fixture's model ends this turn with <|im_end|>
    r = client.chat.completions.create(model=NAME, messages=STOPPING, temperature=0,
                                       max_completion_tokens=20, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(reply) + 1  # the end of the turn counts
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == tok.decode(reply)
    content = choice.logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in reply]
    ours = score(model, torch.tensor(ids + reply), top_k=3)
    for i, c in enumerate(content):
        assert abs(c.logprob - float(ours.logprobs[len(ids) + i])) < 1e-4
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
        assert [t.token for t in c.top_logprobs] == [
            tok.decode([t]) for t in ours.top_ids[len(ids) + i].tolist()]
    assert bytes(b for c in content for b in c.bytes) == tok.decode(reply).encode("utf-8")


def test_a_long_reply_stops_at_the_limit_or_a_stop_string(client, local):
    messages = [{"role": "user", "content": "the queen and the night"}]
    ids, reply, ended = greedy_reply(local, messages, 12)
    assert not ended
    text = local[1].decode(reply)
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                       max_tokens=12)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(ids)
    stop = text[4:6]
    assert len(stop) == 2 and text.find(stop) >= 1
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                       max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    # without max_tokens the reply may use what is left of the context
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    _, longest, _ = greedy_reply(local, messages, CONTEXT - len(ids))
    assert r.choices[0].message.content == local[1].decode(longest)


def test_streamed_equals_whole_with_n_and_usage(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "the king"},
                {"role": "assistant", "content": "the lord"},
                {"role": "user", "content": "and the lady"}]
    kw = dict(model=NAME, messages=messages, temperature=0, max_tokens=10, n=2,
              logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert {c.id for c in chunks} == {chunks[0].id}
    firsts = [c.choices[0] for c in chunks[:2]]
    assert [f.delta.role for f in firsts] == ["assistant"] * 2
    assert {f.index for f in firsts} == {0, 1}
    texts, tokens, reasons = {0: "", 1: ""}, {0: [], 1: []}, {}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            tokens[ch.index] += [t.token for t in ch.logprobs.content] if ch.logprobs else []
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for ch in whole.choices:
        assert texts[ch.index] == ch.message.content == whole.choices[0].message.content
        assert tokens[ch.index] == [t.token for t in ch.logprobs.content]
        assert reasons[ch.index] == ch.finish_reason


def test_sampled_choices_follow_their_seed(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "fair lady"}], n=3,
              temperature=1.0, top_p=0.95, max_tokens=8, seed=11)
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3 and a.usage.completion_tokens <= 24


def test_bad_chat_requests_are_400s_and_the_server_serves_on(server, client):
    user = [{"role": "user", "content": "Hi"}]
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
         "messages[0].role"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         "messages[0].content"),
        (dict(messages=user, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(messages=user, response_format={"type": "json_object"}), "response_format"),
        (dict(messages=user, top_logprobs=2), "top_logprobs"),
        (dict(messages=user, max_completion_tokens=201), "max_completion_tokens"),
        (dict(messages=user, max_tokens=5, max_completion_tokens=6), "max_tokens"),
        (dict(messages=[{"role": "user", "content": "king " * 200}]), "messages"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=NAME, **kw)
        body = err.value.body
        assert body["param"] == param, (kw, body)
        assert "\n" not in body["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "chat", "messa',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=user)
    # text parts, "developer" and a name are accepted; the completions route still serves
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hi"}]}]
    assert client.chat.completions.create(model=NAME, messages=parts, max_tokens=2).choices
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices


async def _in_process(checkpoint, messages=({"role": "user", "content": "Hi"},)) -> dict:
    """A chat request (its error) and a completion on the app of `checkpoint`, in this
    process."""
    loaded = load_for_inference(checkpoint, device="cpu")
    server = Server(name="m")
    scheduler = Scheduler(loaded.model, max_batch=2, max_queue=2)
    scheduler.start()
    server.attach(loaded.model, loaded.tokenizer, scheduler)
    out = {}
    try:
        transport = httpx.ASGITransport(app=create_app(server))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0,
                                      http_client=httpx.AsyncClient(transport=transport)) as c:
            try:
                await c.chat.completions.create(model="m", messages=list(messages))
            except openai.APIStatusError as exc:
                out["chat"] = exc
            out["completion"] = await c.completions.create(model="m", prompt="Hi", max_tokens=2)
    finally:
        scheduler.stop()
    return out


def test_a_base_model_is_refused_and_a_broken_template_is_a_one_line_400(checkpoints,
                                                                         one_thread):
    base = asyncio.run(_in_process(checkpoints["base"]))
    assert isinstance(base["chat"], openai.NotFoundError)
    assert "not a chat model" in base["chat"].message and "v1/completions" in base["chat"].message
    broken = asyncio.run(_in_process(checkpoints["broken"]))
    assert isinstance(broken["chat"], openai.BadRequestError)
    message = broken["chat"].body["message"]
    assert "chat template is broken" in message and "TemplateSyntaxError" in message
    assert "\n" not in message and broken["chat"].body["code"] == "invalid_chat_template"
    refused = asyncio.run(_in_process(checkpoints["no-system"], STOPPING))
    assert isinstance(refused["chat"], openai.BadRequestError)
    assert refused["chat"].body["message"] == ("the model's chat template refused these "
                                               "messages: TemplateError: System role not "
                                               "supported")
    for out in (base, broken, refused):  # completions still serve them all
        assert len(out["completion"].choices) == 1
