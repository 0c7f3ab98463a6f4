"""Docs that run: every python and bash block of README.md, GENERATION_GUIDE.md and docs/*.md is
executed.

One test per block (see tests/docs/docs_runner.py for the rules). In short:

- Shell blocks run with `bash -eo pipefail` and the real scripts, in a scratch directory that
  mirrors the repo and holds the tiny test checkpoint at every checkpoint path the docs use
  (`lm_wikitext/snapshots/latest.pt`, `path/to/checkpoint.pt`, ...). `LM_MAX_STEPS=2` makes
  training commands stop after two optimizer steps. The Hugging Face hub is never contacted.
  Blocks that run the trainer start without trained runs. Shell blocks run in the background
  (a few at once) while the python blocks run, each test waiting for its own block's result.
- Python blocks run in a subprocess (forked from a warm interpreter that has imported torch)
  after a small preamble (`docs_runner.PREAMBLE`) that defines `model`, `tokenizer`,
  `checkpoint`, `checkpoint_path`, `device`, `prompt`, `prompt_ids` and `prompt_tensor` from that
  checkpoint; blocks marked `<!-- docs-test: standalone -->` run without it.
- Blocks marked `<!-- docs-test: skip (reason) -->` (pip installs, multi-GPU torchrun, ...) and,
  on machines without CUDA, `<!-- docs-test: cuda (reason) -->` are syntax-checked only
  (`compile()` / `bash -n`).

At the end the test prints how many blocks ran and how many were only syntax-checked. Further
checks: every `--flag` the docs mention exists in some script, every repo path they name exists,
every relative link (and its #anchor) between the pages resolves, no page shows a machine's
scratch path, every H200 figure they quote is in the recorded run, and the guide keeps every
command, import and flag of the founding guide.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docs_runner as dr  # noqa: E402

REPO = dr.REPO
DOC_FILES = dr.doc_files()  # README.md, GENERATION_GUIDE.md, docs/*.md
SEED = REPO.parent / "shared" / "spec" / "GENERATION_GUIDE.seed.md"
BLOCKS = dr.collect(DOC_FILES)
# pytest-xdist's worker name, when the suite runs on several workers (`-n`): see bash_runs.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
BASH_TIMEOUT = 420.0  # a training command under LM_MAX_STEPS, on a busy 2-core machine
PYTHON_TIMEOUT = 180.0
# Shell blocks running at once, next to the python blocks (one core each; see bash_runs).
BASH_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))

COUNTS = {"ran": 0, "checked": 0, "failed": 0}

# Flags of programs that are not ours, which the docs may use.
EXTERNAL_FLAGS = {
    "--index-url", "--extra-index-url", "--upgrade", "--no-deps", "--editable",  # pip
    "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",  # torchrun
    "--standalone", "--rdzv_backend", "--rdzv_endpoint",
    "--local-dir",  # huggingface-cli download
    "--logdir",  # tensorboard
    "--temp", "--top-k",  # llama-cli
    "--help",  # every argparse program
    "--model", "--model_args",  # lm_eval / small-lm-eval (lm-evaluation-harness's own flags)
}


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_checkpoint(tmp_path_factory, make_tiny_checkpoint) -> Path:
    """The conftest's tiny random-weight model, with the demo preset's context of 128 tokens.

    A context of 128 keeps the docs' real-model settings valid (e.g. `--stride 64`).
    """
    return make_tiny_checkpoint(tmp_path_factory.mktemp("docs-ckpt") / "tiny.pt", max_seq_len=128)


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory) -> Path:
    """Files the docs' commands read, at the paths they name.

    - `my_text.txt`: "your own text" (a slice of the bundled Tiny Shakespeare).
    - `wikitext-2/{train,valid,test}.txt`: small files in WikiText's raw format.
    - `gpt2/`: a Hugging Face GPT-2 folder (tiny, random weights) standing in for the real one.
    """
    root = tmp_path_factory.mktemp("docs-data")
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (root / "my_text.txt").write_text(text[:30_000], encoding="utf-8")
    wiki = root / "wikitext-2"
    wiki.mkdir()
    paragraphs = [p.replace("\n", " ").strip() for p in text.split("\n\n") if p.strip()]
    for split, (lo, hi) in {"train": (0, 300), "valid": (300, 360), "test": (360, 420)}.items():
        parts = []
        for i in range(lo, hi, 20):
            parts.append(f" = Article {i} = \n\n" + "\n\n".join(
                f" {p} " for p in paragraphs[i:i + 20]) + "\n\n")
        (wiki / f"{split}.txt").write_text("".join(parts), encoding="utf-8")

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2,
                                    n_head=2))
    hf.save_pretrained(root / "gpt2")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(REPO / "model" / "assets" / "gpt2" / name, root / "gpt2" / name)
    return root


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory, hf_home) -> dict[str, str]:
    """The environment of every block: offline HF cache, LM_MAX_STEPS, our python on PATH."""
    bin_dir = dr.tool_dir(tmp_path_factory.mktemp("docs-bin"))
    env = dict(os.environ)
    env.update(dr.BLOCK_ENV)
    env["HF_HOME"] = str(hf_home)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # scripts must find the repo's packages on their own
    return env


@pytest.fixture(scope="module")
def python_server(docs_env):
    """The warm interpreter that runs python blocks (in forks); closed after the module."""
    env = dict(docs_env)
    env["PYTHONPATH"] = str(REPO)  # as `pip install -e .` would give a notebook
    server = dr.PythonServer(env)
    yield server
    server.close()


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Print the counts after the last block, past pytest's output capture."""
    yield
    line = (f"docs blocks: {COUNTS['ran']} ran, {COUNTS['checked']} syntax-checked only, "
            f"{COUNTS['failed']} failed (of {len(BLOCKS)} in {', '.join(DOC_FILES)})")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n{line}")


