"""The interactive prompt of `generate_lm.py --interactive`.

Every line is a prompt, answered by streaming the model's continuation; lines starting with "/"
are commands (`/help`). With a model whose tokenizer has a chat template, the REPL chats instead
(`model.chat`): each line is a user message, the reply is generated from the whole conversation
with the template applied and ends at the template's end-of-turn token, `/reset` starts over,
and the oldest turns are dropped, with a notice, when the conversation outgrows the context.
Ctrl-C stops an answer; Ctrl-C or Ctrl-D at an empty prompt leaves. With stdin not a terminal
(`generate_lm.py --interactive < prompts.txt`) it answers one prompt per line, printing prompt
plus continuation (in chat mode, the reply) and no decoration.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from model.chat import ChatFormat, ChatTemplateError, Conversation
from model.probview import ansi_color
from model.textstream import GenerationSettings, TextGeneration

_KEEP = object()  # no SIGINT handler was replaced, so none is restored
HISTORY_ENV = "GENERATE_LM_HISTORY"  # where readline history is kept; "" turns it off
DEFAULT_HISTORY = "~/.generate_lm_history"
SETTABLE = ("temperature", "top_k", "top_p", "max_length", "max_new_tokens", "seed",
            "repetition_penalty")

HELP = """\
Type a prompt and press Enter; the model continues it. Commands:
  /set NAME VALUE   change a setting: temperature, top_k, top_p, max_length, max_new_tokens,
                    seed, repetition_penalty ("/set top_k none" clears an optional one)
  /set color on|off colour the answers by token probability (terminals only; off with NO_COLOR)
  /show             show the current settings
  /regen            generate again for the last prompt
  /probs            the last answer's tokens: probability, rank, likeliest alternatives
  /score TEXT       score TEXT: each token's probability, rank and alternatives; perplexity
  /help             this help
  /quit             leave (also Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C while the model writes stops that answer. Start a prompt with "//" to begin it with "/".
max_length counts prompt plus new tokens; max_new_tokens, when set, replaces it."""
CHAT_HELP = """
Chat mode (the model has a chat template): each line is your message and the model replies to
the whole conversation. A reply is at most max_new_tokens tokens (unset: max_length).
  /reset            forget the conversation (the system message stays)
  /system [TEXT]    set the system message (no TEXT: none) and start over
  /chat on|off      chat, or continue each line as plain text (off)
  /regen            another reply to your last message"""


class Repl:
    """A read-generate-print loop over one loaded model.

    Args:
        model: a `LanguageModel` with `tokenizer` and `end_token` set (see `model.checkpoint`).
        tokenizer: the model's tokenizer.
        settings: initial sampling settings (changed by `/set`).
        stream: stream tokens (True) or print each answer at once.
        verbose: print timing after each answer, on stderr.
        info: a description of the loaded model for the banner and `/show`.
        probs_k: alternatives per token in `/probs` and `/score` tables.
        stdin, stdout, stderr: streams (defaults: the process's).
        interactive: prompt decoration, readline and colours; default: stdin is a terminal.
        chat: the model's chat template (`model.chat.chat_format`): start in chat mode; None:
            plain continuation only.
        system: the chat's system message, or None.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings, *,
                 stream: bool = True, verbose: bool = False, info: str = "",
                 stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, interactive: bool | None = None,
                 probs_k: int = 5, chat: ChatFormat | None = None,
                 system: str | None = None) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.stream, self.verbose, self.info = stream, verbose, info
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.tty = self.stdin.isatty() if interactive is None else interactive
        self.color = (self.tty and self.out.isatty() and "NO_COLOR" not in os.environ
                      and os.environ.get("TERM") != "dumb")
        self.last_prompt: str | None = None
        self.probs_k = probs_k
        self.prob_color = False  # `/set color on`: answers coloured by token probability
        self.last_gen: TextGeneration | None = None
        self._readline: Any = None
        self._history: Path | None = None
        self._typed = ""
        self._reading = False  # inside input(): Ctrl-C drops the typed line, not an answer
        self.chat = chat
        self.chatting = chat is not None  # `/chat off`: plain continuation
        self.conversation = Conversation(system or None)

    # -- output helpers ------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        """Answers to commands (/show, /help): stdout."""
        self.out.write(text + "\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        """Notices and errors: stderr, so piped answers stay clean."""
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    # -- input ---------------------------------------------------------------------------------

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: plain input() still works
            return
        self._readline = readline
        path = os.environ.get(HISTORY_ENV, DEFAULT_HISTORY)
        self._history = Path(path).expanduser() if path else None
        readline.set_history_length(1000)
        if self._history is not None and self._history.is_file():
            try:
                readline.read_history_file(self._history)
            except OSError:
                pass

    def _save_history(self) -> None:
        if self._readline is None or self._history is None:
            return
        try:
            self._readline.write_history_file(self._history)
        except OSError:
            pass  # history is a convenience; never fail the session for it

    def _input(self, prompt: str) -> str:
        """`input()`, remembering in `self._typed` what was on the line when Ctrl-C came."""
        self._typed = ""
        self._reading = True
        try:
            return input(prompt)
        finally:
            self._reading = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._reading and self._readline is not None:
            # Runs inside readline's wait, before it throws the half-typed line away.
            self._typed = self._readline.get_line_buffer()
        raise KeyboardInterrupt

    def _catch_sigint(self) -> Any:
        """Make Ctrl-C raise KeyboardInterrupt for the whole session; return what to restore.

        Not only while a line is read: a process can start with SIGINT ignored (inherited from
        a shell that ran it in the background, a wrapper script, some CI runners), and then
        Ctrl-C would work at the prompt but never stop an answer.
        """
        if threading.current_thread() is not threading.main_thread():
            return _KEEP  # signal handlers can only be set from the main thread
        return signal.signal(signal.SIGINT, self._on_sigint)

    def _read_line(self) -> str | None:
        """One input line, None at end of input. Raises KeyboardInterrupt on Ctrl-C."""
        if self.tty:
            try:
                line = self._input("> ")
            except EOFError:
                return None
        else:
            raw = self.stdin.buffer.readline() if hasattr(self.stdin, "buffer") else None
            if raw is None:
                line = self.stdin.readline()
                if not line:
                    return None
            else:
                if not raw:
                    return None
                line = raw.decode("utf-8", errors="surrogateescape")
        line = line.rstrip("\r\n")
        # Undecodable bytes arrive as lone surrogates (surrogateescape): replace them, say so.
        fixed = line.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        if fixed != line:
            self._note("note: the line was not valid UTF-8; undecodable bytes became U+FFFD")
        return fixed

    # -- commands ------------------------------------------------------------------------------

    def _show(self) -> None:
        text = self.settings.describe() + f"\n{'color':<19} {'on' if self.prob_color else 'off'}"
        if self.chat is not None:
            conv = self.conversation
            text += (f"\n{'chat':<19} {'on' if self.chatting else 'off'} (replies end at "
                     f"{self.chat.end_names()}; {len(conv.turns)} messages)"
                     f"\n{'system':<19} {conv.system if conv.system else 'none'}")
        self._say(self.info + "\n" + text if self.info else text)

    def _set_color(self, value: str) -> None:
        value = value.strip().lower()
        if value not in ("on", "off"):
            self._note(f"error: color must be on or off, got {value!r}")
            return
        if value == "on" and not self.color:
            why = "NO_COLOR is set" if "NO_COLOR" in os.environ else "this is not a terminal"
            self._note(f"color stays off: {why}")
            return
        self.prob_color = value == "on"
        self._say(f"color = {value}" + ("  (green >= 50%, yellow >= 10%, red below)"
                                        if self.prob_color else ""))

    def _probs(self) -> None:
        if self.last_gen is None:
            self._note("no answer yet: type a prompt first")
            return
        self._say(self.last_gen.probabilities().table(self.probs_k))

    def _score(self, text: str) -> None:
        if not text.strip():
            self._note("usage: /score TEXT  (each token's probability and the perplexity)")
            return
        from model.scoring import score

        try:
            scores = score(self.model, text, top_k=self.probs_k, tokenizer=self.tokenizer)
        except ValueError as exc:
            self._note(f"error: {exc}")
            return
        self._say(scores.view(self.tokenizer).table(self.probs_k))

    def _set(self, args: str) -> None:
        parts = args.split(None, 1)
        if len(parts) != 2:
            self._note("usage: /set NAME VALUE  (NAME: " + ", ".join(SETTABLE) + ", color)")
            return
        name, value = parts[0].lower(), parts[1]
        if name == "color":
            self._set_color(value)
            return
        if name not in SETTABLE:
            self._note(f"error: unknown setting {name!r}; one of: {', '.join(SETTABLE)}, color")
            return
        old = getattr(self.settings, name)
        try:
            self.settings.set_from_text(name, value)
        except ValueError as exc:
            self._note(f"error: {exc}; {name} stays {'none' if old is None else old}")
            return
        new = getattr(self.settings, name)
        self._say(f"{name} = {'none' if new is None else new}")

    def _command(self, line: str) -> bool:
        """Run a /command; return False to leave the loop."""
        cmd, _, args = line[1:].partition(" ")
        cmd = cmd.lower()
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd in ("help", "h", "?"):
            self._say(HELP + (CHAT_HELP if self.chat is not None else ""))
        elif cmd in ("reset", "chat", "system"):
            self._chat_command(cmd, args.strip())
        elif cmd == "show":
            self._show()
        elif cmd == "set":
            self._set(args.strip())
        elif cmd == "probs":
            self._probs()
        elif cmd == "score":
            self._score(args)
        elif cmd == "regen":
            self._regen()
        else:
            self._note(f"unknown command /{cmd}; type /help for the list")
        return True

    def _chat_command(self, cmd: str, args: str) -> None:
        """/reset, /system TEXT, /chat on|off."""
        if self.chat is None:
            self._note(f"/{cmd} is for chat, but this model's tokenizer has no chat template: "
                       "each line is continued as plain text")
            return
        conv = self.conversation
        if cmd == "reset":
            conv.reset()
            self._say("conversation cleared" + (" (the system message stays)"
                                                if conv.system else ""))
        elif cmd == "system":
            conv.system = args or None
            conv.reset()
            self._say(f"system message {'set' if args else 'removed'}; conversation cleared")
        elif args.lower() in ("on", "off"):
            self.chatting = args.lower() == "on"
            self._say("chat on: each line is a message" if self.chatting
                      else "chat off: each line is continued as plain text")
        else:
            self._note(f"usage: /chat on|off, got {args!r}")

    def _regen(self) -> None:
        if not self.chatting:
            if self.last_prompt is None:
                self._note("nothing to regenerate yet: type a prompt first")
            else:
                self._answer(self.last_prompt)
            return
        turns = self.conversation.turns
        if turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            self._note("nothing to regenerate yet: type a message first")
            return
        self._reply(None)

    # -- answering -----------------------------------------------------------------------------

    def _reply(self, message: str | None) -> None:
        """Chat: add `message` (None: answer the last one again) and print the reply."""
        conv, context, s = self.conversation, self.model.max_seq_len, self.settings
        budget = s.max_new_tokens if s.max_new_tokens is not None else s.max_length
        keep = min(budget, context // 2)  # room kept for the reply
        if message is not None:
            conv.add("user", message)
        try:
            ids, dropped = conv.prompt_ids(self.chat, context - keep, context)
        except ChatTemplateError as exc:
            conv.turns.pop()  # the message the template refused
            self._note(f"error: {exc}")
            return
        except ValueError as exc:
            self._note(f"error: {exc}")
            return
        if dropped:
            self._note(f"note: the conversation outgrew the model's context ({context} tokens, "
                       f"{keep} kept for the reply): dropped the oldest {dropped} messages"
                       + ("; the system message stays" if conv.system else ""))
        try:
            gen = TextGeneration(self.model, self.tokenizer, ids, replace(s, max_new_tokens=budget),
                                 stream=self.stream, top_logprobs=self.probs_k,
                                 end_tokens=self.chat.end_tokens)
            pieces = iter(gen)
        except ValueError as exc:
            conv.turns.pop()
            self._note(f"error: {exc}")
            return
        self.last_gen = gen
        reply: list[str] = []
        try:
            for piece in pieces:
                reply.append(piece)
                self.out.write(ansi_color(piece, gen.last_prob) if self.prob_color else piece)
                self.out.flush()
        finally:
            pieces.close()
            conv.add("assistant", "".join(reply))  # an interrupted reply, as far as it got
        self.out.write("\n")
        self.out.flush()
        if self.verbose:
            self._note(gen.summary())

    def _answer(self, prompt: str) -> None:
        if self.chatting:
            self._reply(prompt)
            return
        self.last_prompt = prompt
        ids = self.tokenizer.encode(prompt)
        limit = self.model.max_seq_len
        if len(ids) > limit:
            self._note(f"note: the prompt is {len(ids)} tokens; using its last {limit} "
                       "(the model's context)")
            ids = ids[-limit:]
        s = self.settings
        if s.max_new_tokens is None and s.max_length <= len(ids):
            self._note(f"max_length {s.max_length} leaves no room after the {len(ids)}-token "
                       "prompt; /set max_new_tokens N (or a larger max_length)")
            return
        try:
            # Recorded for /probs and colours: a few full-vocabulary ops per token.
            gen = TextGeneration(self.model, self.tokenizer, ids, s, stream=self.stream,
                                 top_logprobs=self.probs_k)
            pieces = iter(gen)
        except ValueError as exc:
            self._note(f"error: {exc}")
            return
        self.last_gen = gen
        self.out.write(self._dim(prompt) if self.tty else prompt)
        self.out.flush()
        try:
            for piece in pieces:
                self.out.write(ansi_color(piece, gen.last_prob) if self.prob_color else piece)
                self.out.flush()
        finally:
            pieces.close()  # on Ctrl-C too: ends the model's stream and frees its cache
        self.out.write("\n")
        self.out.flush()
        if self.verbose:
            self._note(gen.summary())

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Read prompts until /quit, end of input or Ctrl-C at an empty prompt; return 0."""
        previous = _KEEP
        if self.tty:
            self._setup_readline()
            previous = self._catch_sigint()
            self._say(self._dim(
                "Chat mode (the model's chat template): type a message, or /help. /reset starts "
                "over, /chat off continues text instead. Ctrl-D or /quit to leave."
                if self.chatting else "Type a prompt, or /help. Ctrl-D or /quit to leave."))
        try:
            with self.model:
                while True:
                    try:
                        line = self._read_line()
                    except KeyboardInterrupt:
                        if not self.tty:
                            raise
                        self.out.write("\n")
                        if self._typed:
                            continue  # like a shell: Ctrl-C drops the line being typed
                        return 0
                    if line is None:
                        if self.tty:
                            self.out.write("\n")
                        return 0
                    if not line.strip():
                        continue
                    if line.startswith("//"):
                        line = line[1:]
                    elif line.startswith("/"):
                        if not self._command(line.strip()):
                            return 0
                        continue
                    try:
                        self._answer(line)
                    except KeyboardInterrupt:
                        if not self.tty:
                            raise  # piped input: Ctrl-C ends the whole run
                        self.out.write("\n")
                        self._note(self._dim("[stopped]"))
                    except BrokenPipeError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the REPL outlives a failed answer
                        self.out.write("\n")  # end the half-written answer's line
                        self._note(f"error: {type(exc).__name__}: {exc}")
        finally:
            if previous is not _KEEP and previous is not None:  # None: set outside Python
                signal.signal(signal.SIGINT, previous)
            self.out.flush()
            self._save_history()
