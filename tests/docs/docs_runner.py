"""Run the fenced code blocks of README.md, GENERATION_GUIDE.md and docs/*.md (`doc_files`).

Used by tests/docs/test_docs.py.

What runs, and how:

- Every fenced block whose language is `python` or `bash` is collected. Other fences (``text``,
  no language) are prose and are not run.
- An HTML comment on the line right before a fence (blank lines allowed) changes what happens:
    `<!-- docs-test: skip (reason) -->`        not run here, only syntax-checked (python:
                                               `compile()`, bash: `bash -n`); reason required.
    `<!-- docs-test: cuda (reason) -->`        run only where CUDA is available, else
                                               syntax-checked only.
    `<!-- docs-test: standalone -->`           a python block run without the preamble (it must
                                               define everything it uses).
- Every block runs from the repository root, wherever its page is (docs/ pages too), as the
  pages tell the reader to run them.
- Each block runs in its own scratch directory (`make_workdir`): the repo's files and folders are
  linked in, and the tiny test checkpoint sits at every checkpoint path the docs use
  (`CHECKPOINT_PATHS`), so commands run exactly as written (blocks that run the trainer start
  without them, and generate from what they trained). Shell blocks run with
  `bash -eo pipefail` and the real scripts; `LM_MAX_STEPS` (honoured by training/train_lm.py)
  keeps training runs to a few steps. Python blocks run in a forked child of a warm interpreter
  (`PythonServer`, so that each block does not pay for importing torch), after `PREAMBLE` unless
  marked standalone.
- The Hugging Face hub is never contacted: HF_HOME points at an offline cache holding the "gpt2"
  tokenizer and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGS = ("python", "bash")
DIRECTIVES = ("skip", "cuda", "standalone")

# Fragments (a block that uses `model`, `tokenizer`, `prompt`... without defining them) run after
# this. The guide says what the fragments assume; this is it, spelled out.
PREAMBLE = """\
import torch
from model.checkpoint import load_model
from model.tokenizer import load_tokenizer

checkpoint_path = "lm_shakespeare/snapshots/latest.pt"
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = load_tokenizer("gpt2")  # the bundled GPT-2 tokenizer, pad_token = eos_token
model, checkpoint = load_model(checkpoint_path, device=device, tokenizer=tokenizer)
# load_model also sets model.tokenizer and model.end_token = tokenizer.eos_token_id
prompt = "Once upon a time"
prompt_ids = tokenizer.encode(prompt)
prompt_tensor = torch.tensor(prompt_ids, dtype=torch.long, device=device)
"""

# Where the docs point at a trained checkpoint; each gets a copy of the test checkpoint.
CHECKPOINT_PATHS = (
    "lm_wikitext/snapshots/snapshot_epoch_0000_step_070999_20260212_095134.pt",
    "lm_wikitext/snapshots/latest.pt",
    "lm_shakespeare/snapshots/latest.pt",
    "path/to/checkpoint.pt",
)

# Environment of every block (on top of the caller's).
BLOCK_ENV = {
    "LM_MAX_STEPS": "2",  # training/train_lm.py stops after this many optimizer steps
    "LM_MAX_EVAL_WINDOWS": "4",  # ... and validates on at most this many windows
    # One thread per process: the test models are tiny, and on a small, busy CPU a second
    # OpenMP thread mostly waits for a core (measured: 6x slower generation at load 6 on 2 cores).
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "MPLBACKEND": "Agg",
    "NO_COLOR": "1",
    "GENERATE_LM_HISTORY": "",  # the REPL keeps no history file
}

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->\s*$")


class DocsError(ValueError):
    """A Markdown file is malformed for the runner (unclosed fence, bad directive)."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    file: str  # path relative to the repo
    line: int  # 1-based line of the opening fence
    lang: str  # "python" or "bash"
    code: str
    directive: str | None = None  # one of DIRECTIVES
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.lang}"


