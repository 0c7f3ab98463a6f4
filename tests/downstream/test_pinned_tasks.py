"""Pinned task folders (evaluate_lm.py --tasks A,B --save_tasks DIR, downstream/save.py and
downstream/manifest.py), and the bad inputs of downstream tasks that the backend's own tests do
not cover: a hub task whose data is missing offline, `python -m downstream`.

Tasks are written here in the harness's format from local JSONL: a task whose data is local
counts as downloaded, and goes through the same save path as a hub task.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import evaluate_lm  # noqa: E402
from downstream.manifest import MANIFEST, sha256_file  # noqa: E402
from downstream.tasks import TaskError, TaskRunner  # noqa: E402
from model.lm import LanguageModel  # noqa: E402

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang".split()
REPO = Path(evaluate_lm.__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


def _words(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A tiny checkpoint and a task folder: a multiple-choice task whose YAML calls a Python
    function of the folder (process_docs), with a train split for one-shot prompts, and a
    generation task with a filter, both under a tag."""
    root = tmp_path_factory.mktemp("pin")
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=50257, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                          max_seq_len=64, dropout=0.0)
    ckpt = root / "tiny.pt"
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": "gpt2"}, ckpt)
    tasks = root / "src"
    tasks.mkdir()
    rnd = random.Random(0)
    for split, n in (("train", 4), ("test", 10)):
        _jsonl(tasks / f"mc_{split}.jsonl", [
            {"q": _words(rnd, 3, 12), "choices": [_words(rnd, 1, 4) for _ in range(3)],
             "label": i % 3} for i in range(n)])
    (tasks / "helpers.py").write_text(
        "def prep(dataset):\n    return dataset.map(lambda d: {'query': 'Q: ' + d['q']})\n")
    (tasks / "mc.yaml").write_text(
        f"task: p_mc\ntag: [p_all]\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {tasks / 'mc_train.jsonl'}\n    test: {tasks / 'mc_test.jsonl'}\n"
        "training_split: train\ntest_split: test\nnum_fewshot: 1\n"
        "process_docs: !function helpers.prep\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 2.0\n")
    _jsonl(tasks / "gen.jsonl", [{"p": _words(rnd, 3, 10), "a": rnd.choice(WORDS)}
                                 for _ in range(6)])
    (tasks / "gen.yaml").write_text(
        f"task: p_gen\ntag: [p_all]\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{p}}"\ndoc_to_target: "{{a}}"\ngeneration_kwargs:\n'
        '  until: ["."]\n  max_gen_toks: 4\n  do_sample: false\n'
        "filter_list:\n  - name: first\n    filter:\n      - function: regex\n"
        '        regex_pattern: "(\\\\w+)"\n      - function: take_first\n'
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "group.yaml").write_text(
        "group: p_group\ntask: [p_gen]\naggregate_metric_list:\n  - metric: exact_match\n"
        "    filter_list: first\n")
    return {"root": root, "ckpt": ckpt, "tasks": tasks}


def _score(source: dict, folder: Path, out: Path, names: str = "p_all") -> tuple[int, dict]:
    code = evaluate_lm.main(["--checkpoint", str(source["ckpt"]), "--tasks", names,
                             "--include_path", str(folder), "--output_path", str(out),
                             "--log_samples"])
    return code, (json.loads(out.read_text()) if out.exists() else {})


def _responses(results: dict) -> dict:
    return {t: [(s["doc_id"], s["arguments"], s["resps"], s["filtered_resps"]) for s in samples]
            for t, samples in results["samples"].items()}


