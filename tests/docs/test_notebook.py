"""notebooks/quickstart.ipynb runs top to bottom on a fresh kernel of this interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # A kernelspec of our own, so the kernel is this interpreter (this venv), whatever other
    # kernels the machine has.
    spec = tmp_path / "jupyter" / "kernels" / "small-lm-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "small-lm test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plot
    for name, value in (("QUICKSTART_RUN", str(tmp_path / "run")), ("OMP_NUM_THREADS", "1"),
                        ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys, model\n"
                                              "print(sys.executable, model.__file__)"))
    client = nbclient.NotebookClient(nb, kernel_name="small-lm-test", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    def outputs(i: int, kind: str) -> str:
        out = []
        for o in nb.cells[i].outputs:
            if kind == "text" and o.output_type == "stream":
                out.append(o.text)
            elif kind in o.get("data", {}):
                out.append(o.data[kind])
        return "".join(out)

    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    exe, where = outputs(code[-1], "text").split()
    assert exe == sys.executable and Path(where).is_relative_to(REPO)  # this venv, this checkout
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert "done: step 30" in outputs(code[1], "text")
    assert outputs(code[5], "image/png")  # the loss curve
    html = outputs(code[6], "text/html")  # the scored text's view
    assert 'class="lm-tok"' in html and "title=" in html
    assert "perplexity" in outputs(code[6], "text")
    assert "rank" in outputs(code[7], "text") and 'class="lm-tok"' in outputs(code[7],
                                                                              "text/html")
