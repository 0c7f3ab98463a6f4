"""The completions request, validated at the edge, and the OpenAI error body.

`parse_completion_request` turns a JSON body into a typed `CompletionRequest` or raises
`ApiError` (HTTP 400 with the OpenAI error body, naming the field in `param`), so nothing a
client sends reaches the model unchecked. The fields are those of the official `openai` client's
`CompletionCreateParams`, plus `top_k` and `repetition_penalty` (sent through `extra_body`, as
vLLM and llama.cpp accept them). Fields the server cannot honour (`suffix`, `logit_bias`,
non-zero `frequency_penalty`/`presence_penalty`, `best_of` > `n`) are refused with a message
that says so, never silently ignored; unknown fields are refused as OpenAI does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from model.sampling import Sampling, SamplingError

MAX_BODY_BYTES = 4 * 1024 * 1024  # a prompt is at most the context; a few MiB is plenty
# A body over MAX_BODY_BYTES is read and thrown away (a chunk at a time, never held) up to this
# many bytes in all, then answered 413: a client that sends its whole body before reading the
# answer (urllib, most simple clients) then reads the 413 instead of a broken pipe. It covers a
# file pasted as a prompt by mistake (50 MB is read and dropped in well under a second here);
# past it, or when the Content-Length says more, the 413 goes out at once and the connection
# is closed, so a client cannot make the server read without end.
MAX_DISCARD_BYTES = 64 * 1024 * 1024
MAX_CHOICES = 256  # prompts x n per request
MAX_LOGPROBS = 20
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
NEG_INF_LOGPROB = -9999.0  # JSON has no -inf; vLLM writes this value too


class ApiError(Exception):
    """An error answered with the OpenAI error body: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body of this error."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    """A 400 for one field."""
    return ApiError(400, message, param=param, code=code)



@dataclass
class CompletionRequest:
    """A validated `POST /v1/completions` body.

    `prompts` holds one entry per prompt: a str (to be encoded), a list of token ids, or None
    (no prompt: start from the end-of-text token, as OpenAI documents).
    """

    model: str
    prompts: list[str | list[int] | None]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False


# The fields of the openai client's CompletionCreateParams, then our extensions.
OPENAI_FIELDS = ("model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias",
                 "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop", "stream",
                 "stream_options", "suffix", "temperature", "top_p", "user")
EXTENSION_FIELDS = ("top_k", "repetition_penalty")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity are refused: they are not JSON)."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ApiError(400, f"the request body is not valid JSON ({reason})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "an array"
    return "an object"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(float(x)))


def _int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x) or not low <= x <= high:
        raise bad(name, f"{name} must be an integer from {low} to {high}, got {_shown(x)}")
    return x


def _number(body: dict, name: str, default: float | None, low: float, high: float,
            low_open: bool = False, what: str = "") -> float | None:
    x = body.get(name)
    if x is None:
        return default
    ok = _is_number(x) and (low < x if low_open else low <= x) and x <= high
    if not ok:
        rng = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} "
        rng += "any finite value" if math.isinf(high) else f"{high:g}"
        raise bad(name, f"{name} must be a number {rng}{what}, got {_shown(x)}")
    return float(x)


def _bool(body: dict, name: str) -> bool:
    x = body.get(name)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise bad(name, f"{name} must be true or false, got {_shown(x)}")
    return x


def _shown(x: Any) -> str:
    text = json.dumps(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _prompts(body: dict) -> list[str | list[int] | None]:
    if "prompt" not in body:
        raise bad("prompt", "prompt is required: a string, an array of strings, an array of "
                            "token ids or an array of arrays of token ids")
    p = body["prompt"]
    if p is None:
        return [None]
    shape = ("prompt must be a string, an array of strings, an array of token ids or an array "
             "of arrays of token ids")
    if isinstance(p, str):
        prompts: list = [p]
    elif isinstance(p, list):
        if not p:
            raise bad("prompt", "prompt is empty: give at least one token")
        if all(isinstance(x, str) for x in p):
            prompts = list(p)
        elif all(_is_int(x) for x in p):
            prompts = [list(p)]
        elif all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise bad("prompt", f"{shape}; got an array mixing other values")
    else:
        raise bad("prompt", f"{shape}, got {_kind(p)}")
    for i, x in enumerate(prompts):
        if len(x) == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            raise bad("prompt", f"{where} is empty: give at least one token (or send "
                                "\"prompt\": null to start from the end-of-text token)")
    return prompts


def _sampling(body: dict, temperature: float, top_k: int | None,
              logprobs: int | None) -> Sampling:
    """The request's sampling settings, checked by `Sampling` (a 400 naming the bad field)."""
    penalty = body.get("repetition_penalty")
    try:
        return Sampling(temperature, top_k, body.get("top_p"),
                        1.0 if penalty is None else penalty, top_logprobs=logprobs,
                        seed=body.get("seed"))
    except SamplingError as exc:
        raise bad(exc.field, str(exc)) from None


