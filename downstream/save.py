"""Saving tasks to a pinned folder (`evaluate_lm.py --tasks A,B --save_tasks DIR`).

    from downstream.save import save_tasks
    manifest = save_tasks(["hellaswag", "arc_easy"], "pinned_tasks/")

Each task is loaded as the harness loads it (its data from the Hugging Face hub or the datasets
cache, or from local files for a task folder's task), then written in the harness's own format:
`DIR/<task>/<task>.yaml` with the task's resolved config (the same splits, prompt templates,
`process_docs`, metrics, filters, generation settings and version; the task name kept, so
results carry the harness's names) reading `DIR/<task>/<split>.parquet`, the raw rows the
harness downloaded. Functions a task calls (`!function`) are named by module when the harness
ships them; a Python file beside a local task's YAML is copied. Groups get a group YAML listing
their tasks; the tags named are kept. `DIR/manifest.json` holds the sha256 of every data and
code file, checked by every later run (`downstream.manifest`).
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from downstream.manifest import FORMAT, MANIFEST, sha256_file
from downstream.tasks import TaskError, load_tasks

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# Config fields that name the data; replaced by the local files.
_DATA_FIELDS = ("custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs")


class _Function(str):
    """A `!function module.name` reference in a task YAML."""


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
    Dumper.add_representer(tuple, lambda d, v: d.represent_list(list(v)))
    # "\n\n" (the usual few-shot delimiter) as one escaped line, not as blank lines
    Dumper.add_representer(str, lambda d, v: d.represent_scalar(
        "tag:yaml.org,2002:str", v, style='"' if "\n" in v else None))
    return Dumper


def _folder_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


class _Writer:
    """Writes one task's YAML and data into `tmp/<task>/`, naming the data by its final
    absolute path under `final`, and records the files' hashes."""

    def __init__(self, tmp: Path, final: Path) -> None:
        self.tmp, self.final = tmp, final

    def function(self, fn: Any, task: str, sub: str, code: dict[str, str]) -> _Function:
        """`fn` as a `!function` reference: by module when importable by name (the harness's
        own task code), else its file copied beside the task's YAML."""
        module, qual = getattr(fn, "__module__", None) or "", getattr(fn, "__qualname__", "")
        if not qual or "<" in qual or "." in qual:
            raise TaskError(f"task {task}: its config holds {fn!r}, which is not a module-level "
                            "function; such a task cannot be saved")
        if _DOTTED.fullmatch(module) and module in sys.modules:
            return _Function(f"{module}.{qual}")
        source = Path(module + ".py")  # the harness names a task folder's module by its path
        if not source.is_file():
            raise TaskError(f"task {task}: cannot find the file of function {qual} ({module}); "
                            "such a task cannot be saved")
        target = self.tmp / sub / source.name
        if not target.exists():
            shutil.copyfile(source, target)
            code[f"{sub}/{source.name}"] = sha256_file(target)
        return _Function(f"{source.stem}.{qual}")

    def plain(self, value: Any, task: str, sub: str, code: dict[str, str]) -> Any:
        """A config value as YAML can hold it, functions as `!function` references."""
        if callable(value) and not isinstance(value, type):
            return self.function(value, task, sub, code)
        if isinstance(value, dict):
            return {k: self.plain(v, task, sub, code) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.plain(v, task, sub, code) for v in value]
        return value

    def task(self, task: Any, tags: list[str]) -> dict[str, Any]:
        """Write one harness task; returns its manifest entry."""
        from lm_eval.api.task import ConfigurableTask

        name = task.task_name
        if not isinstance(task, ConfigurableTask) or task.dataset is None:
            raise TaskError(f"task {name}: a Python task class, not a YAML task; only YAML "
                            "tasks can be saved")
        sub = _folder_name(name)
        (self.tmp / sub).mkdir()
        cfg = task.config
        splits = [cfg.training_split, cfg.validation_split, cfg.test_split, cfg.fewshot_split,
                  getattr(task.fewshot_cfg, "split", None)]
        data: dict[str, Any] = {}
        for split in dict.fromkeys(s for s in splits if s is not None):
            rows = task.dataset[split]
            rel = f"{sub}/{_folder_name(split)}.parquet"
            rows.to_parquet(str(self.tmp / rel))
            data[split] = {"file": rel, "sha256": sha256_file(self.tmp / rel),
                           "rows": len(rows)}
        code: dict[str, str] = {}
        out = self.plain(_task_config(task), name, sub, code)
        out.update(dataset_path="parquet", dataset_kwargs={"data_files": {
            split: str(self.final / d["file"]) for split, d in data.items()}})
        if tags:
            out["tag"] = tags
        _write_yaml(self.tmp / sub / f"{sub}.yaml", out)
        meta = cfg.metadata or {}
        return {"yaml": f"{sub}/{sub}.yaml", "version": meta.get("version"),
                "source": {k: _jsonable(getattr(cfg, k)) for k in _DATA_FIELDS
                           if getattr(cfg, k) is not None and k != "custom_dataset"},
                "data": data, "code": code}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.dump(cfg, Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True,
                              width=1000), encoding="utf-8")


