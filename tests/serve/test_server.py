"""serve_lm.py as a real process on the tiny checkpoint, driven by the official `openai` client.

One server serves every test here (the module is one xdist group, so it starts once);
`test_queue_full` starts a second one with one row and a one-request queue.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.completion_choice import Logprobs
from serving import REPO, ServerProcess

from model.checkpoint import load_model
from model.scoring import score
from model.tokenizer import load_tokenizer
from serve.protocol import EXTENSION_FIELDS, OPENAI_FIELDS

pytestmark = pytest.mark.xdist_group("serve")  # one worker: one server for the module
KEY = "test-key-123"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # a chunk per token (the tests of streamed pieces want them apart); the default interval,
    # which joins tokens, is tested in tests/serve/test_app.py
    srv = ServerProcess("--checkpoint", str(tiny_checkpoint), "--api_key", KEY,
                        "--max_batch", "8", "--max_queue", "8", "--stream_interval_ms", "0")
    yield srv
    status = srv.stop()
    log = srv.log_text()
    assert "Traceback" not in log, log  # nothing a client sent reached a traceback
    assert status == 0, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_checkpoint, one_thread):
    """The same model in this process, for solo references and scores."""
    tok = load_tokenizer()
    model, _ = load_model(tiny_checkpoint, device="cpu", tokenizer=tok)
    return model, tok


def _greedy(local, prompt: str | list[int], n: int) -> tuple[list[int], list[int]]:
    model, tok = local
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    out = model.generate(ids, max_new_tokens=n, temperature=0)[0, len(ids):].tolist()
    return ids, out


def _stream(client, **kw) -> list:
    return list(client.completions.create(model=NAME, stream=True, **kw))


# -- the response --------------------------------------------------------------------------------


def test_stream_and_whole_agree_and_equal_generate(client, local):
    prompt = "The quick brown fox"
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    chunks = _stream(client, prompt=prompt, max_tokens=20, temperature=0,
                     stream_options={"include_usage": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["length"] and finishes[-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    ids, new = _greedy(local, prompt, 20)
    assert whole.choices[0].text == local[1].decode(new)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens,
            whole.usage.total_tokens) == (len(ids), 20, len(ids) + 20)
    assert whole.choices[0].finish_reason == "length" and whole.object == "text_completion"


def test_fields_are_the_openai_clients(http):
    """Every field of the openai client's types, and no other, field by field."""
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3, "logprobs": 2}
    obj = http.post("/v1/completions", json=body).json()
    assert set(obj) == set(Completion.model_fields)
    assert set(obj["choices"][0]) == set(CompletionChoice.model_fields)
    assert set(obj["choices"][0]["logprobs"]) == set(Logprobs.model_fields)
    required = {k for k, f in CompletionUsage.model_fields.items() if f.is_required()}
    assert set(obj["usage"]) == required
    Completion.model_validate(obj)
    from openai.types.completion_create_params import CompletionCreateParamsStreaming as P

    assert set(P.__annotations__) == set(OPENAI_FIELDS)  # every request field is handled
    lines = http.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
    assert lines[-2] == "data: [DONE]" and lines[-1] == ""
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-2]]
    for chunk in chunks:
        assert set(chunk) == set(Completion.model_fields) - {"usage"}
    Completion.model_validate(chunks[-1])  # the last carries the finish_reason
    assert "top_k" in EXTENSION_FIELDS and "repetition_penalty" in EXTENSION_FIELDS


