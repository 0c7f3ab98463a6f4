"""train_lm.py --eval_tasks: downstream tasks (lm-evaluation-harness, a local task folder) at
each evaluation, in every logger and in the snapshots; a resumed run keeps them; a context too
short for the tasks' prompts is refused before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_flags

pytest.importorskip("lm_eval")

from training import train_lm  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """A multiple-choice task with 6 short questions, in the harness's format."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"q": f"the king {'and the queen ' * (i % 3)}said", "choices": ["yes", "no", "well"],
             "label": i % 3} for i in range(6)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_scores_in_every_logger_and_snapshot_and_kept_on_resume(tmp_path, task_folder, capsys,
                                                                monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = tiny_flags(tmp_path, "--max_steps", "4", "--eval_interval", "2", "--eval_tasks",
                       "tiny_mc", "--eval_tasks_limit", "4", "--eval_tasks_path",
                       str(task_folder), "--log_to", "csv,tensorboard,wandb")
    assert train_lm.main(flags) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    shown = re.findall(r"step (\d+) \| val loss .*\| tiny_mc/acc ([\d.]+)", out)
    assert [s for s, _ in shown] == ["2", "4"], out
    assert "Tokenizing inputs" not in out  # the harness is quiet during training
    run = tmp_path / "run"
    val = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "val"]
    accs = [float(r["tiny_mc/acc"]) for r in val]
    assert len(accs) == 2 and all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in accs)
    assert [float(a) for _, a in shown] == pytest.approx(accs, abs=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("tasks/tiny_mc/acc")] == pytest.approx(accs)
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"tasks/tiny_mc/acc" in record.read_bytes()

    best = torch.load(run / "snapshots" / "best.pt", weights_only=True)
    assert best["eval_tasks"] == {"tiny_mc/acc": accs[best["val_step"] // 2 - 1]}

    # resumed without the flags: the snapshot's flags bring the tasks back
    assert train_lm.main(["--resume", "auto", "--out_dir", str(run), "--max_steps", "6",
                          "--no_plot"]) == 0
    val = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "val"]
    assert [r["step"] for r in val] == ["2", "4", "6"] and val[-1]["tiny_mc/acc"] != ""
    latest = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    assert latest["args"]["eval_tasks"] == "tiny_mc" and "tiny_mc/acc" in latest["eval_tasks"]


def test_training_is_the_same_with_and_without_tasks(tmp_path, task_folder):
    """The harness seeds the global generators; the runner puts them back, so dropout masks
    and data order after an evaluation are the same as without tasks."""
    losses = []
    for name, extra in (("plain", ()), ("tasks", ("--eval_tasks", "tiny_mc", "--eval_tasks_path",
                                                  str(task_folder), "--eval_tasks_limit", "2"))):
        flags = tiny_flags(tmp_path / name, "--max_steps", "4", "--eval_interval", "2",
                           "--log_interval", "1", "--dropout", "0.1", *extra)  # (last wins)
        assert train_lm.main(flags) == 0
        losses.append([r["loss"] for r in read_metrics(tmp_path / name / "run" / "metrics.csv")
                       if r["kind"] == "train"])
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("case, message", [
    ("short", r"--eval_tasks: [1-5] of 6 examples of tiny_mc do not fit the model's context of 8 "
              r"tokens"),
    ("path_alone", r"--eval_tasks_path is a folder of tasks for --eval_tasks"),
    ("unknown", r"--eval_tasks: unknown task 'no_such_task'"),
    ("malformed", r"--eval_tasks: task folder .*bad\.yaml is not a valid task file at line 2"),
])
def test_bad_task_settings_are_one_line_exit_2(tmp_path, task_folder, capsys, case, message):
    folder = task_folder
    if case == "malformed":
        folder = tmp_path / "bad_tasks"
        folder.mkdir()
        (folder / "bad.yaml").write_text("task: tiny_mc\n  x: [1\n")
    extra = {"short": ("--eval_tasks", "tiny_mc", "--max_seq_len", "8"),
             "path_alone": (), "unknown": ("--eval_tasks", "no_such_task"),
             "malformed": ("--eval_tasks", "tiny_mc")}[case]
    flags = tiny_flags(tmp_path, "--max_steps", "2", "--eval_tasks_path", str(folder),
                       *extra)
    assert train_lm.main(flags) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run" / "snapshots").exists() or not list(
        (tmp_path / "run" / "snapshots").glob("*.pt"))