def parse_blocks(text: str, file: str) -> list[Block]:
    """The python and bash blocks of a Markdown text, with the directive before each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    pending: tuple[str, str, int] | None = None  # directive, reason, line
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            name, reason = m.group(1), (m.group(2) or "").strip()
            if name not in DIRECTIVES:
                raise DocsError(f"{file}:{i + 1}: unknown docs-test directive {name!r} "
                                f"(use one of {', '.join(DIRECTIVES)})")
            if name in ("skip", "cuda") and not reason:
                raise DocsError(f"{file}:{i + 1}: docs-test: {name} needs a reason in parentheses")
            pending = (name, reason, i + 1)
            i += 1
            continue
        f = _FENCE.match(line)
        if not f:
            if line.strip() and pending:
                raise DocsError(f"{file}:{pending[2]}: docs-test directive is not followed by a "
                                "code block")
            i += 1
            continue
        indent, fence, lang = f.group(1), f.group(2), f.group(3).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise DocsError(f"{file}:{start + 1}: code fence is never closed")
        i += 1
        directive, reason = (pending[0], pending[1]) if pending else (None, "")
        if pending and lang not in LANGS:
            raise DocsError(f"{file}:{pending[2]}: docs-test directive before a {lang or 'plain'} "
                            "block, which is not run anyway")
        if directive == "standalone" and lang != "python":
            raise DocsError(f"{file}:{pending[2]}: docs-test: standalone is for python blocks")
        pending = None
        if lang in LANGS:
            blocks.append(Block(file, start + 1, lang, "\n".join(body) + "\n", directive, reason))
    if pending:
        raise DocsError(f"{file}:{pending[2]}: docs-test directive is not followed by a code block")
    return blocks


def doc_files(repo: Path = REPO) -> list[str]:
    """The Markdown pages whose blocks run: the README, the guide, then docs/*.md by name."""
    return ["README.md", "GENERATION_GUIDE.md",
            *(f"docs/{p.name}" for p in sorted((repo / "docs").glob("*.md")))]


def collect(files: list[str], repo: Path = REPO) -> list[Block]:
    """All blocks of the given Markdown files (paths relative to the repo)."""
    out: list[Block] = []
    for name in files:
        out += parse_blocks((repo / name).read_text(encoding="utf-8"), name)
    return out


def syntax_error(block: Block) -> str | None:
    """None when the block parses (python: compile, bash: bash -n), else the error."""
    if block.lang == "python":
        try:
            compile(block.code, block.id, "exec")
        except SyntaxError as exc:
            return f"{exc.msg} (block line {exc.lineno})"
        return None
    proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True,
                          timeout=30)
    if proc.returncode:
        return proc.stderr.strip() or f"bash -n exited with {proc.returncode}"
    return None


# -- the scratch directory a block runs in --------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # cheap; scripts replace files atomically, so the source stays intact
    except OSError:
        shutil.copy2(src, dst)


def trains(block: Block) -> bool:
    """Whether a block runs the trainer (it then starts from a clone with no trained runs)."""
    return block.lang == "bash" and "train_lm.py" in block.code


def make_workdir(dest: Path, checkpoint: Path | None, fixtures: Path | None = None,
                 repo: Path = REPO) -> Path:
    """A directory that looks like a fresh clone, with trained runs in it unless `checkpoint=None`.

    The repo's top-level entries (not hidden ones, not run directories) are symlinked in, the
    test checkpoint is placed at every path of `CHECKPOINT_PATHS`, and the files under `fixtures`
    (data files the docs use) are linked in at the same relative paths. Blocks that train get no
    checkpoints: the trainer refuses to start a new run over another run's snapshots, and such
    blocks generate from what they trained.
    """
    dest.mkdir(parents=True)
    for entry in repo.iterdir():
        if entry.name.startswith(".") or entry.name.startswith("lm_") or \
                entry.name in ("__pycache__", "runs"):
            continue
        (dest / entry.name).symlink_to(entry)
    for rel in CHECKPOINT_PATHS if checkpoint is not None else ():
        _link_or_copy(checkpoint, dest / rel)
    if fixtures is not None:
        for f in sorted(fixtures.rglob("*")):
            if f.is_file():
                _link_or_copy(f, dest / f.relative_to(fixtures))
    return dest


def tool_dir(dest: Path) -> Path:
    """A bin/ directory that makes `python` (and `torchrun`) this interpreter's."""
    dest.mkdir(parents=True, exist_ok=True)
    tools = {"python": sys.executable, "python3": sys.executable}
    torchrun = Path(sys.executable).parent / "torchrun"
    if torchrun.exists():
        tools["torchrun"] = str(torchrun)
    for name, target in tools.items():
        # A wrapper, not a symlink: a venv's python finds its venv only through its own path.
        (dest / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (dest / name).chmod(0o755)
    return dest


# -- running --------------------------------------------------------------------------------------


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    timed_out: bool = False


_RUNNING: set[int] = set()  # process groups of shell blocks still running (see stop_all)


def run_bash(block: Block, cwd: Path, env: dict[str, str], timeout: float) -> Result:
    """Run a shell block with bash -eo pipefail in `cwd`; stdin is /dev/null.

    The block runs in its own session (process group), which is killed on timeout.
    """
    script = cwd / ".docs_block.sh"
    script.write_text(block.code)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-eo", "pipefail", str(script)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _RUNNING.add(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the block's whole process group, nothing else
        out, _ = proc.communicate()
        timed_out = True
    finally:
        _RUNNING.discard(proc.pid)
    return Result(proc.returncode, out.decode("utf-8", "replace"), time.perf_counter() - t0,
                  timed_out)


def stop_all() -> None:
    """Kill the process groups of shell blocks still running (an interrupted test session)."""
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class PythonServer:
    """A warm interpreter (torch and transformers imported) that runs each block in a fork.

    Importing torch costs seconds on a small CPU; forking a process that has imported it (and
    has run no torch op, so no thread pool exists yet) costs milliseconds. Each block still runs
    in its own process, with fresh globals and its own working directory.
    """

    def __init__(self, env: dict[str, str], startup_timeout: float = 180.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"], env=env, cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            bufsize=1)
        line = self._readline(startup_timeout)
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            raise RuntimeError(f"docs python server did not start: {line!r} {err[-2000:]}")

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def run(self, code: str, cwd: Path, timeout: float, name: str) -> Result:
        """Run `code` as __main__ in a forked child with cwd `cwd`; output is stdout+stderr."""
        log = cwd / ".docs_block.log"
        request = dict(code=code, cwd=str(cwd), log=str(log), timeout=timeout, name=name)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout + 60)
        if not line:
            raise RuntimeError(f"docs python server stopped answering while running {name}")
        reply = json.loads(line)
        output = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        return Result(reply["rc"], output, reply["seconds"], reply["timed_out"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serve() -> None:
    """The server loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import builtins
    import traceback

    # Imported once here so that children do not pay for them. No torch op runs in this process
    # (and CUDA is never touched), so forked children start clean.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2Tokenizer  # noqa: F401

    import model.checkpoint  # noqa: F401
    import model.generation  # noqa: F401
    import model.lm  # noqa: F401
    import model.tokenizer  # noqa: F401

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the block, never return into the loop
            code = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.setsid()
                os.chdir(req["cwd"])
                sys.path.insert(0, req["cwd"])
                sys.argv = [req["name"]]
                glb = {"__name__": "__main__", "__builtins__": builtins}
                try:
                    exec(compile(req["code"], req["name"], "exec"), glb)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if exc.code not in (None, 0) and not isinstance(exc.code, int):
                        print(exc.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = t0 + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.killpg(pid, signal.SIGKILL)  # the child leads its own session
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        rc = os.waitstatus_to_exitcode(status)
        out.write(json.dumps(dict(rc=rc, timed_out=timed_out,
                                  seconds=time.perf_counter() - t0)) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        _serve()
    else:
        sys.exit("usage: python tests/docs/docs_runner.py serve  "
                 "(started by tests/docs/test_docs.py)")