def test_n_prompt_lists_token_ids_and_seeds(client, local):
    kw = dict(model=NAME, max_tokens=10, temperature=1.0, top_p=0.9)
    r = client.completions.create(prompt="Once", n=3, seed=5, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3  # distinct samples
    again = client.completions.create(prompt="Once", n=3, seed=5, **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # a seed reproduces
    other = client.completions.create(prompt="Once", n=3, seed=6, **kw)
    assert [c.text for c in other.choices] != [c.text for c in r.choices]
    # Sample i of a seeded request uses seed + i, as generate_lm.py's --num_samples does.
    model, tok = local
    ids = tok.encode("Once")
    lib = model.generate(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=6)
    assert r.choices[1].text == tok.decode(lib[0, len(ids):].tolist())
    prompts = ["Once upon", "Hello world, this", "A"]
    batch = client.completions.create(prompt=prompts, seed=3, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for p, choice in zip(prompts, batch.choices, strict=True):
        alone = client.completions.create(prompt=p, seed=3, **kw)
        assert choice.text == alone.choices[0].text
    as_ids = client.completions.create(prompt=[tok.encode(p) for p in prompts], seed=3, **kw)
    assert [c.text for c in as_ids.choices] == [c.text for c in batch.choices]
    one = client.completions.create(prompt=tok.encode(prompts[0]), seed=3, **kw)
    assert one.choices[0].text == batch.choices[0].text
    assert batch.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)


# -- logprobs, echo, stop strings ----------------------------------------------------------------


def test_logprobs_equal_score_and_include_the_sampled_token(client, local):
    model, tok = local
    prompt = "It was a dark and stormy"
    ids = tok.encode(prompt)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0.9,
                                  top_p=0.95, seed=1, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n == 12 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n and lp.text_offset[0] == 0
    new = model.generate(ids, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1)
    new = new[0, len(ids):].tolist()  # the seeded row is the library's sample
    assert lp.tokens == [tok.decode([t]) for t in new]
    ref = score(model, ids + new, top_k=3)
    for i in range(len(new)):
        assert math.isclose(lp.token_logprobs[i], float(ref.logprobs[len(ids) + i]),
                            abs_tol=1e-4)
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and 3 <= len(top) <= 4
        for tid, value in zip(ref.top_ids[len(ids) + i].tolist(),
                              ref.top_logprobs[len(ids) + i].tolist(), strict=True):
            assert math.isclose(top[tok.decode([tid])], value, abs_tol=1e-4)
    text = r.choices[0].text
    assert "".join(lp.tokens) == text  # byte-level tokens of ASCII-ish text
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == \
        lp.tokens

    # echo + logprobs, no new tokens: the prompt scored, its first token null
    e = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    elp = e.choices[0].logprobs
    assert e.choices[0].text == prompt and elp.tokens == [tok.decode([t]) for t in ids]
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    ref = score(model, ids, top_k=2)
    assert all(math.isclose(a, float(b), abs_tol=1e-4)
               for a, b in zip(elp.token_logprobs[1:], ref.logprobs[1:], strict=True))
    assert e.usage.completion_tokens == 0 and e.usage.prompt_tokens == len(ids)
    # echo with new tokens: the prompt in front, offsets across both
    both = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, echo=True,
                                     logprobs=1, temperature=0)
    blp = both.choices[0].logprobs
    assert both.choices[0].text.startswith(prompt) and len(blp.tokens) == len(ids) + 5
    assert blp.text_offset[len(ids)] == len(prompt)
    streamed = _stream(client, prompt=prompt, max_tokens=5, echo=True, logprobs=1,
                       temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text
    assert sum((c.choices[0].logprobs.text_offset for c in streamed), []) == blp.text_offset


def test_stop_strings_also_across_chunks(client):
    prompt = "In the beginning"
    base = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                     logprobs=0)
    toks = base.choices[0].logprobs.tokens
    text = base.choices[0].text
    # a stop string that spans two tokens (so two streamed chunks), found in the text
    i = next(i for i in range(3, len(toks) - 1) if len(toks[i]) >= 2 and toks[i + 1])
    stop = toks[i][-2:] + toks[i + 1][:2]
    cut = text.find(stop)
    kw = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=0, logprobs=1,
              stop=["\u2603never", stop])
    whole = client.completions.create(**kw)
    assert whole.choices[0].text == text[:cut] and stop not in whole.choices[0].text
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    offsets = sum((c.choices[0].logprobs.text_offset for c in chunks), [])
    assert offsets == whole.choices[0].logprobs.text_offset
    assert max(offsets) <= len(whole.choices[0].text)
    # the usage counts the tokens up to the one that completed the stop string
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.tokens) < 24


# -- limits and errors ---------------------------------------------------------------------------


