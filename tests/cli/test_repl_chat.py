"""The REPL's chat mode, driven through a real pseudo-terminal, on a tiny model whose tokenizer
has a ChatML template (tests/chat_model.py): each reply is the model's greedy reply to exactly
the template's tokens for the conversation so far; /reset forgets it; a conversation over the
context drops its oldest turns with a notice and keeps the system message. Bad starts (a broken
template, --chat on for a base model) are one line and exit 2."""

from __future__ import annotations

import re
import sys

import pexpect
import pytest
import torch
from chat_model import BROKEN, CHATML, CONTEXT, IM_END, STOPPING, save_chat_checkpoint
from cli_cases import run_main_many
from test_repl import PROMPT, SCRIPT, _command, _env, _exit_status

from model.loading import load_for_inference

SYSTEM = STOPPING[0]["content"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-repl")
    return {kind: save_chat_checkpoint(root / f"{kind}.pt", template)
            for kind, template in (("chat", CHATML), ("base", None), ("broken", BROKEN))}


@pytest.fixture(scope="module")
def local(checkpoints, one_thread):
    loaded = load_for_inference(checkpoints["chat"], device="cpu")
    return loaded.model, loaded.tokenizer


def reply(local, messages: list[dict[str, str]]) -> str:
    """The greedy reply to `messages` in this process, to the end of the turn."""
    model, tok = local
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    ends = {tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)}
    with torch.no_grad():
        new = model.generate(torch.tensor(ids), max_new_tokens=MAX_NEW,
                             temperature=0)[0, len(ids):].tolist()
    cut = next((k for k, t in enumerate(new) if t in ends), len(new))
    return tok.decode(new[:cut])


def _spawn(checkpoint, tmp_path, *args: str) -> tuple[pexpect.spawn, str]:
    child = pexpect.spawn(sys.executable, [str(SCRIPT), "--checkpoint", str(checkpoint),
                                           "--interactive", *args],
                          env=_env(tmp_path), cwd=str(tmp_path), timeout=60, encoding="utf-8",
                          codec_errors="replace", dimensions=(40, 400))
    child.expect_exact(PROMPT)
    return child, child.before


def _say(child, text: str) -> str:
    """A message's reply (the echo of the line, and the trailing newline, left out)."""
    return _command(child, text).removesuffix("\n")


def test_chat_session(checkpoints, local, tmp_path):
    """History across turns, /show, /regen, /reset, trimming with the system message kept,
    /chat off, Ctrl-D."""
    child, banner = _spawn(checkpoints["chat"], tmp_path, "--temperature", "0",
                           "--max_new_tokens", str(MAX_NEW), "--system", SYSTEM)
    assert "Chat mode" in banner
    history = [{"role": "system", "content": SYSTEM}]

    def turn(text: str) -> str:
        history.append({"role": "user", "content": text})
        expected = reply(local, history)
        history.append({"role": "assistant", "content": expected})
        return expected

    first = turn(STOPPING[1]["content"])
    assert _say(child, STOPPING[1]["content"]) == first
    second = turn("good night")
    alone = reply(local, [history[0], history[-2]])
    assert second != alone  # the history changes the reply: the test can tell
    assert _say(child, "good night") == second
    shown = _command(child, "/show")
    assert re.search(r"\nchat\s+on \(replies end at <\|im_end\|>, <\|endoftext\|>; 4 messages\)",
                     shown) and re.search(rf"\nsystem\s+{SYSTEM}\n", shown)
    assert _command(child, "/regen").removesuffix("\n") == second  # greedy: the same again
    assert "/reset" in _command(child, "/help")

    assert "conversation cleared (the system message stays)" in _command(child, "/reset")
    assert _say(child, "good night") == alone
    history[1:] = [{"role": "user", "content": "good night"},
                   {"role": "assistant", "content": alone}]

    # Long messages outgrow the context: the oldest turns go, with a notice, the system stays.
    notice = None
    for i in range(8):
        text = f"the king and the queen {i} " * 3
        history.append({"role": "user", "content": text})
        out = _say(child, text)
        found = re.search(rf"note: the conversation outgrew the model's context \({CONTEXT} "
                          rf"tokens, {MAX_NEW} kept for the reply\): dropped the oldest "
                          r"(\d+) messages; the system message stays\n", out)
        if found:
            notice = found
            del history[1:1 + int(found.group(1))]
            out = out[found.end():]
        expected = reply(local, history)
        assert out == expected, (i, out, expected)
        history.append({"role": "assistant", "content": expected})
        if notice:
            break
    assert notice is not None and history[0]["role"] == "system"
    assert re.search(rf"; {len(history) - 1} messages\)", _command(child, "/show"))

    assert "plain text" in _command(child, "/chat off")
    assert _say(child, "Once upon").startswith("Once upon")  # continued, not answered
    child.sendeof()
    assert _exit_status(child) == 0


def run_many(commands: list[tuple[list[str], bytes]], tmp_path) -> list[tuple[int, str, str]]:
    """`generate_lm.main(argv)` with `stdin` piped in, for each (argv, stdin), in one
    interpreter; (status, stdout, stderr) of each."""
    return run_main_many("generate_lm", commands, tmp_path, _env(tmp_path))


def test_piped_chat_a_base_model_and_bad_starts(checkpoints, local, tmp_path):
    """Piped: one reply per line. A base model continues text (and refuses --chat on); a
    broken template, and --chat/--system where they do not apply, are one line and exit 2."""
    def ckpt(kind: str) -> list[str]:
        return ["--checkpoint", str(checkpoints[kind])]

    bad = [("broken", ["--interactive"], ["chat template is broken", "TemplateSyntaxError",
                                          "--chat off"]),
           ("base", ["--interactive", "--chat", "on"], ["--chat on", "no chat template"]),
           ("base", ["--interactive", "--system", "Be kind."], ["--system", "no chat template"]),
           ("chat", ["--prompt", "Hi", "--chat", "on"], ["apply to --interactive"]),
           ("chat", ["--interactive", "--chat", "off", "--system", "x"], ["--chat off"])]
    commands = [
        (ckpt("chat") + ["--interactive", "--temperature", "0", "--max_new_tokens",
                         str(MAX_NEW), "--no_stream"], b"good night\n/reset\ngood night\n"),
        (ckpt("base") + ["--interactive", "--max_new_tokens", "3"], b"Once upon\n/reset\n"),
        # with --chat off a broken template is no obstacle: plain continuation
        (ckpt("broken") + ["--interactive", "--chat", "off", "--max_new_tokens", "2"],
         b"Once\n"),
        *((ckpt(kind) + args, b"Hi\n") for kind, args, _ in bad)]
    results = run_many(commands, tmp_path)

    rc, out, err = results[0]
    assert rc == 0, err
    expected = reply(local, [{"role": "user", "content": "good night"}])
    assert out == f"{expected}\nconversation cleared\n{expected}\n"
    rc, out, err = results[1]
    assert rc == 0 and out.startswith("Once upon") and "no chat template" in err  # /reset
    rc, out, err = results[2]
    assert rc == 0 and out.startswith("Once"), err
    for (_, args, words), (rc, out, err) in zip(bad, results[3:], strict=True):
        lines = [line for line in err.splitlines() if not line.startswith("loaded ")]
        assert rc == 2 and out == "", (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert all(w in lines[0] for w in words), (args, err)
