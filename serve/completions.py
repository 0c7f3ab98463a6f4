"""From the scheduler's tokens to OpenAI completion objects: text, stop strings, logprobs, usage.

`ChoiceText` is one choice: token ids in, text out through the same UTF-8-safe detokenizer and
stop-string filter as the CLI (`model/textstream.py`), with one logprobs entry per generated
token. Streamed and whole responses are built from the same `ChoiceText` pieces, so they carry
the same text, tokens and `text_offset`s.

Logprobs are the model's own (the softmax of its logits, what `model.scoring.score` gives), as
OpenAI and vLLM report them: `tokens` (each token decoded alone), `token_logprobs`,
`top_logprobs` (the `logprobs` likeliest tokens, plus the chosen one where it is not among
them) and `text_offset` (where each token's text starts in the choice's text, the echoed prompt
included; a token cut off by a stop string, or the end-of-text token, sits at the end).
`-inf` is written as -9999.0 (JSON has no infinity).

Chat completions (`/v1/chat/completions`) run on the same `ChoiceText`s and are shaped as
OpenAI's chat objects: `message` (or a streamed `delta`), and logprobs as `content`, one entry
per token of the reply with its `bytes` and its `top_logprobs` (the k likeliest tokens, a
list); the token that ended the turn is counted in `usage` but not listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from model.textstream import Detokenizer, StopFilter, is_byte_level, token_bytes
from serve.protocol import NEG_INF_LOGPROB


class TokenTexts:
    """Each token id's text decoded on its own, cached (the `tokens` of logprobs)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._byte_level = is_byte_level(tokenizer)

    def bytes_of(self, token: int) -> list[int]:
        """The token's bytes (exact for a byte-level BPE, even part of a character)."""
        out = self._bytes.get(token)
        if out is None:
            out = self._bytes[token] = list(token_bytes(self.tokenizer, token,
                                                        self._byte_level))
        return out

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token])
        return text


def json_logprob(x: float | None) -> float | None:
    """A log-probability JSON can carry: -inf becomes -9999.0, NaN becomes null."""
    if x is None or math.isnan(x):
        return None
    return x if math.isfinite(x) else NEG_INF_LOGPROB