def _check_fields(body: dict, known: tuple[str, ...]) -> None:
    for name in body:
        if name not in known:
            raise bad(name, f"Unrecognized request argument supplied: {name}")


def _model_field(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"model is required: the id /v1/models lists, got {_shown(model)}")
    return model


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stop)}")
        return tuple(stop)
    raise bad("stop", f"stop must be a string or an array of up to {MAX_STOPS} strings, got "
                      f"{_shown(stop)}")


def _stream_fields(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict):
            raise bad("stream_options", f"stream_options must be an object, got "
                                        f"{_kind(options)}")
        for key in options:
            if key not in ("include_usage", "include_obfuscation"):
                raise bad(f"stream_options.{key}", f"Unrecognized stream option: {key}")
        include_usage = _bool(options, "include_usage")
        _bool(options, "include_obfuscation")  # accepted; chunks carry no obfuscation field
    return stream, include_usage


def _generation_fields(body: dict, prompts: int, logprobs: int | None) -> dict[str, Any]:
    """The fields completions and chat completions share, checked: `CompletionRequest`'s
    n, temperature, top_p, top_k, repetition_penalty, stop, seed, stream and include_usage."""
    n = _int(body, "n", 1, 1, 128)
    if prompts * n > MAX_CHOICES:
        raise bad("n", f"{prompts} prompts x n={n} is {prompts * n} completions; at most "
                       f"{MAX_CHOICES} per request")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0, what=" (0 is greedy)")
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < -1:
            raise bad("top_k", f"top_k must be an integer >= 1 (0 or -1: off), got "
                               f"{_shown(top_k)}")
        top_k = top_k if top_k >= 1 else None
    for name in ("frequency_penalty", "presence_penalty"):
        value = _number(body, name, 0.0, -2.0, 2.0)
        if value != 0.0:
            raise bad(name, f"{name} is not supported; use repetition_penalty (CTRL's "
                            "penalty on tokens already present, 1 is off), e.g. through the "
                            "openai client's extra_body")
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or bias):
        raise bad("logit_bias", "logit_bias is not supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user must be a string, got {_shown(user)}")
    stops = _stops(body)
    sampling = _sampling(body, temperature, top_k, logprobs)
    stream, include_usage = _stream_fields(body)
    return dict(n=n, temperature=temperature,
                top_p=None if sampling.top_p == 1.0 else sampling.top_p, top_k=top_k,
                repetition_penalty=sampling.repetition_penalty, stop=stops, seed=sampling.seed,
                stream=stream, include_usage=include_usage)


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a `/v1/completions` body (already JSON-decoded).

    Raises:
        ApiError: 400 naming the first bad field.
    """
    _check_fields(body, OPENAI_FIELDS + EXTENSION_FIELDS)
    model = _model_field(body)
    prompts = _prompts(body)
    n = _int(body, "n", 1, 1, 128)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        if not _is_int(best_of) or best_of < n:
            raise bad("best_of", f"best_of must be an integer >= n ({n}), got {_shown(best_of)}")
        raise bad("best_of", "best_of greater than n is not supported: ask for n completions "
                             "and rank them by their logprobs")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise bad("suffix", "suffix is not supported: the model continues text, it does not "
                            "fill in between")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise bad("logprobs", f"logprobs must be an integer from 0 to {MAX_LOGPROBS} (how many "
                              f"alternatives per token), got {_shown(logprobs)}")
    shared = _generation_fields(body, len(prompts), logprobs)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, 2**31 - 1)
    return CompletionRequest(model=model, prompts=prompts, max_tokens=max_tokens,
                             logprobs=logprobs, echo=_bool(body, "echo"), **shared)


# -- chat completions ----------------------------------------------------------------------------

# The fields of the openai client's chat CompletionCreateParams that the server honours, then
# the known ones it cannot honour (accepted only when unset or off: null, false, an empty array
# or object, or the value named in `_OFF`), then our extensions.
CHAT_FIELDS = ("model", "messages", "frequency_penalty", "logit_bias", "logprobs",
               "max_completion_tokens", "max_tokens", "n", "presence_penalty", "seed", "stop",
               "stream", "stream_options", "temperature", "top_logprobs", "top_p", "user",
               "prompt_cache_key", "safety_identifier")
CHAT_UNSUPPORTED = ("audio", "function_call", "functions", "metadata", "modalities",
                    "parallel_tool_calls", "prediction", "reasoning_effort", "response_format",
                    "service_tier", "store", "tool_choice", "tools", "verbosity",
                    "web_search_options")
_OFF = {"tool_choice": "none", "function_call": "none", "response_format": {"type": "text"},
        "modalities": ["text"], "service_tier": "auto", "parallel_tool_calls": True}
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ChatRequest:
    """A validated `POST /v1/chat/completions` body.

    Attributes:
        model: the model id.
        messages: `{"role", "content"}` (and `name` when sent) per message, content as text;
            the role "developer" is given to the template as "system".
        max_tokens: `max_completion_tokens` (or the older `max_tokens`); None: up to the
            context.
        logprobs: `top_logprobs` when `logprobs` is true (0 when not given), else None.
        fields: the fields shared with completions (`CompletionRequest`'s n, temperature, ...).
    """

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None
    logprobs: int | None
    fields: dict[str, Any]

    def completion(self, prompt_ids: list[int], max_tokens: int) -> CompletionRequest:
        """The request as the completions machinery runs it: the templated prompt's ids."""
        return CompletionRequest(model=self.model, prompts=[prompt_ids], max_tokens=max_tokens,
                                 logprobs=self.logprobs, **self.fields)


def _content(x: Any, where: str) -> str:
    """A message's content as text: a string, or an array of text parts (joined by newlines)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x:
        texts = []
        for j, part in enumerate(x):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad(f"{where}.content", f"{where}.content[{j}] must be a text part "
                                              f"{{\"type\": \"text\", \"text\": ...}}, got "
                                              f"{_shown(kind)}: this model reads text only")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"{where}.content", f"{where}.content must be a string or an array of text "
                                  f"parts, got {_kind(x) if x != [] else 'an empty array'}")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages is required: a non-empty array of {\"role\", "
                              "\"content\"} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content, got {_kind(m)}")
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad(f"{where}.role", f"{where}.role {role!r} is not supported: this server "
                                       "has no tools")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of "
                                       f"{', '.join(CHAT_ROLES)}, got {_shown(role)}")
        for key, value in m.items():
            if key not in ("role", "content", "name") and value not in (None, []):
                raise bad(f"{where}.{key}", f"{where}.{key} is not supported: messages are "
                                            "text with a role (and a name)")
        message = {"role": "system" if role == "developer" else role,
                   "content": _content(m.get("content"), where)}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise bad(f"{where}.name", f"{where}.name must be a string, got {_shown(name)}")
            message["name"] = name
        out.append(message)
    return out


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a `/v1/chat/completions` body (already JSON-decoded).

    Raises:
        ApiError: 400 naming the first bad field.
    """
    _check_fields(body, CHAT_FIELDS + CHAT_UNSUPPORTED + EXTENSION_FIELDS)
    for name in CHAT_UNSUPPORTED:
        value = body.get(name)
        if value not in (None, False, [], {}) and value != _OFF.get(name):
            raise bad(name, f"{name} is not supported: the model answers in plain text")
    model = _model_field(body)
    messages = _messages(body)
    for name in ("prompt_cache_key", "safety_identifier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad(name, f"{name} must be a string, got {_shown(body[name])}")
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    logprobs = (top or 0) if want else None
    shared = _generation_fields(body, 1, logprobs)
    max_tokens = _int(body, "max_completion_tokens", None, 1, 2**31 - 1)
    older = _int(body, "max_tokens", None, 1, 2**31 - 1)
    if max_tokens is not None and older is not None and max_tokens != older:
        raise bad("max_tokens", "max_tokens and max_completion_tokens differ; send one")
    return ChatRequest(model=model, messages=messages,
                       max_tokens=max_tokens if max_tokens is not None else older,
                       logprobs=logprobs, fields=shared)
