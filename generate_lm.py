#!/usr/bin/env python
"""Generate text with a trained language model: one prompt, or an interactive prompt.

    python generate_lm.py --checkpoint lm_wikitext/snapshots/latest.pt \\
        --prompt "The history of artificial intelligence" --temperature 0.8 --top_p 0.9
    python generate_lm.py --checkpoint lm_wikitext/snapshots/latest.pt --interactive

Text streams to stdout as it is generated; messages go to stderr. Bad input exits with status 2
and a one-line `error: ...`. See GENERATION_GUIDE.md.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from typing import Any, NoReturn

from common.cli import OneLineParser, Runtime, add_runtime_flags, device_error, number

EXAMPLES = """\
examples:
  python generate_lm.py --checkpoint lm_wikitext/snapshots/latest.pt --prompt "In the year 2050,"
  python generate_lm.py --checkpoint lm_shakespeare --prompt "ROMEO:" --temperature 0.8 --top_p 0.9
  echo "Once upon a time" | python generate_lm.py --prompt - --max_new_tokens 50 --seed 1
  python generate_lm.py --checkpoint lm_wikitext --interactive --temperature 0.8 --top_p 0.9
  python generate_lm.py --checkpoint HuggingFaceTB/SmolLM2-135M-Instruct --interactive \\
      --system "Be brief."

--checkpoint accepts a snapshot file, latest.pt, a run directory (lm_x/) or its snapshots/
directory (the snapshot with the highest step is used), or a .safetensors export.
"""
SEED_MAX = 2**64 - 1  # model.sampling.SEED_LIMIT - 1: what torch.Generator.manual_seed takes

def build_parser() -> argparse.ArgumentParser:
    """The command line (no heavy imports, so `--help` and usage errors are instant)."""
    p = OneLineParser(
        prog="generate_lm.py",
        description="Generate text with a language model trained by training/train_lm.py.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint file (.pt or .safetensors), run directory or snapshots "
                        "directory (default: the most recently trained lm_*/ run in the "
                        "current directory)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", metavar="TEXT",
                      help='generate from one prompt; "-" reads it from stdin; "" samples '
                           "unconditionally (from the end-of-text token)")
    mode.add_argument("--interactive", action="store_true",
                      help="interactive prompt: each line is a prompt (a chat message for a "
                           "model with a chat template); /help lists commands")
    c = p.add_argument_group("chat (--interactive, a model whose tokenizer has a chat template)")
    c.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="auto: chat when the tokenizer has a chat template, else continue text; "
                        "on: chat, or exit 2 without a template; off: continue each line as "
                        "plain text (default: auto)")
    c.add_argument("--system", metavar="TEXT",
                   help="the chat's system message (kept when old turns are dropped; /system "
                        "changes it) (default: none)")

    g = p.add_argument_group("generation parameters")
    g.add_argument("--max_length", type=number("--max_length", 1, cast=int), default=100,
                   metavar="N", help="maximum total length, prompt plus new tokens (default: 100)")
    g.add_argument("--max_new_tokens", type=number("--max_new_tokens", 1, cast=int),
                   metavar="N", help="number of new tokens; replaces --max_length (default: none)")
    g.add_argument("--temperature", type=number("--temperature", 0.0), default=1.0,
                   metavar="T", help="sampling temperature; 0 is greedy (default: 1.0)")
    g.add_argument("--top_k", type=number("--top_k", 1, cast=int), metavar="K",
                   help="sample from the K most likely tokens only (default: none)")
    g.add_argument("--top_p", type=number("--top_p", 0.0, 1.0, low_open=True), metavar="P",
                   help="nucleus sampling: the most likely tokens holding probability P, "
                        "in (0, 1] (default: none)")
    g.add_argument("--repetition_penalty", type=number("--repetition_penalty", 0.0,
                                                       low_open=True),
                   default=1.0, metavar="R",
                   help="CTRL repetition penalty; > 1 discourages repeats (default: 1.0, off)")
    g.add_argument("--seed", type=number("--seed", 0, SEED_MAX, cast=int), metavar="S",
                   help="random seed for reproducible samples; sample i uses S+i "
                        "(default: random, shown by --verbose)")
    g.add_argument("--num_samples", type=number("--num_samples", 1, cast=int), default=1,
                   metavar="N", help="number of samples for the prompt (default: 1)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the generated text contains STR (not printed); repeatable; "
                        r"\n, \t and \\ are understood (default: none; generation always "
                        "stops at the end-of-text token)")

    o = p.add_argument_group("token probabilities")
    o.add_argument("--show_probs", type=number("--show_probs", 0, cast=int), metavar="K",
                   help="after each sample, print on stderr a table of the generated tokens "
                        "with their probability, rank and the K likeliest alternatives; in "
                        "--interactive, K for /probs (default: no table; /probs shows 5)")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object per sample on stdout instead of the text: "
                        "text, tokens with log-probabilities (and --show_probs K "
                        "alternatives, default 5), timing")

    r = p.add_argument_group("runtime")
    add_runtime_flags(r)
    r.add_argument("--no_stream", action="store_true",
                   help="print each sample when it is complete instead of token by token "
                        "(same text for the same --seed)")
    r.add_argument("--verbose", "-v", action="store_true",
                   help="print load time, seed and generation speed on stderr")
    r.add_argument("--allow_nonfinite", action="store_true",
                   help="load a checkpoint with NaN/inf weights instead of refusing it (to "
                        "debug a diverged run; generation stops at the first non-finite logits)")
    return p


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _read_stdin_prompt() -> str:
    if sys.stdin is None:
        _fail("--prompt - reads the prompt from stdin, but stdin is closed; pipe text in")
    if sys.stdin.isatty():
        _fail("--prompt - reads the prompt from stdin, but stdin is a terminal; pipe text in, "
              "e.g. echo 'Once upon a time' | python generate_lm.py --prompt -")
    data = sys.stdin.buffer.read()
    text = data.decode("utf-8", errors="replace")
    if text != data.decode("utf-8", errors="ignore"):
        sys.stderr.write("note: stdin was not valid UTF-8; undecodable bytes became U+FFFD\n")
    text = text.rstrip("\r\n")  # like $(...) in a shell: the echo's newline is not prompt
    if not text:
        _fail("--prompt -: stdin was empty; pipe a prompt in, or pass --prompt TEXT")
    return text


def _from_argv(flag: str, text: str | None) -> str | None:
    """An argument as text: bytes that were not UTF-8 (kept by Python as lone surrogates, which
    the tokenizer cannot take) become U+FFFD, with a note, as for stdin."""
    if text is None:
        return None
    fixed = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if fixed != text:
        sys.stderr.write(f"note: {flag} was not valid UTF-8; undecodable bytes became U+FFFD\n")
    return fixed


def _compute_context(model: Any, amp_dtype: Any):
    """Autocast for --dtype bfloat16/float16, nothing for float32."""
    import contextlib

    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=amp_dtype)


def _load(args: argparse.Namespace) -> Any:
    """The checkpoint and tokenizer the flags name (`model.loading`); a failure is a one-line
    exit 2."""
    from model.loading import LoadError, load_runtime

    try:
        loaded = load_runtime(args.checkpoint, Runtime.from_args(args),
                              allow_nonfinite=args.allow_nonfinite)
    except LoadError as exc:
        _fail(str(exc))
    sys.stderr.write(loaded.describe() + "\n")
    if args.verbose:
        sys.stderr.write(f"loaded in {loaded.seconds:.2f} s; tokenizer {loaded.tokenizer_name}\n")
    return loaded


def _settings(args: argparse.Namespace):
    from model.textstream import GenerationSettings

    return GenerationSettings(
        max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(unescape(s) for s in args.stop),
    )


def unescape(text: str) -> str:
    r"""Shell-friendly escapes in --stop: \n, \t, \r and \\ (`--stop '\n'` ends at a newline)."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], "\\"),
                  text)


