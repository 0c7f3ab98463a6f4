"""Pinned task folders: the `manifest.json` that `evaluate_lm.py --save_tasks` writes beside the
tasks' YAML and data, and its check before scoring.

A pinned folder holds, per task, its YAML (the harness's format, `dataset_path: parquet`) and
its data files, and `manifest.json` the sha256 of every data file (and of any Python file a
task's YAML calls with `!function`). Before tasks from such a folder are scored, `verify` hashes
the files again; any difference stops the run. `use_folder_files` then makes the harness read
the data from where the folder is now (its YAML name it by the absolute path it was saved at),
so a folder copied to another machine scores the files that were just checked.

No harness import at module level: the checks run before it is needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "small-lm pinned tasks 1"


class PinError(ValueError):
    """A pinned folder does not match its manifest; the message is one line."""


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none (a plain task folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PinError(f"task folder {folder}: {MANIFEST} cannot be read ({exc}); save the "
                       "tasks again with --save_tasks") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PinError(f"task folder {folder}: {MANIFEST} is not a manifest of --save_tasks "
                       f"(format {FORMAT!r}); save the tasks again with --save_tasks")
    return manifest


def _files(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(relative path, sha256) of a task's data and code files."""
    pairs = [(d["file"], d["sha256"]) for d in entry.get("data", {}).values()]
    return pairs + sorted(entry.get("code", {}).items())


def verify(folder: str | Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Hash every file the manifest names; raise PinError (one line) at the first that is
    missing or differs.

    Returns:
        Per task: {"data": {split: {"file", "sha256", "rows"}}, "code": {file: sha256}}, the
        record that a run's results keep.
    """
    root = Path(folder)
    for task, entry in sorted(manifest.get("tasks", {}).items()):
        for rel, expected in _files(entry):
            path = root / rel
            if not path.is_file():
                raise PinError(f"task folder {folder}: {rel} of task {task} is missing; "
                               f"restore it, or save the task again with --save_tasks")
            if sha256_file(path) != expected:
                raise PinError(f"task folder {folder}: {rel} of task {task} does not match "
                               f"its sha256 in {MANIFEST} (the data changed since it was "
                               "saved); restore the file, or save the task again with "
                               "--save_tasks")
    return {task: {"data": entry.get("data", {}), "code": entry.get("code", {})}
            for task, entry in manifest.get("tasks", {}).items()}


def use_folder_files(manager: Any, folder: str | Path, manifest: dict[str, Any]) -> None:
    """Make the harness's TaskManager read each pinned task's data from `folder` as it is now.

    The saved YAML name their data by absolute path (the harness reads a relative path from
    the current directory); here each pinned task's entry in the manager's index gets its
    config with `data_files` pointing into `folder`, so a moved or copied folder still works
    and the files read are the ones `verify` hashed.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(folder).resolve()
    index = manager.task_index
    for task, entry in manifest.get("tasks", {}).items():
        item = index.get(task)
        yaml_path = root / entry["yaml"]
        if item is None or item.yaml_path is None or \
                Path(item.yaml_path).resolve() != yaml_path:
            continue  # a task of the same name from elsewhere is not the pinned one
        cfg = load_yaml(yaml_path, resolve_func=True)
        cfg["dataset_kwargs"] = {"data_files": {
            split: str(root / d["file"]) for split, d in entry.get("data", {}).items()}}
        item.cfg, item.yaml_path = cfg, None