BAD_FIELDS = [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[5, 6], []]}, "prompt", "prompt 1 is empty"),
    ({"prompt": [1, 50257]}, "prompt", "outside the vocabulary"),
    ({"prompt": [-3]}, "prompt", "outside the vocabulary"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ({"prompt": {"text": "a"}}, "prompt", "prompt must be"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens", "integer"),
    ({"max_tokens": 2.5}, "max_tokens", "integer"),
    ({"logprobs": 21}, "logprobs", "0 to 20"),
    ({"logprobs": True}, "logprobs", "integer"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"top_p": 1.5}, "top_p", "top_p"),
    ({"n": 0}, "n", "n must be"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": 5}, "stop", "stop must be"),
    ({"seed": "x"}, "seed", "seed"),
    ({"seed": -1}, "seed", "seed"),
    ({"top_k": -2}, "top_k", "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"echo": "yes"}, "echo", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "repetition_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"max_token": 5}, "max_token", "Unrecognized request argument"),
    ({"model": 5}, "model", "model"),
    ({"prompt": [7] * 33}, "prompt", "33 tokens, but the model's context is 32"),
    # the default limits: 4096 new tokens per choice, 65536 tokens per request
    ({"max_tokens": 10**9}, "max_tokens", "limit of 4096 new tokens per choice "
                                          "(serve_lm.py --max_tokens_limit)"),
    ({"n": 17, "max_tokens": 4096}, "max_tokens", "could use 69633 tokens (1 prompt tokens + 17 "
                                                  "choices x max_tokens 4096), over this "
                                                  "server's limit of 65536 tokens per request "
                                                  "(serve_lm.py --max_request_tokens)"),
]


def test_every_bad_field_is_a_400_and_the_server_serves_on(http, client):
    for extra, param, needle in BAD_FIELDS:
        for stream in (False, True):
            body = {"model": NAME, "prompt": "Hi", "max_tokens": 2, **extra}
            if stream and "stream_options" not in extra:
                body["stream"] = True
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, (extra, r.text)  # before any stream starts
            err = r.json()["error"]
            assert err["param"] == param and needle in err["message"], (extra, err)
            assert err["type"] == "invalid_request_error" and set(err) == {
                "message", "type", "param", "code"}
    for raw in (b"{not json", b"[1, 2]", b'{"model": "tiny", "prompt": "a", "top_p": NaN}', b""):
        r = http.post("/v1/completions", content=raw,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), raw
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="Hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hi")
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices[0].text


def test_generation_past_the_context_slides_the_window(client, local):
    _, tok = local
    ids = [int(t) for t in torch.randint(0, 50000, (30,), generator=torch.Generator()
                                          .manual_seed(0))]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=50, temperature=0,
                                  logprobs=0)
    _, new = _greedy(local, ids, 50)
    assert r.choices[0].logprobs.tokens == [tok.decode([t]) for t in new]
    assert r.usage.completion_tokens == 50


def test_api_key_models_chat_health_and_page(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", headers=headers,
                       json={"model": NAME, "prompt": "Hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope",
                      max_retries=0).completions.create(model=NAME, prompt="Hi")
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.NotFoundError, match="v1/completions"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
    health = httpx.get(server.url + "/health").json()  # public
    assert health["status"] == "ok" and health["model"] == NAME and health["context"] == 32
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "playground" in page.text
    assert httpx.get(server.url + "/static/playground.js").status_code == 200
    missing = httpx.get(server.url + "/nowhere")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_huge_body_and_a_closed_socket_leave_the_server_serving(server, http):
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 50}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as s:  # half a request, then gone
        s.sendall(head + body[:10])
    with socket.create_connection((host, int(port))) as s:  # a whole one, gone before the answer
        s.sendall(head + body)
    assert http.post("/v1/completions", json={"model": NAME, "prompt": "Hi",
                                              "max_tokens": 2}).status_code == 200


# -- continuous batching -------------------------------------------------------------------------


def test_concurrent_requests_equal_their_solo_results(client, http):
    reqs = [dict(prompt=f"Request number {i} says", max_tokens=24,
                 temperature=0 if i % 2 else 0.9, seed=i) for i in range(8)]

    def run(kw):
        return client.completions.create(model=NAME, **kw).choices[0].text

    solo = [run(kw) for kw in reqs]
    before = http.get("/health").json()["steps"]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(run, reqs))
    steps = http.get("/health").json()["steps"] - before
    assert together == solo
    assert steps < 8 * 24  # the rows shared steps: one after another they would take 192