def _prompt_ids(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    if prompt == "":  # unconditional sampling starts from end-of-text, as GPT-2 does
        if tokenizer.eos_token_id is None:
            _fail("--prompt is empty and the tokenizer has no end-of-text token to start from")
        return [tokenizer.eos_token_id]
    ids = tokenizer.encode(prompt)
    if len(ids) > model.max_seq_len:
        sys.stderr.write(f"note: the prompt is {len(ids)} tokens; using its last "
                         f"{model.max_seq_len} (the model's context, max_seq_len)\n")
        ids = ids[-model.max_seq_len:]
    return ids


def _generate(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: str) -> int:
    from model.generation import NonFiniteLogitsError
    from model.textstream import TextGeneration

    settings = _settings(args)
    ids = _prompt_ids(model, tokenizer, prompt)
    if settings.max_new_tokens is None and settings.max_length <= len(ids):
        _fail(f"--max_length {settings.max_length} must be greater than the prompt's {len(ids)} "
              "tokens (it counts prompt plus new tokens); raise it or use --max_new_tokens")
    base_seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.verbose and args.seed is None:
        sys.stderr.write(f"seed {base_seed} (pass --seed {base_seed} to reproduce)\n")
    out = sys.stdout
    top = args.show_probs if args.show_probs is not None else 5 if args.json else None
    with model:
        for i in range(args.num_samples):
            settings.seed = base_seed + i
            try:
                gen = TextGeneration(model, tokenizer, ids, settings, stream=not args.no_stream,
                                     top_logprobs=top)
                pieces = iter(gen)  # --no_stream generates here
            except (ValueError, NonFiniteLogitsError) as exc:
                _fail(str(exc))
            if args.json:
                from model.probview import json_record

                try:
                    text = "".join(pieces)
                except NonFiniteLogitsError as exc:
                    _fail(str(exc))
                out.write(json_record(gen, prompt, ids, text, settings.seed) + "\n")
                out.flush()
                continue
            if args.num_samples > 1:
                sep = "\n" if i else ""
                out.write(f"{sep}--- sample {i + 1}/{args.num_samples} ---\n")
            out.write(prompt)
            out.flush()
            try:
                if args.no_stream:
                    out.write("".join(pieces))
                else:
                    for piece in pieces:
                        out.write(piece)
                        out.flush()
            except NonFiniteLogitsError as exc:
                out.write("\n")
                out.flush()
                _fail(str(exc))
            out.write("\n")
            out.flush()
            if args.show_probs is not None:  # stderr: piping the text stays clean
                sys.stderr.write(gen.probabilities().table(args.show_probs) + "\n")
            if args.verbose:
                tag = f"sample {i + 1}: " if args.num_samples > 1 else ""
                sys.stderr.write(f"{tag}{gen.summary()}\n")
    return 0


def _chat_format(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The chat template `--chat` asks for (`model.chat.ChatFormat`), or None for plain
    continuation; a broken or missing template is a one-line exit 2."""
    if args.chat == "off":
        return None
    from model.chat import ChatTemplateError, chat_format

    try:
        chat = chat_format(tokenizer)
    except ChatTemplateError as exc:
        _fail(f"{exc}; fix the template in the model's tokenizer files, or pass --chat off to "
              "continue text without it")
    if chat is None and (args.chat == "on" or args.system is not None):
        flag = "--chat on" if args.chat == "on" else "--system"
        _fail(f"{flag}: this model's tokenizer has no chat template (a base model continues "
              f"text); leave {flag} out")
    return chat


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.interactive and args.prompt is None:
        _fail("give --prompt TEXT (or --prompt - to read stdin) or --interactive")
    if not args.interactive and (args.chat != "auto" or args.system is not None):
        _fail("--chat and --system apply to --interactive (--prompt continues the text as "
              "given); to chat in a script, pipe the messages: echo 'Hi' | python "
              "generate_lm.py --interactive")
    if args.chat == "off" and args.system is not None:
        _fail("--system is the chat's system message, but --chat off continues plain text; "
              "drop one of them")
    if args.interactive and args.json:
        _fail("--json applies to --prompt; the interactive prompt prints text")
    if args.interactive and args.num_samples != 1:
        _fail("--num_samples applies to --prompt; in --interactive use /regen for another sample")
    if args.seed is not None and args.seed + args.num_samples - 1 > SEED_MAX:
        _fail(f"--seed {args.seed} with --num_samples {args.num_samples}: sample i uses seed S+i, "
              f"which must stay at most {SEED_MAX} (2**64 - 1); pick a smaller --seed")
    # Cheap checks before torch is imported (seconds), so typos fail at once.
    if device_error(args.device):
        _fail(device_error(args.device))
    if args.checkpoint is not None and not os.path.exists(os.path.expanduser(args.checkpoint)):
        _fail(f"--checkpoint: not found: {args.checkpoint}")
    if sys.stdout is None:
        _fail("stdout is closed: there is nowhere to write the text")
    if args.interactive and sys.stdin is None:
        _fail("--interactive reads prompts from stdin, but stdin is closed")
    prompt = _read_stdin_prompt() if args.prompt == "-" else _from_argv("--prompt", args.prompt)
    args.stop = [_from_argv("--stop", s) for s in args.stop]
    args.system = _from_argv("--system", args.system)
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="replace")  # a non-UTF-8 terminal: never crash on output
    loaded = _load(args)
    model, tokenizer, amp_dtype = loaded.model, loaded.tokenizer, loaded.amp_dtype
    if not args.interactive:
        with _compute_context(model, amp_dtype):
            return _generate(args, model, tokenizer, prompt)

    from model.repl import Repl

    chat = _chat_format(args, tokenizer)
    settings = _settings(args)
    if args.seed is None:
        settings.seed = None  # fresh samples each time; /set seed N makes them repeatable
    info = loaded.describe()
    if sys.stdin.isatty() and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # the REPL reports undecodable bytes
    with _compute_context(model, amp_dtype):
        return Repl(model, tokenizer, settings, stream=not args.no_stream,
                    verbose=args.verbose, info=info, chat=chat, system=args.system,
                    probs_k=5 if args.show_probs is None else args.show_probs).run()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python's exit-time flush
        # of stdout from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except OSError as exc:  # writing the text failed: a full disk, an I/O error
        sys.stderr.write(f"error: cannot write the output ({exc.strerror or exc})\n")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit-time flush would fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
