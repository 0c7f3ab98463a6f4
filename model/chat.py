"""Chat with an instruct model: its tokenizer's chat template, the end of a turn, and a
conversation trimmed to the model's context.

A model whose tokenizer carries a chat template (`tokenizer.chat_template`, as SmolLM2-Instruct,
Qwen2.5-Instruct or a model fine-tuned on conversations have) is prompted with the template
applied to the conversation. The template is only ever rendered by transformers' own
`apply_chat_template`, which runs it in a sandboxed Jinja environment: nothing in a model's files
is executed as code. `chat_format(tokenizer)` checks the template once (a broken one is a
`ChatTemplateError` with one line) and finds the token that ends the assistant's turn (e.g.
`<|im_end|>`); the REPL (`model/repl.py`) and the server's `/v1/chat/completions` both prompt
through it. `Conversation` is the REPL's history: a system message and the turns, the oldest
turns dropped when the conversation outgrows the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Stands for the assistant's reply in the probe conversation that finds the end-of-turn token.
_PROBE_REPLY = "Probe reply 7f3a."


class ChatTemplateError(ValueError):
    """The chat template cannot be applied (broken, or it refuses the messages); one line.

    `detail` is the failure alone, e.g. "TemplateSyntaxError: unexpected '}' (template line 1)".
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    where = getattr(exc, "lineno", None)
    name = type(exc).__name__
    return f"{name}: {line[:200]}" + (f" (template line {where})" if where else "")


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool,
            tokenize: bool) -> Any:
    """`apply_chat_template` (sandboxed Jinja), any failure a one-line `ChatTemplateError`."""
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                            tokenize=tokenize, return_dict=tokenize)
    except Exception as exc:  # noqa: BLE001 - a template's failure (Jinja or not) is one line
        detail = _first_line(exc)
        raise ChatTemplateError(f"the chat template failed: {detail}", detail) from None
    if not tokenize:
        return out
    ids = out["input_ids"]
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def _end_of_turn(tokenizer: Any) -> int | None:
    """The special token the template writes right after an assistant's reply, or None.

    Found by rendering a probe conversation (a user message, then an assistant reply) and
    encoding what follows the reply: `<|im_end|>` for ChatML templates, `<|eot_id|>` for
    Llama 3's, `<end_of_turn>` for Gemma's.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text = _render(tokenizer, probe, generation_prompt=False, tokenize=False)
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return None
    specials = _special_ids(tokenizer)
    for tid in tokenizer.encode(text[at + len(_PROBE_REPLY):], add_special_tokens=False):
        if tid in specials:
            return int(tid)
    return None


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer's chat template, checked, and the tokens that end the assistant's turn.

    Attributes:
        tokenizer: the tokenizer (its `chat_template` is applied by transformers).
        end_tokens: ids that end a reply: the template's end-of-turn token (when it has one)
            and the tokenizer's end-of-text token.
    """

    tokenizer: Any
    end_tokens: tuple[int, ...]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The template applied to `messages`, ending with the assistant's turn opened.

        Raises:
            ChatTemplateError: the template fails or refuses these messages (one line).
        """
        ids = _render(self.tokenizer, messages, generation_prompt=True, tokenize=True)
        if not ids:
            raise ChatTemplateError("the chat template renders these messages as no tokens")
        return ids

    def end_names(self) -> str:
        """The end tokens as text, e.g. "<|im_end|>, <|endoftext|>"."""
        return ", ".join(str(self.tokenizer.convert_ids_to_tokens(t)) for t in self.end_tokens)


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """The tokenizer's `ChatFormat`, or None when it has no chat template (a base model).

    Raises:
        ChatTemplateError: the template is broken (a Jinja syntax error, or it fails on a
            one-question conversation), in one line.
    """
    if not has_chat_template(tokenizer):
        return None
    try:
        ChatFormat(tokenizer, ()).prompt_ids([{"role": "user", "content": "Hi"}])
        eot = _end_of_turn(tokenizer)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"the tokenizer's chat template is broken: {exc.detail}",
                                exc.detail) from None
    ends = [t for t in (eot, getattr(tokenizer, "eos_token_id", None)) if t is not None]
    if not ends:
        raise ChatTemplateError("the tokenizer's chat template ends a reply with no special "
                                "token and the tokenizer has no end-of-text token, so a reply "
                                "would never end")
    return ChatFormat(tokenizer, tuple(dict.fromkeys(int(t) for t in ends)))


@dataclass
class Conversation:
    """A chat's history: an optional system message, then user and assistant messages.

    Attributes:
        system: the system message (kept when old turns are dropped), or None.
        turns: the messages after it, `{"role": "user" | "assistant", "content": text}`.
    """

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The messages as the template takes them, the system message first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns.clear()

    def prompt_ids(self, chat: ChatFormat, room: int, context: int) -> tuple[list[int], int]:
        """The prompt for the next reply, dropping the oldest turns while it is over `room`.

        Turns are dropped from the front, a user message with the reply after it, and never
        the last message; the system message is always kept. What is dropped is gone from the
        history.

        Args:
            chat: the template.
            room: the tokens the prompt should fit in (the context less room for the reply).
            context: the model's context; a prompt over it even with every older turn dropped
                is refused (the last message is removed from the history).

        Returns:
            (the prompt's token ids, how many messages were dropped).

        Raises:
            ChatTemplateError: the template refuses the messages.
            ValueError: the system message and the last message alone are over `context`.
        """
        dropped = 0
        while True:
            ids = chat.prompt_ids(self.messages())
            if len(ids) <= room or len(self.turns) <= 1:
                break
            cut = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:cut]
            dropped += cut
        if len(ids) > context:
            self.turns.pop()
            what = "the system message and your message are" if self.system else \
                "your message is"
            raise ValueError(f"{what} {len(ids)} tokens with the template, over the model's "
                             f"context of {context}; send a shorter one")
        return ids, dropped