def _task_config(task: Any) -> dict[str, Any]:
    """The task's resolved config as a YAML dict: every field set, the data fields left out,
    the few-shot settings only where they differ from what they inherit."""
    from lm_eval.config.task import FewshotConfig

    cfg = task.config
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or f.name in _DATA_FIELDS or f.name in ("tag", "fewshot_config"):
            continue
        out[f.name] = value
    meta = {k: v for k, v in (cfg.metadata or {}).items() if k != "config_source"}
    if meta:
        out["metadata"] = meta
    else:
        out.pop("metadata", None)
    shot = cfg.fewshot_config
    if isinstance(shot, FewshotConfig):
        inherited = FewshotConfig.from_dict(
            {}, fewshot_split=cfg.fewshot_split, process_docs=cfg.process_docs,
            fewshot_delimiter=cfg.fewshot_delimiter, target_delimiter=cfg.target_delimiter,
            gen_prefix=cfg.gen_prefix, doc_to_text=cfg.doc_to_text,
            doc_to_choice=cfg.doc_to_choice, doc_to_target=cfg.doc_to_target)
        own = {f.name: getattr(shot, f.name) for f in fields(shot)
               if getattr(shot, f.name) is not getattr(inherited, f.name)
               and getattr(shot, f.name) != getattr(inherited, f.name)}
        if own:
            out["fewshot_config"] = own
    return out


def _group_yaml(group: Any) -> dict[str, Any]:
    from dataclasses import asdict

    out: dict[str, Any] = {"group": group.name, "task": list(group.child_names)}
    if group.alias and group.alias != group.name:
        out["group_alias"] = group.alias
    if group.aggregate_metric_list:
        out["aggregate_metric_list"] = [asdict(a) for a in group.aggregate_metric_list]
    meta = {k: v for k, v in (group.metadata or {}).items() if k != "config_source"}
    if meta:
        out["metadata"] = meta
    return out


def save_tasks(names: list[str], out_dir: str | Path,
               include_path: str | Path | None = None) -> dict[str, Any]:
    """Load the named tasks, groups or tags and write them as a pinned folder.

    Args:
        names: harness (or task folder) task, group or tag names.
        out_dir: the folder to create; it must not exist, or be empty. Nothing is left there if
            saving fails (it is written beside it, then renamed).
        include_path: a task folder to load the tasks from, as for scoring.

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        TaskError: as `load_tasks`, a task that cannot be saved, or `out_dir` in use.
    """
    import lm_eval

    final = Path(out_dir).resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise TaskError(f"--save_tasks {out_dir}: already exists and is not an empty folder; "
                        "choose a new folder")
    tasks = load_tasks(names, include_path)
    loaded = tasks.manager.load(list(tasks.items))
    tag_members = {n: set(tasks.manager.task_index[n].tags) for n in names
                   if n in tasks.manager.all_tags}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        writer = _Writer(tmp, final)
        manifest: dict[str, Any] = {
            "format": FORMAT, "lm_eval": lm_eval.__version__,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "asked": list(names), "tasks": {}, "groups": {}}
        for name, task in sorted(loaded["tasks"].items()):
            tags = sorted(t for t, members in tag_members.items() if name in members)
            manifest["tasks"][name] = writer.task(task, tags)
        for name, group in sorted(loaded.get("groups", {}).items()):
            rel = f"group_{_folder_name(name)}.yaml"
            _write_yaml(tmp / rel, _group_yaml(group))
            manifest["groups"][name] = rel
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            final.rmdir()  # empty: checked above
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def format_saved(manifest: dict[str, Any], out_dir: str | Path) -> str:
    """What was saved, a line per data file, and how to use the folder."""
    lines = [f"{'task':<24} {'split':<12} {'rows':>8}  sha256"]
    for task, entry in manifest["tasks"].items():
        for split, d in entry["data"].items():
            lines.append(f"{task:<24} {split:<12} {d['rows']:>8,}  {d['sha256']}")
    names = ",".join(manifest["asked"])
    lines.append(f"saved {len(manifest['tasks'])} task(s) to {out_dir} ({MANIFEST} holds the "
                 f"hashes); score them anywhere with: --tasks {names} --include_path {out_dir}")
    return "\n".join(lines)
