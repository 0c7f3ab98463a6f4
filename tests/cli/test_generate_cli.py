"""generate_lm.py, run for real in a subprocess: flags, errors, streaming, stdin, pipes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_cases import run_main_many

from model.checkpoint import load_model
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "generate_lm.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run generate_lm.py; stdout and stderr come back as str (stdout must be valid UTF-8)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin,
                          capture_output=True, cwd=cwd or REPO, env=ENV, timeout=timeout)
    proc.stdout = proc.stdout.decode("utf-8")  # strict: streaming must never split a character
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return proc


def run_many(commands: list[list[str]], cwd: Path, timeout: float = 300
             ) -> list[subprocess.CompletedProcess]:
    """Run `generate_lm.main(argv)` for each argv in one interpreter (imports cost seconds);
    return one CompletedProcess-like result per command, its output split out of the whole."""
    results = run_main_many("generate_lm", [(argv, None) for argv in commands], cwd, ENV,
                            timeout)
    return [subprocess.CompletedProcess(argv, rc, out, err)
            for argv, (rc, out, err) in zip(commands, results, strict=True)]


PARSER_ERROR = "generate_lm.py: error: "  # the parser's (common.cli.OneLineParser) prefix


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str,
                       prefix: str = "error: ") -> None:
    assert proc.returncode == 2, proc.stderr
    # One `error:` line, last; at most the "loaded <file>" notice before it.
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(prefix), proc.stderr
    assert all(line.startswith("loaded ") for line in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in lines[-1]


@pytest.fixture()
def one_thread():
    """Compute expected outputs with one thread, as the subprocesses do (same float sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    tok = load_tokenizer("gpt2")
    model, _ = load_model(tiny_checkpoint, device="cpu", tokenizer=tok)
    return model, tok


def expected_text(tiny_model, prompt: str, **kwargs) -> str:
    """What the CLI must print: the prompt, then the decoded continuation up to end-of-text."""
    model, tok = tiny_model
    ids = tok.encode(prompt)
    with model:
        out = model.generate(ids, **kwargs)[0].tolist()[len(ids):]
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return prompt + tok.decode(out)




# -- usage errors: instant, before torch is imported --------------------------------------------


@pytest.mark.parametrize("args, needles, prefix", [
    (["--prompt", "x", "--temperature", "-1"], ["--temperature", ">= 0"], PARSER_ERROR),
    (["--prompt", "x", "--temperature", "nan"], ["--temperature", "finite"], PARSER_ERROR),
    (["--prompt", "x", "--top_p", "1.5"], ["--top_p", "(0.0, 1.0]"], PARSER_ERROR),
    (["--prompt", "x", "--top_p", "0"], ["--top_p"], PARSER_ERROR),
    (["--prompt", "x", "--max_length", "0"], ["--max_length", ">= 1"], PARSER_ERROR),
    (["--prompt", "x", "--max_new_tokens", "-5"], ["--max_new_tokens"], PARSER_ERROR),
    (["--prompt", "x", "--top_k", "0"], ["--top_k"], PARSER_ERROR),
    (["--prompt", "x", "--top_k", "ten"], ["--top_k", "integer"], PARSER_ERROR),
    (["--prompt", "x", "--num_samples", "0"], ["--num_samples"], PARSER_ERROR),
    (["--prompt", "x", "--repetition_penalty", "0"], ["--repetition_penalty"], PARSER_ERROR),
    (["--prompt", "x", "--seed", "-1"], ["--seed"], PARSER_ERROR),
    (["--prompt", "x", "--device", "tpu"], ["--device", "'tpu'"], "error: "),
    (["--prompt", "x", "--dtype", "fp8"], ["--dtype"], PARSER_ERROR),
    (["--prompt", "x", "--checkpoint", "no/such/run"], ["--checkpoint", "not found"], "error: "),
    (["--prompt", "x", "--bogus"], ["--bogus"], PARSER_ERROR),
    ([], ["--prompt", "--interactive"], "error: "),
    (["--prompt", "x", "--interactive"], ["--interactive", "--prompt"], PARSER_ERROR),
    (["--interactive", "--num_samples", "2"], ["--num_samples"], "error: "),
])
def test_usage_errors(args, needles, prefix):
    assert_usage_error(run_cli(*args, timeout=30), *needles, prefix=prefix)


def test_help_documents_every_flag_with_its_default():
    proc = run_cli("--help", timeout=30)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--checkpoint", "--prompt", "--interactive", "--max_length", "--temperature",
                 "--top_k", "--top_p", "--device", "--tokenizer", "--max_new_tokens", "--seed",
                 "--num_samples", "--repetition_penalty", "--stop", "--no_stream", "--dtype",
                 "--verbose"):
        assert flag in text, flag
    for default in ("(default: 100)", "(default: 1.0)", "(default: none)", "default: auto",
                    "(default: float32)",
                    "else gpt2)", '"-" reads it from stdin'):
        assert default in text, default