# -- one test per block ---------------------------------------------------------------------------


def _describe_failure(block: dr.Block, result: dr.Result) -> str:
    what = "timed out" if result.timed_out else f"exited with {result.returncode}"
    return (f"{block.id} {what} after {result.seconds:.1f} s\n--- block ---\n{block.code}"
            f"--- output (last 4000 characters) ---\n{result.output[-4000:]}")


def _fingerprint(checkpoint: Path, data: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of the files that scratch directories share through hard links."""
    files = [checkpoint, *(f for f in data.rglob("*") if f.is_file())]
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def shared_inputs(docs_checkpoint, docs_data) -> dict[str, tuple[int, int]]:
    return _fingerprint(docs_checkpoint, docs_data)


def _runs_here(block: dr.Block) -> bool:
    return block.directive != "skip" and (block.directive != "cuda" or _cuda())


def _key(block: dr.Block) -> tuple[str, str | None, str]:
    """Blocks with the same key are the same run (e.g. the quick start in both documents)."""
    return (block.lang, block.directive, block.code)


@pytest.fixture(scope="module")
def bash_runs(request, docs_checkpoint, docs_data, docs_env, tmp_path_factory):
    """`bash_runs(block)`: the result of a shell block, each distinct block run once.

    Most of the docs test's time is spent in single-threaded processes (interpreter start-up,
    tiny models), so a 2-core machine runs two at once at almost no cost to each. In one pytest
    process, every shell block selected in the session starts in the background at once (a few at
    a time) while the python blocks run, and each test waits for its block's result. Under
    pytest-xdist the workers are that parallelism: each block runs when its test does, on the
    worker the test went to (identical blocks share an xdist group, so they go to one worker).
    """
    def run(block: dr.Block) -> dr.Result:
        work = tmp_path_factory.mktemp("docs-bash")
        checkpoint = None if dr.trains(block) else docs_checkpoint
        dr.make_workdir(work / "work", checkpoint, docs_data)
        return dr.run_bash(block, work / "work", docs_env, BASH_TIMEOUT)

    pool = ThreadPoolExecutor(max_workers=1 if XDIST_WORKER else BASH_WORKERS,
                              thread_name_prefix="docs-bash")
    futures: dict[tuple, Future] = {}
    if not XDIST_WORKER:
        for item in request.session.items:
            block = getattr(getattr(item, "callspec", None), "params", {}).get("block")
            if isinstance(block, dr.Block) and block.lang == "bash" and _runs_here(block):
                futures.setdefault(_key(block), pool.submit(run, block))

    def result(block: dr.Block) -> dr.Result:
        if _key(block) not in futures:
            futures[_key(block)] = pool.submit(run, block)
        return futures[_key(block)].result()

    try:
        yield result
    finally:
        for future in futures.values():
            future.cancel()
        dr.stop_all()
        pool.shutdown(wait=True)


# Python blocks already run, by key (an identical block is not run twice).
_DONE: dict[tuple[str, str | None, str], str] = {}


def _param(block: dr.Block):
    group = hashlib.sha1(repr(_key(block)).encode()).hexdigest()[:12]
    return pytest.param(block, id=block.id, marks=pytest.mark.xdist_group(f"docs-{group}"))


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_block(block: dr.Block, docs_checkpoint, docs_data, python_server, bash_runs, tmp_path,
               shared_inputs):
    error = dr.syntax_error(block)
    if error is not None:
        COUNTS["failed"] += 1
        pytest.fail(f"{block.id}: does not parse: {error}")
    if not _runs_here(block):
        COUNTS["checked"] += 1
        return
    if block.lang == "bash":
        result = bash_runs(block)
    elif _key(block) in _DONE:
        COUNTS["ran"] += 1
        return  # passed already, as _DONE[key]
    else:
        work = dr.make_workdir(tmp_path / "work", docs_checkpoint, docs_data)
        code = block.code if block.directive == "standalone" else dr.PREAMBLE + block.code
        result = python_server.run(code, work, PYTHON_TIMEOUT, block.id)
    if result.returncode != 0 or result.timed_out:
        COUNTS["failed"] += 1
        pytest.fail(_describe_failure(block, result), pytrace=False)
    # Scratch directories hard-link the shared inputs: a block that wrote into one in place
    # would change what every later block sees.
    assert _fingerprint(docs_checkpoint, docs_data) == shared_inputs, \
        f"a block modified a shared input file in place (noticed after {block.id})"
    COUNTS["ran"] += 1
    _DONE[_key(block)] = block.id


# -- the docs' other claims -----------------------------------------------------------------------


def _doc_text() -> str:
    return "\n".join((REPO / f).read_text(encoding="utf-8") for f in DOC_FILES)


def _our_flags() -> set[str]:
    """Every option string written in the repo's Python sources ("--flag" literals)."""
    flags: set[str] = set()
    for src in REPO.rglob("*.py"):
        rel = src.relative_to(REPO).parts
        if rel[0].startswith(".") or rel[0] == "tests" or rel[0].startswith("lm_"):
            continue
        flags |= set(re.findall(r"""["'](--[a-z][a-z0-9_-]*)["']""", src.read_text("utf-8")))
    return flags