@dataclass
class Entry:
    """One token's logprobs entry."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int
    token_id: int | None = None
    pairs: list[tuple[int, float]] | None = None  # the likeliest (id, logprob), in order
    ends: bool = False  # the token that ended the choice (end of text or of the turn)


def _top_dict(texts: TokenTexts, top: list[tuple[int, float]], chosen: int,
              chosen_lp: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for tid, lp in top:
        out.setdefault(texts(tid), json_logprob(lp))
    if chosen_lp is not None:
        out.setdefault(texts(chosen), json_logprob(chosen_lp))
    return out


def prompt_entries(texts: TokenTexts, ids: list[int], scores: Any) -> tuple[str, list[Entry]]:
    """The echoed prompt's text and, with `scores` (`model.scoring.score` of `ids`, or None for
    a one-token prompt), one entry per prompt token, the first unscored (null)."""
    detok = Detokenizer(texts.tokenizer)
    text, entries = "", []
    for i, tid in enumerate(ids):
        offset = len(text)
        text += detok.feed(tid)
        if scores is None or i == 0:
            entries.append(Entry(texts(tid), None, None, offset))
            continue
        lp = float(scores.logprobs[i])
        top = list(zip(scores.top_ids[i].tolist(), scores.top_logprobs[i].tolist(),
                       strict=True))
        entries.append(Entry(texts(tid), json_logprob(lp), _top_dict(texts, top, tid, lp),
                             offset))
    return text + detok.flush(), entries


@dataclass
class ChoiceText:
    """One choice being generated: feed it tokens, `take` what is ready to send.

    Args:
        texts: the token texts.
        prompt_ids: the prompt (it conditions decoding a character split across its end).
        stops: stop strings (the text ends before the first one completed).
        end_token: the end-of-text id (it ends the choice, and has no text).
        logprobs: whether entries are kept.
        start: the text already in front of the choice (the echoed prompt), for offsets.
        end_tokens: more ids that end the choice like `end_token` (a chat's end of turn).
    """

    texts: TokenTexts
    prompt_ids: list[int]
    stops: tuple[str, ...]
    end_token: int | None
    logprobs: bool
    start: int = 0
    end_tokens: frozenset[int] = frozenset()
    tokens: int = 0  # generated tokens that count (usage): up to the one that ended the choice
    finish_reason: str | None = None
    _detok: Detokenizer = field(init=False)
    _stops: StopFilter = field(init=False)
    _raw: int = 0  # characters of detokenized text so far, before the stop filter
    _sent: int = 0  # characters released (after the stop filter)
    _text: list[str] = field(default_factory=list)  # released text not yet taken
    _held: list[Entry] = field(default_factory=list)  # entries whose text is not released yet
    _ready: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._detok = Detokenizer(self.texts.tokenizer, prefix_ids=self.prompt_ids)
        self._stops = StopFilter(self.stops)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _release(self, text: str) -> None:
        self._text.append(text)
        self._sent += len(text)
        while self._held and self._held[0].offset < self.start + self._sent:
            self._ready.append(self._held.pop(0))

    def feed(self, token: int, logprob: float | None = None,
             top: list[tuple[int, float]] | None = None, finish: str | None = None) -> None:
        """Add one generated token; `finish` is the scheduler's reason when it is the last."""
        if self.finished:
            return  # a token decoded before the scheduler saw the stop string
        self.tokens += 1
        ends = token == self.end_token or token in self.end_tokens
        if self.logprobs:
            self._held.append(Entry(self.texts(token), json_logprob(logprob),
                                    _top_dict(self.texts, top or [], token, logprob),
                                    self.start + self._raw, token, top or [], ends))
        if ends:
            self.finish("stop")
            return
        piece = self._detok.feed(token)
        self._raw += len(piece)
        self._release(self._stops.feed(piece))
        if self._stops.stopped:
            self.finish("stop")
        elif finish is not None:
            self.finish(finish)

    def finish(self, reason: str) -> None:
        """End the choice: release held text (unless a stop string ended it) and entries."""
        if self.finished:
            return
        if not self._stops.stopped:
            tail = self._stops.feed(self._detok.flush())
            tail += self._stops.flush()
            if self._stops.stopped:
                reason = "stop"
            self._release(tail)
        end = self.start + self._sent
        for e in self._held:
            e.offset = min(e.offset, end)
        self._ready += self._held
        self._held = []
        self.finish_reason = reason

    def take(self) -> tuple[str, list[Entry]]:
        """The text and entries released since the last call."""
        text, entries = "".join(self._text), self._ready
        self._text, self._ready = [], []
        return text, entries

    @property
    def stopped_by_string(self) -> bool:
        return self._stops.stopped


def logprobs_object(entries: list[Entry]) -> dict[str, list]:
    """The OpenAI `logprobs` object of a choice (or of a chunk's part of it)."""
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries],
            "text_offset": [e.offset for e in entries]}


def choice_object(index: int, text: str, entries: list[Entry] | None,
                  finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text,
            "logprobs": None if entries is None else logprobs_object(entries),
            "finish_reason": finish_reason}


def completion_object(cid: str, created: int, model: str, choices: list[dict[str, Any]],
                      usage: dict[str, int] | None) -> dict[str, Any]:
    """A `text_completion` object: the whole response, or one streamed chunk of it."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- chat completions ----------------------------------------------------------------------------


def chat_logprobs(texts: TokenTexts, entries: list[Entry]) -> dict[str, Any]:
    """The chat `logprobs` object of a choice (or of a chunk's part of it): `content`, one
    entry per token of the reply (the token that ended the turn left out)."""
    def item(tid: int, token: str, lp: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": texts.bytes_of(tid)}

    content = [{**item(e.token_id, e.token, e.logprob),
                "top_logprobs": [item(t, texts(t), json_logprob(lp)) for t, lp in e.pairs or []]}
               for e in entries if not e.ends]
    return {"content": content, "refusal": None}


def chat_choice(index: int, text: str, logprobs: dict[str, Any] | None,
                finish_reason: str | None) -> dict[str, Any]:
    """A choice of a whole chat completion."""
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> dict[str, Any]:
    """A choice of a streamed chat chunk."""
    return {"index": index, "delta": delta, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_object(cid: str, created: int, model: str, choices: list[dict[str, Any]],
                usage: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    """A `chat.completion` object, or a `chat.completion.chunk` of a stream."""
    return {"id": cid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created, "model": model, "system_fingerprint": None,
            "choices": choices, "usage": usage}
