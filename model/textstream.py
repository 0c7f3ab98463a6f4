"""Turning a model's token stream into printable text: detokenizing, stop strings, settings.

`Detokenizer` is an incremental decoder: feed it token ids one at a time and it returns the text
that is now certain. A GPT-2 (byte-level BPE) token can hold part of a UTF-8 character, so naive
per-token decoding prints U+FFFD mid-stream; here bytes are held back until the character is
whole, and the concatenated output equals `tokenizer.decode(ids)`.

`TextGeneration` is what the CLI and the REPL run: one prompt in, text deltas out, streamed
(`model.stream`) or not (`model.generate`) — both go through the same detokenizer and stop-string
filter, so they print the same text for the same seed.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from model.sampling import check_setting

# -- detokenizing ------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character; return char -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_CHAR_TO_BYTE = _byte_level_alphabet()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer is a byte-level BPE (GPT-2's kind): each token spells bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, token_id: int, byte_level: bool | None = None) -> bytes:
    """The bytes one token stands for: for a byte-level BPE (GPT-2's) its bytes exactly, even a
    part of a UTF-8 character; for other tokenizers the UTF-8 of the token decoded alone.

    Args:
        tokenizer: a Hugging Face tokenizer.
        token_id: the token.
        byte_level: whether the tokenizer is byte-level (None: find out).
    """
    if byte_level is None:
        byte_level = is_byte_level(tokenizer)
    if not byte_level:
        return tokenizer.decode([int(token_id)]).encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:  # an id beyond the tokenizer's vocabulary decodes to nothing
        return b""
    try:  # what the tokenizers library's ByteLevel decoder does, token by token
        return bytes(_CHAR_TO_BYTE[c] for c in piece)
    except KeyError:  # e.g. an added token spelled outside the byte alphabet
        return piece.encode("utf-8")


class Detokenizer:
    """Incremental, UTF-8-safe detokenizer.

    Example:
        >>> detok = Detokenizer(tokenizer, prefix_ids=prompt_ids)
        >>> for tok in new_ids:
        ...     print(detok.feed(tok), end="")
        >>> print(detok.flush())

    Args:
        tokenizer: a Hugging Face tokenizer.
        prefix_ids: ids already shown to the user (the prompt); they condition decoding (a
            character split across the prompt's end) but are not returned.
    """

    def __init__(self, tokenizer: Any, prefix_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._byte_level = is_byte_level(tokenizer)
        if self._byte_level:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._token_bytes: dict[int, bytes] = {}
            for i in prefix_ids:
                self._utf8.decode(self._bytes_of(int(i)))
        else:
            # Any other tokenizer: re-decode everything and print the part that grew (slower).
            self._ids = [int(i) for i in prefix_ids]
            self._shown = tokenizer.decode(self._ids) if self._ids else ""

    def _bytes_of(self, token_id: int) -> bytes:
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = token_bytes(self.tokenizer, token_id, True)
        return cached

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a partial character)."""
        if self._byte_level:
            return self._utf8.decode(self._bytes_of(int(token_id)))
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""  # an unfinished character, or a tokenizer that rewrites earlier text
        delta, self._shown = text[len(self._shown):], text
        return delta

    def flush(self) -> str:
        """End of the stream: return whatever is still held back (incomplete bytes as U+FFFD)."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids)
        n = len(self._shown) if text.startswith(self._shown) else len(_common_prefix(text,
                                                                                      self._shown))
        self._shown = text
        return text[n:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


# -- stop strings ------------------------------------------------------------------------------


class StopFilter:
    """Cut a text stream at the first stop string, holding back text that could begin one.

    The stop string itself is not returned. "First" means the first to be completed as text
    arrives (ties: the one that starts earlier), so a stream fed in the same pieces always stops
    at the same place.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def feed(self, text: str) -> str:
        """Add text; return the part that is safe to print (nothing once stopped)."""
        if self.stopped:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            self.stopped, self.matched, self._held = True, best[2], ""
            return buf[:best[1]]
        keep = 0  # the longest tail of buf that a stop string starts with
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-k:]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """End of the stream: release held text (it never became a stop string)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held


# -- generation settings -----------------------------------------------------------------------


_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")


def _check(name: str, value: Any) -> Any:
    """Validate one setting; return it normalized or raise ValueError naming it and its range.

    The sampling settings are checked by `model.sampling.check_setting` (the checks of
    `Sampling`); the lengths and stop strings here.
    """
    if name in _SAMPLING:
        return check_setting(name, value)
    if name in ("max_length", "max_new_tokens"):
        if value is None and name == "max_new_tokens":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return value
    if name == "stop":
        return tuple(str(s) for s in value)
    raise ValueError(f"unknown setting {name!r}")


@dataclass
class GenerationSettings:
    """Sampling settings shared by the CLI flags and the REPL's `/set`; validated on change
    (the sampling ones by `model.sampling.check_setting`, as `Sampling` checks them).

    `max_new_tokens`, when set, replaces `max_length` (which counts prompt plus new tokens).
    """

    max_length: int = 100
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, _check(name, value))

    def set_from_text(self, name: str, text: str) -> None:
        """Set one setting from user text (`/set top_k 40`, `/set top_p none`).

        Raises:
            ValueError: unknown name or bad value; the old value is kept.
        """
        names = [f.name for f in fields(self) if f.name != "stop"]
        if name not in names:
            raise ValueError(f"unknown setting {name!r}; one of: {', '.join(names)}")
        raw = text.strip()
        if raw.lower() in ("none", "off", "null", ""):
            if name in ("max_length", "temperature", "repetition_penalty"):
                raise ValueError(f"{name} cannot be none")
            setattr(self, name, None)
            return
        if name in ("max_length", "max_new_tokens", "top_k", "seed"):
            try:
                value: Any = int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None
        else:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
        setattr(self, name, value)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` / `model.stream` (seed excluded)."""
        kw: dict[str, Any] = dict(temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, repetition_penalty=self.repetition_penalty)
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        else:
            kw["max_length"] = self.max_length
        return kw

    def describe(self) -> str:
        """One `name = value` line per setting."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stop":
                v = ", ".join(repr(s) for s in v) if v else None
            lines.append(f"{f.name:<19} {'none' if v is None else v}")
        return "\n".join(lines)


# -- one generation ----------------------------------------------------------------------------


class TextGeneration:
    """Generate a continuation of one prompt and iterate over its text, piece by piece.

    Iterating yields text deltas of the continuation only (not the prompt). Afterwards,
    `new_tokens`, `seconds`, `first_token_seconds` and `finish_reason` ("end" for the end token,
    "length", "stop" for a stop string, "interrupted") describe the run. Generation stops at the
    model's `end_token`, which is not printed.

    Args:
        model: a `LanguageModel` (with `end_token` set).
        tokenizer: the tokenizer that encoded `prompt_ids`.
        prompt_ids: the prompt, a list of token ids (at most `model.max_seq_len`).
        settings: sampling settings; `settings.seed` seeds the sampler.
        stream: use `model.stream` (True) or one `model.generate` call (False); same text.
        top_logprobs: record each printed token's probabilities with this many alternatives
            (`probabilities()` returns them; `last_prob` is the latest token's); None: don't.
        end_tokens: the ids that end the generation, not printed (None: the model's
            `end_token`); a chat model's end of turn (`model.chat.ChatFormat.end_tokens`).
    """

    def __init__(self, model: Any, tokenizer: Any, prompt_ids: list[int],
                 settings: GenerationSettings, stream: bool = True,
                 top_logprobs: int | None = None,
                 end_tokens: Iterable[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = list(prompt_ids)
        self.settings, self.stream = settings, stream
        self.top_logprobs = top_logprobs
        model_end = getattr(model, "end_token", None)
        self.end_tokens = (frozenset(int(t) for t in end_tokens) if end_tokens is not None
                           else frozenset() if model_end is None else frozenset([model_end]))
        self.records: list[Any] = []  # one `TokenLogprobs` (row 0) per counted token
        self.new_tokens = 0
        self.seconds = 0.0
        self.first_token_seconds: float | None = None
        self.finish_reason = "length"

    def _token_ids(self) -> Iterator[tuple[int, Any]]:
        """(token, its `TokenLogprobs` or None) pairs."""
        # Called eagerly, so bad settings raise ValueError before anything is printed.
        kwargs = self.settings.sampling_kwargs()
        kwargs["seed"] = self.settings.seed
        probs = self.top_logprobs is not None
        if probs:
            kwargs.update(return_logprobs=True, top_logprobs=self.top_logprobs)
        # The model stops by itself at its own end token only: other end tokens (a chat's end
        # of turn) are watched for here, token by token, even when printing at once.
        others = self.end_tokens - {getattr(self.model, "end_token", None)}
        if not self.stream and not others:
            out = self.model.generate(self.prompt_ids, **kwargs)
            if not probs:
                return ((t, None) for t in out[0, len(self.prompt_ids):].tolist())
            out, lp = out
            new = out[0, len(self.prompt_ids):].tolist()
            return ((t, lp.index(0, i)) for i, t in enumerate(new))
        steps = self.model.stream(self.prompt_ids, **kwargs)

        def ids() -> Iterator[tuple[int, Any]]:
            try:
                for step in steps:
                    if probs:
                        tok, lp = step
                        yield int(tok[0]), lp.index(0)
                    else:
                        yield int(step[0]), None
            finally:
                steps.close()  # frees the model's KV cache when we stop early

        if self.stream:
            return ids()
        whole, pairs = [], ids()  # printing at once: generate up to the first end token now
        try:
            for item in pairs:
                whole.append(item)
                if item[0] in self.end_tokens:
                    break
        finally:
            pairs.close()
        return iter(whole)

    def __iter__(self) -> Iterator[str]:
        """Start generating (raising ValueError for bad settings now); iterate the text."""
        start = time.perf_counter()
        return self._run(self._token_ids(), start)

    def _run(self, tokens: Iterator[tuple[int, Any]], start: float) -> Iterator[str]:
        detok = Detokenizer(self.tokenizer, prefix_ids=self.prompt_ids)
        stops = StopFilter(self.settings.stop)
        try:
            for tok, record in tokens:
                if self.first_token_seconds is None:
                    self.first_token_seconds = time.perf_counter() - start
                if tok in self.end_tokens:
                    self.finish_reason = "end"
                    break
                self.new_tokens += 1
                if record is not None:
                    self.records.append(record)
                text = stops.feed(detok.feed(tok))
                if text:
                    yield text
                if stops.stopped:
                    self.finish_reason = "stop"
                    break
            if not stops.stopped:
                tail = stops.feed(detok.flush()) + stops.flush()
                if stops.stopped:
                    self.finish_reason = "stop"
                if tail:
                    yield tail
        except (KeyboardInterrupt, GeneratorExit):
            self.finish_reason = "interrupted"
            raise
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            self.seconds = time.perf_counter() - start

    def text(self) -> str:
        """Run to the end and return the whole continuation."""
        return "".join(self)

    @property
    def last_prob(self) -> float | None:
        """The model's probability of the latest printed token (with `top_logprobs` set)."""
        return math.exp(float(self.records[-1].raw_logprobs)) if self.records else None

    def probabilities(self, title: str | None = None):
        """A `ProbabilityView` of the printed tokens (needs `top_logprobs`)."""
        from model.logprobs import TokenLogprobs

        if self.top_logprobs is None:
            raise ValueError("this generation did not record probabilities (top_logprobs)")
        if not self.records:
            from model.probview import ProbabilityView

            return ProbabilityView([], title, sampled=True)
        return TokenLogprobs.stack(self.records, dim=0).view(self.tokenizer, title=title)

    def summary(self) -> str:
        """A one-line timing summary (tokens, tokens/s, time to first token, why it stopped)."""
        rate = self.new_tokens / self.seconds if self.seconds > 0 else float("inf")
        first = ("" if self.first_token_seconds is None
                 else f", first token after {self.first_token_seconds * 1000:.0f} ms")
        return (f"{self.new_tokens} new tokens in {self.seconds:.2f} s ({rate:.1f} tokens/s"
                f"{first}); stopped by {self.finish_reason}")