# -- errors that need the model files -----------------------------------------------------------


def test_runtime_errors_exit_2(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    ckpt = str(tiny_checkpoint)
    cases = [
        (["--checkpoint", str(truncated), "--prompt", "x"], ["truncated or corrupt"]),
        (["--checkpoint", ckpt, "--prompt", "x", "--tokenizer", "no-such-user/no-such-tokenizer"],
         ["--tokenizer", "no-such-user/no-such-tokenizer"]),
        (["--checkpoint", ckpt, "--max_length", "3", "--prompt", "longer than three tokens, this"],
         ["--max_length 3", "--max_new_tokens"]),
        (["--prompt", "x"], ["no --checkpoint given", "python training/train_lm.py"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", ckpt, "--prompt", "x", "--device", "cuda"],
                      ["--device", "CUDA is not available"]))
    results = run_many([argv for argv, _ in cases], cwd=tmp_path)  # no lm_*/ run in tmp_path
    for (_, needles), proc in zip(cases, results, strict=True):
        assert_usage_error(proc, *needles)


# -- generating -----------------------------------------------------------------------------------


# --device cpu: the expected text is computed on the CPU (a GPU's bf16 default would differ).
SAMPLING = ["--device", "cpu", "--max_new_tokens", "24", "--temperature", "0.8", "--top_k", "500",
            "--top_p", "0.95", "--repetition_penalty", "1.2", "--seed", "5"]
SAMPLING_KW = dict(max_new_tokens=24, temperature=0.8, top_k=500, top_p=0.95,
                   repetition_penalty=1.2, seed=5)


def test_stream_and_no_stream_print_the_same_decoded_text(tiny_checkpoint, tiny_model, one_thread):
    prompt = "Unicode: 你好 and 🙂 —"
    want = expected_text(tiny_model, prompt, **SAMPLING_KW) + "\n"
    streamed = run_cli("--checkpoint", str(tiny_checkpoint), "--prompt", prompt, *SAMPLING)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == want
    assert f"loaded {tiny_checkpoint}" in streamed.stderr  # says which file it loaded
    whole = run_cli("--checkpoint", str(tiny_checkpoint), "--prompt", prompt, *SAMPLING,
                    "--no_stream", "--dtype", "float32", "--tokenizer", "gpt2")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == want


def test_stdin_prompt_and_default_checkpoint(tiny_checkpoint, tiny_model, tmp_path, one_thread):
    snaps = tmp_path / "lm_test" / "snapshots"
    snaps.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, snaps / "latest.pt")
    proc = run_cli("--prompt", "-", *SAMPLING, stdin=b"Hello world\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(tiny_model, "Hello world", **SAMPLING_KW) + "\n"
    assert "lm_test/snapshots/latest.pt" in proc.stderr


def test_samples_stop_strings_and_verbose_timing(tiny_checkpoint, tiny_model, one_thread):
    prompt = "The capital of France is"
    kw = dict(max_new_tokens=30, temperature=1.0)
    first = expected_text(tiny_model, prompt, seed=3, **kw)[len(prompt):]
    second = expected_text(tiny_model, prompt, seed=4, **kw)[len(prompt):]
    stop = next(first[i:i + 3] for i in range(8, len(first) - 3) if first[i:i + 3].strip()
                and first[i:i + 3].isprintable())
    cut = [t[:t.index(stop)] if stop in t else t for t in (first, second)]

    proc = run_cli("--checkpoint", str(tiny_checkpoint), "--prompt", prompt, "--num_samples", "2",
                   "--device", "cpu", "--seed", "3", "--max_new_tokens", "30", "--stop", stop,
                   "--stop", "@@never@@", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"--- sample 1/2 ---\n{prompt}{cut[0]}\n\n"
                           f"--- sample 2/2 ---\n{prompt}{cut[1]}\n")
    timing = [line for line in proc.stderr.splitlines() if "tokens/s" in line]
    assert len(timing) == 2 and "stopped by stop" in timing[0]


def test_pipe_into_head_ends_quietly(endless_checkpoint):
    cmd = (f"{sys.executable} {SCRIPT} --checkpoint {endless_checkpoint} --prompt Once "
           "--max_new_tokens 100000 | head -c 100")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == 100 and proc.stdout.startswith(b"Once")
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr


def test_the_guides_example_invocations(tiny_checkpoint, tmp_path):
    """Every `python generate_lm.py --prompt ...` command of the guide, with its literal paths
    (the interactive one is in test_repl.py)."""
    snaps = tmp_path / "lm_wikitext" / "snapshots"
    snaps.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, snaps / "snapshot_epoch_0000_step_070999_20260212_095134.pt")
    shutil.copy(tiny_checkpoint, snaps / "latest.pt")
    commands = [
        ["--checkpoint", "lm_wikitext/snapshots/snapshot_epoch_0000_step_070999_20260212_095134.pt",
         "--prompt", "The history of artificial intelligence", "--max_length", "100",
         "--temperature", "0.8", "--top_p", "0.9"],
        ["--checkpoint", "lm_wikitext/snapshots/latest.pt", "--prompt", "In the year 2050,"],
        ["--checkpoint", "lm_wikitext/snapshots/latest.pt", "--prompt", "Once upon a time",
         "--temperature", "1.5", "--max_length", "200"],
        ["--checkpoint", "lm_wikitext/snapshots/latest.pt", "--prompt", "The capital of France is",
         "--temperature", "0.3", "--top_k", "10"],
        ["--checkpoint", "lm_wikitext/snapshots/latest.pt", "--prompt",
         "Artificial intelligence is", "--temperature", "0.8", "--top_p", "0.9",
         "--max_length", "150"],
    ]
    # Plus `--prompt ""`: unconditional sampling from the end-of-text token (not shown), as GPT-2.
    unconditional = ["--checkpoint", "lm_wikitext", "--prompt", "", "--max_new_tokens", "5"]
    *results, uncond = run_many([*commands, unconditional], cwd=tmp_path)
    for argv, proc in zip(commands, results, strict=True):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(argv[argv.index("--prompt") + 1])
        assert len(proc.stdout) > len(argv[argv.index("--prompt") + 1]) + 10
    assert uncond.returncode == 0, uncond.stderr
    assert uncond.stdout.strip() and "<|endoftext|>" not in uncond.stdout


def test_stop_string_escapes():
    sys.path.insert(0, str(REPO))
    from generate_lm import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb") == "a\tb"
    assert unescape(r"\\n") == "\\n" and unescape(r"\x") == "\\x" and unescape("é") == "é"


def test_example_generate(tiny_checkpoint, tmp_path):
    """example_generate.py: single and batch generation; with no model, the command to train one."""
    code = ("import os, sys, example_generate\n"
            f"rc = example_generate.main(['example_generate.py', {str(tiny_checkpoint)!r}])\n"
            "print(f'<rc={rc}>', flush=True)\n"
            "rc = example_generate.main(['example_generate.py'])\n"  # cwd has no lm_*/ run
            "print(f'<rc={rc}>', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with_model, without = proc.stdout.split("<rc=0>\n")
    assert f"Loaded {tiny_checkpoint}" in with_model
    assert "The future of technology" in with_model
    assert "Prompt 3: In the future, we will" in with_model
    assert without == "<rc=2>\n"
    assert "Train one first:\n    python training/train_lm.py" in proc.stderr
