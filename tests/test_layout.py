"""The repository's shape: no import circles between files, no long functions, and no library
module that reads the command line's namespace.

These read the source as text (`ast`), so they run in milliseconds and import nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "corpus", "downstream", "model", "serve", "training")
MAX_FUNCTION_LINES = 120


def _sources(include_tests: bool = False) -> list[Path]:
    """Every tracked-looking .py file of the repo (virtual environments and caches left out)."""
    files = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or "__pycache__" in rel.parts:
            continue
        if not include_tests and (rel.parts[0] == "tests" or rel.name in ("test_lm.py",
                                                                          "conftest.py")):
            continue
        files.append(path)
    return files


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The repo modules `path` imports anywhere in its body (top level, inside functions and
    under TYPE_CHECKING alike: a lazy import still ties the two files together)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            # the longest known module that `name` starts with (a name may be a module's member)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_circles_between_files():
    files = _sources()
    known = {_module_name(f) for f in files}
    # a package's __init__ is imported by everything inside it: leave those edges out, or every
    # package whose __init__ re-exports a member would look circular
    graph = {}
    for f in files:
        name = _module_name(f)
        graph[name] = {m for m in _imported_modules(f, known)
                       if not (m in PACKAGES and name.startswith(m + "."))}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    """The check above can fail: a two-file circle and a three-file one are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({length} lines)")
    return long


def test_no_function_over_120_lines_outside_tests():
    assert [entry for f in _sources() for entry in _long_functions(f)] == []


def test_long_function_finder_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def long():\n{body}\n\n\ndef short():\n    pass\n")
    original = REPO
    try:
        globals()["REPO"] = tmp_path
        assert _long_functions(path) == [f"long.py:long ({MAX_FUNCTION_LINES + 1} lines)"]
    finally:
        globals()["REPO"] = original


def test_library_modules_do_not_read_an_argparse_namespace():
    """Only the command-line layer (parsers, and the one function that turns parsed flags into
    typed values) may name `argparse.Namespace`; every other module takes typed values."""
    allowed = {"common/cli.py", "training/options.py", "training/config.py", "training/train_lm.py"}
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel not in allowed and "Namespace" in path.read_text(encoding="utf-8"):
                offenders.append(rel)
    assert offenders == []


def test_readme_is_short_and_starts_with_install_main_job_and_tests():
    """README.md: at most 250 lines; the install line, the main job (train, then generate) and
    the test command all within its first 80 lines."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first = "\n".join(lines[:80])
    for needed in ("pip install -r requirements.txt",
                   "python training/train_lm.py --preset demo",
                   "python generate_lm.py --checkpoint",
                   "python -m pytest"):
        assert needed in first, f"{needed!r} is not in README.md's first 80 lines"