def test_a_late_short_request_finishes_first_and_a_closed_stream_frees_its_row(server, client,
                                                                               http):
    long = client.completions.create(model=NAME, prompt="A long story", max_tokens=4096,
                                     temperature=0, stream=True)  # the default limit
    it = iter(long)
    next(it)  # decoding
    short = client.completions.create(model=NAME, prompt="Short", max_tokens=4, temperature=0)
    assert short.choices[0].finish_reason == "length"
    assert next(it).choices[0].finish_reason is None  # the long one still runs
    assert http.get("/health").json()["running"] == 1
    mark = server.mark()
    long.close()  # the client goes away
    server.wait_for(r"went away after \d+ tokens; 1 rows freed", since=mark)
    assert http.get("/health").json()["running"] == 0


def test_queue_full_answers_429_and_shutdown_ends_open_streams(endless_checkpoint):
    srv = ServerProcess("--checkpoint", str(endless_checkpoint), "--max_batch", "1",
                        "--max_queue", "1", "--no_access_log", "--max_tokens_limit", "1000000",
                        "--max_request_tokens", "2000000", "--shutdown_grace_s", "1")
    events: list[str] = []
    ended: list[float] = []  # when the second stream's last line came
    second_status: list[int] = []
    second_started = threading.Event()
    body = {"model": "endless", "prompt": "Hi", "max_tokens": 10**6, "stream": True}

    def second() -> None:  # its response starts when it leaves the queue
        with httpx.Client(base_url=srv.url, timeout=60) as c2, \
                c2.stream("POST", "/v1/completions", json=body) as resp:
            second_status.append(resp.status_code)
            lines = resp.iter_lines()
            events.append(next(lines))
            second_started.set()
            events.extend(lines)
        ended.append(time.monotonic())

    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as first:
                assert first.status_code == 200
                first_chunks = first.iter_raw()  # (kept: a dropped iterator closes the stream)
                next(first_chunks)  # it holds the only row
                reader = threading.Thread(target=second)
                reader.start()
                srv.wait_health(lambda h: h["waiting"] == 1)  # the second one is queued
                third = c.post("/v1/completions", json={**body, "stream": False})
                assert third.status_code == 429 and third.headers["Retry-After"] == "1"
                assert third.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=srv.url + "/v1", api_key="x",
                                  max_retries=0).completions.create(model="endless",
                                                                    prompt="Hi")
                first.close()
            assert second_started.wait(60)  # the queued one got the row
            health = c.get("/health").json()
            assert health["max_batch"] == 1 and health["peak_running"] == 1
        # SIGTERM with the stream open: after the 1 s grace period it ends with an error chunk
        # and [DONE]
        term = time.monotonic()
        status = srv.stop()
        reader.join(60)
    finally:
        status = srv.stop()
    data = [e for e in events if e]
    assert second_status == [200]
    assert data[0].startswith("data: {") and data[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(data[-2].removeprefix("data: "))["error"]["message"]
    assert ended[0] - term >= 1.0  # not before the grace period was over
    assert status == 0 and "Traceback" not in srv.log_text(), srv.log_text()


def test_bad_flags_and_a_bad_checkpoint_exit_2_with_one_line(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "serve_lm.py"), *args],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        parser = "serve_lm.py: error: "  # the parser's (common.cli.OneLineParser) prefix
        cases = [(["--max_batch", "0"], "--max_batch", parser),
                 (["--port", "70000"], "--port", parser),
                 (["--checkpoint", str(tmp_path / "missing.pt")], "not found", "error: "),
                 (["--device", "tpu"], "unknown device", "error: "),
                 (["--api_key", " "], "--api_key", "error: "),
                 (["--port", port], "cannot listen", "error: "),
                 (["--stream_interval_ms", "-1"], "--stream_interval_ms", parser)]
        for args, needle, prefix in cases:
            proc = run(*args)
            assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
            assert proc.stderr.startswith(prefix) and proc.stderr.count("\n") == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    proc = run("--checkpoint", str(garbage), "--port", "0")
    assert proc.returncode == 2 and "error: " in proc.stderr and "Traceback" not in proc.stderr