def _save(source: dict, out: Path, capsys) -> dict:
    code = evaluate_lm.main(["--tasks", "p_all", "--include_path", str(source["tasks"]),
                             "--save_tasks", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "saved 2 task(s)" in captured.out
    return json.loads((out / MANIFEST).read_text())


def test_a_saved_folder_scores_what_the_original_scores_and_says_so(source, tmp_path, capsys):
    import yaml

    code, original = _score(source, source["tasks"], tmp_path / "original.json")
    assert code == 0
    saved = tmp_path / "saved"
    manifest = _save(source, saved, capsys)
    assert set(manifest["tasks"]) == {"p_mc", "p_gen"} and manifest["asked"] == ["p_all"]
    mc = manifest["tasks"]["p_mc"]
    assert {s: d["rows"] for s, d in mc["data"].items()} == {"train": 4, "test": 10}
    assert list(mc["code"]) == ["p_mc/helpers.py"] and mc["version"] == 2.0
    for entry in manifest["tasks"].values():
        for d in entry["data"].values():
            assert sha256_file(saved / d["file"]) == d["sha256"]
    text = (saved / "p_mc" / "p_mc.yaml").read_text()
    assert "process_docs: !function 'helpers.prep'" in text and "dataset_path: parquet" in text
    cfg = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
    assert cfg["task"] == "p_mc" and cfg["tag"] == ["p_all"] and cfg["num_fewshot"] == 1

    # moved elsewhere, the original gone: the saved folder alone gives the same results
    moved = tmp_path / "elsewhere" / "pinned"
    shutil.move(str(saved), moved)
    shutil.move(str(source["tasks"]), tmp_path / "gone")
    try:
        code, pinned = _score(source, moved, tmp_path / "pinned.json")
    finally:
        shutil.move(str(tmp_path / "gone"), source["tasks"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"task folder {moved}: 4 file(s) match the sha256" in err  # 3 data, 1 code
    assert _responses(pinned) == _responses(original)
    for task in ("p_mc", "p_gen"):
        assert pinned["results"][task] == original["results"][task]
    assert pinned["versions"] == original["versions"]
    record = pinned["small_lm"]["pinned_tasks"]
    assert record["folder"] == str(moved)
    assert record["tasks"]["p_mc"]["data"]["test"]["sha256"] == mc["data"]["test"]["sha256"]
    assert "pinned_tasks" not in original["small_lm"]


def test_a_saved_group_keeps_its_aggregate(source, tmp_path, capsys):
    code, original = _score(source, source["tasks"], tmp_path / "original.json", "p_group")
    assert code == 0
    code = evaluate_lm.main(["--tasks", "p_group", "--include_path", str(source["tasks"]),
                             "--save_tasks", str(tmp_path / "saved")])
    assert code == 0
    assert '"\\n\\n"' in (tmp_path / "saved" / "p_gen" / "p_gen.yaml").read_text()
    code, pinned = _score(source, tmp_path / "saved", tmp_path / "pinned.json", "p_group")
    assert code == 0
    assert pinned["groups"]["p_group"] == original["groups"]["p_group"]
    assert "exact_match,first" in pinned["groups"]["p_group"]
    assert _responses(pinned) == _responses(original)


@pytest.fixture
def saved(source, tmp_path, capsys) -> Path:
    out = tmp_path / "saved"
    _save(source, out, capsys)
    return out


@pytest.mark.parametrize("what", ["data", "code", "missing"])
def test_a_folder_whose_files_changed_is_refused_in_one_line(source, saved, tmp_path, capsys,
                                                             what):
    target = saved / {"data": "p_gen/test.parquet", "code": "p_mc/helpers.py",
                      "missing": "p_mc/train.parquet"}[what]
    if what == "missing":
        target.unlink()
    else:
        with open(target, "ab") as f:
            f.write(b"\n")
    code, _ = _score(source, saved, tmp_path / "out.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    rel = target.relative_to(saved).as_posix()
    assert err[0].startswith(f"evaluate_lm.py: error: task folder {saved}: {rel} of task ")
    assert ("is missing" if what == "missing" else "does not match its sha256") in err[0]
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(TaskError, match="does not match|is missing"):  # training's path too
        TaskRunner(["p_mc"], limit=2, include_path=saved)


@pytest.mark.parametrize("argv, message", [
    (["--save_tasks", "{out}"], "--save_tasks DIR saves the tasks named by --tasks"),
    (["--tasks", "p_mc", "--save_tasks", "{out}", "--checkpoint", "x.pt"],
     "scores nothing; drop --checkpoint"),
    (["--tasks", "p_mc", "--save_tasks", "{out}", "--limit", "3"], "drop --limit"),
    (["--tasks", "p_mc"], "--checkpoint PATH is required"),
    (["--tasks", "p_mc", "--save_tasks", "{full}"], "already exists and is not an empty folder"),
    (["--tasks", "no_such", "--save_tasks", "{out}"], "unknown task 'no_such'"),
])
def test_bad_save_requests_are_one_line_exit_2(source, tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    argv = [a.format(out=tmp_path / "out", full=tmp_path / "full") for a in argv]
    assert evaluate_lm.main([*argv, "--include_path", str(source["tasks"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("save", [False, True])
def test_a_hub_task_missing_offline_says_what_to_do(source, tmp_path, capsys, monkeypatch, save):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "h.yaml").write_text(
        "task: hub_mc\ndataset_path: nobody/not_in_any_cache\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\n'
        "doc_to_target: 0\n")
    argv = ["--tasks", "hub_mc", "--include_path", str(folder)]
    argv += ["--save_tasks", str(tmp_path / "out")] if save else ["--checkpoint",
                                                                  str(source["ckpt"])]
    assert evaluate_lm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("evaluate_lm.py: error: task hub_mc: its data could not be loaded")
    assert "--save_tasks DIR" in err[0] and "HF_DATASETS_OFFLINE=1" in err[0]
    assert not (tmp_path / "out").exists()


def test_python_m_downstream_is_the_harness_command_line_with_small_lm(source):
    """`python -m downstream` (and the `small-lm-eval` script) run the harness's own command
    line; the entry point declared for harness versions that discover models by entry point
    names the backend class."""
    from importlib.metadata import EntryPoint

    from downstream.harness import SmallLM

    tomllib = pytest.importorskip("tomllib")
    target = tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"]["entry-points"]["lm_eval.models"]["small-lm"]
    assert EntryPoint(name="small-lm", value=target, group="lm_eval.models").load() is SmallLM
    run = subprocess.run([sys.executable, "-m", "downstream", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--model" in run.stdout and "--model_args" in run.stdout