def test_documented_flags_exist():
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", _doc_text()))
    unknown = sorted(mentioned - _our_flags() - EXTERNAL_FLAGS)
    assert not unknown, f"the docs mention flags no script defines: {unknown}"


def test_documented_files_exist():
    """Every repo file or folder the docs name in backticks (`model/lm.py`, `data/`) exists."""
    text = _doc_text()
    paths = set(re.findall(r"`([\w./-]+\.(?:py|md|toml))`", text))
    paths |= set(re.findall(r"`((?:model|training|corpus|common|serve|bench|tests|data|"
                            r"docs|\.ci)/[\w./-]*)`", text))
    paths |= set(re.findall(r"(?:python|torchrun \S+) ([\w./-]+\.py)", text))
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"the docs name files that are not in the repo: {missing}"


def test_parse_blocks_rules():
    """The collector sees directives, refuses malformed ones and ignores non-code fences."""
    md = ("intro\n```python\nx = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n\n```bash\n"
          "nvidia-smi\n```\n```text\nnot code\n```\n<!-- docs-test: standalone -->\n```python\n"
          "import os\n```\n")
    blocks = dr.parse_blocks(md, "x.md")
    assert [(b.line, b.lang, b.directive, b.reason) for b in blocks] == [
        (2, "python", None, ""), (7, "bash", "skip", "needs a GPU"),
        (14, "python", "standalone", "")]
    for bad in ("<!-- docs-test: skip -->\n```bash\nls\n```\n",  # no reason
                "<!-- docs-test: sometimes (x) -->\n```bash\nls\n```\n",  # unknown directive
                "<!-- docs-test: skip (x) -->\ntext\n```bash\nls\n```\n",  # not before a fence
                "```python\nx = 1\n"):  # unclosed
        with pytest.raises(dr.DocsError):
            dr.parse_blocks(bad, "bad.md")
    assert dr.syntax_error(dr.Block("x", 1, "bash", "if then fi\n")) is not None
    assert dr.syntax_error(dr.Block("x", 1, "python", "def f(:\n")) is not None


def test_docs_have_enough_running_blocks():
    """Guard against a docs edit that silently turns the test into a no-op."""
    for name in DOC_FILES:
        runnable = [b for b in BLOCKS if b.file == name and b.directive != "skip"]
        least = 5 if name in ("README.md", "GENERATION_GUIDE.md") else 1
        assert len(runnable) >= least, f"{name}: only {len(runnable)} blocks would run"
    assert any("train_lm.py" in b.code and b.directive is None for b in BLOCKS), \
        "no training command runs"


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    fenced = False
    for line in text.splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            title = re.sub(r"[^\w\- ]", "", m.group(1).lower().replace("`", ""))
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_links_between_pages_resolve():
    """Every relative Markdown link of the pages names an existing file, and its #anchor (if
    any) a heading of that page."""
    bad = []
    for name in DOC_FILES:
        page = REPO / name
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and \
                    anchor not in _anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{name}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_no_machine_paths():
    """The pages show no scratch paths of the machine a run was made on."""
    found = [f"{name}:{i}: {line.strip()[:120]}" for name in DOC_FILES
             for i, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"(?<![\w.])/(?:tmp|work|root|home)/", line)]
    assert not found, "machine paths in the docs:\n" + "\n".join(found)


# The founding guide's blocks that GENERATION_GUIDE.md shows corrected rather than verbatim,
# keyed by a line that identifies them, with the reason.
SEED_CORRECTIONS = {
    'checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)':
        "weights_only=True: never unpickle code from a checkpoint",
    "# Pad to same length (required for batching)":
        "padding is no longer required; the explanation of right padding was wrong",
    "# Use CPU if GPU transfer overhead is high for short sequences":
        "unmeasured speed advice replaced by measured facts",
    "# Clear CUDA cache if needed": "`model.generate(...)` replaced by real arguments",
    "# Truncate prompt if too long": "keep the last tokens of a long prompt, not the first",
    "lm_wikitext/snapshots/snapshot_epoch_0000_step_070999_20260212_095134.pt":
        "a file name, shown as text rather than as a shell command",
}


@pytest.mark.skipif(not SEED.exists(), reason="the founding guide (../shared/spec) is not here")
def test_guide_keeps_the_founding_guide():
    seed_blocks = dr.parse_blocks(SEED.read_text(encoding="utf-8"), "seed")
    guide = (REPO / "GENERATION_GUIDE.md").read_text(encoding="utf-8")
    ours = {b.code for b in BLOCKS if b.file == "GENERATION_GUIDE.md"}
    for block in seed_blocks:
        imports = [ln.strip() for ln in block.code.splitlines()
                   if ln.strip().startswith(("import ", "from "))]
        for imp in imports:
            assert imp in guide, f"seed import dropped from the guide: {imp}"
        if block.code in ours:
            continue
        keys = [k for k in SEED_CORRECTIONS if k in block.code]
        assert keys, f"seed block at line {block.line} is neither kept verbatim nor a listed " \
                     f"correction:\n{block.code}"
    seed_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)", SEED.read_text("utf-8")))
    missing = sorted(f for f in seed_flags if f not in guide)
    assert not missing, f"seed flags the guide no longer mentions: {missing}"


def test_gpu_figures_come_from_the_recorded_run():
    """Every number the docs quote beside the H200 appears in a recorded benchmark output (the
    H200 run, or the 2-core CPU run that the same sentence compares it with). Table rows and
    sentences are checked one by one."""
    results = "\n".join((REPO / "bench" / "results" / name).read_text(encoding="utf-8")
                        for name in ("cuda_h200.txt", "cpu_2core.txt"))
    quoted = []
    for name in DOC_FILES:
        text = (REPO / name).read_text(encoding="utf-8")
        for part in re.split(r"\n\s*\n", text):
            if part.lstrip().startswith("|"):
                quoted += [ln for ln in part.splitlines() if "H200" in ln]
            else:  # prose: sentence by sentence (arithmetic on a figure may follow it)
                quoted += [t for t in re.split(r"(?<=[.;])\s+(?=[A-Z0-9(`])", part)
                           if "H200" in t]
    assert quoted, "no H200 figures found in the docs"
    for text in quoted:
        for number in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?%?", text):
            assert number.rstrip("%") in results, \
                f"{number!r} is not in bench/results/ (in: {text.strip()[:200]})"
