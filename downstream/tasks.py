"""Running lm-evaluation-harness tasks on a model: loading them (the harness's registry, or a
local task folder), one-line errors for bad inputs, and the results as a table and as flat
metrics.

    from downstream.tasks import load_tasks, run_tasks
    tasks = load_tasks(["my_task"], include_path="my_tasks/")
    results = run_tasks(lm, tasks, limit=200)

A task folder is in the harness's own format: YAML files (`task:`, `dataset_path: json`,
`dataset_kwargs: {data_files: {test: data.jsonl}}`, `output_type`, ...) beside local JSONL or
Parquet files; relative `data_files` are read from the current directory (the harness's rule),
so a folder meant to be used from anywhere names them by absolute path. Online, a task's data
comes from the Hugging Face hub as usual; offline, a hub task needs its data in the datasets
cache, or a task folder that reads local files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from downstream import manifest as pinned
from downstream.harness import require_lm_eval


class TaskError(ValueError):
    """A task cannot be loaded or run; the message is one line saying what to do."""


def parse_task_names(text: str) -> list[str]:
    """"a,b, c" -> ["a", "b", "c"]; raises TaskError for an empty list."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise TaskError("no task names given (e.g. --tasks hellaswag,arc_easy)")
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip('"')
    return text.splitlines()[0] if text else type(exc).__name__


def check_task_folder(include_path: str | Path) -> None:
    """Raise TaskError if a task folder is missing or holds a YAML file the harness cannot
    read (the harness itself skips such a file silently, and then knows no such task)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(include_path)
    if not root.is_dir():
        raise TaskError(f"task folder {include_path}: no such folder")
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as exc:  # noqa: BLE001 - a YAML error of any kind becomes one line
            where = ""
            mark = getattr(exc, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}"
            problem = getattr(exc, "problem", None) or _first_line(exc)
            raise TaskError(f"task folder {include_path}: {path.name} is not a valid task "
                            f"file{where} ({problem}); fix or remove it") from None


def task_manager(names: Sequence[str], include_path: str | Path | None = None) -> Any:
    """The harness's TaskManager: a task folder's tasks only when it has every name asked for
    (indexing the harness's hundreds of built-in tasks takes seconds), else both."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    check_task_folder(include_path)
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=str(include_path))


@dataclass
class Tasks:
    """Built tasks, ready to run as often as wanted.

    Attributes:
        names: the names asked for.
        items: the harness's Task and Group objects (top level), their data loaded.
        manager: the harness's TaskManager that built them.
        pins: per task of a pinned folder (`--save_tasks`), its files and their sha256, checked
            before loading (empty for other tasks).
    """

    names: list[str]
    items: list[Any]
    manager: Any
    pins: dict[str, Any] = field(default_factory=dict)


def load_tasks(names: Sequence[str], include_path: str | Path | None = None) -> Tasks:
    """Build the named tasks (and groups), their data loaded.

    Args:
        names: task, group or tag names of the harness, or of the task folder.
        include_path: a task folder in the harness's format.

    Returns:
        The `Tasks`, to pass to `run_tasks` (as often as wanted).

    Raises:
        TaskError: an unknown name, a malformed task file, a task whose data is missing, or a
            pinned folder whose files no longer match their sha256.
    """
    manager = task_manager(names, include_path)
    pins = _check_pins(manager, include_path)
    known = set(manager.all_tasks)
    built: list[Any] = []
    for name in names:
        if name not in known:
            where = f" in {include_path} or" if include_path else ""
            raise TaskError(f"unknown task {name!r}: not a task, group or tag{where} in "
                            "lm-evaluation-harness (list them with: lm_eval ls tasks)")
        try:
            loaded = manager.load([name])
        except FileNotFoundError as exc:
            raise TaskError(
                f"task {name}: a data file is missing ({_first_line(exc)}); fix the path in its "
                "YAML's dataset_kwargs.data_files (relative paths are read from the current "
                "directory)") from None
        except (ConnectionError, OSError) as exc:
            raise TaskError(f"task {name}: its data could not be loaded ({_first_line(exc)}); "
                            f"{MISSING_DATA_HINT}") from None
        except Exception as exc:  # noqa: BLE001 - the harness raises many kinds; one line
            raise TaskError(f"task {name}: cannot be built ({_first_line(exc)})") from None
        children = {c for kids in loaded["group_map"].values() for c in kids}
        built += [g for n, g in loaded["groups"].items() if n not in children]
        built += [t for n, t in loaded["tasks"].items() if n not in children]
    return Tasks(list(names), built, manager, pins)


# What to do when a hub task's data cannot be had (offline, or the hub unreachable).
MISSING_DATA_HINT = (
    "offline, save it on a machine online (evaluate_lm.py --tasks NAME --save_tasks DIR) and "
    "pass that folder with --include_path DIR, or run once online so the datasets cache has it "
    "(then HF_DATASETS_OFFLINE=1 reads it from there)")


def _check_pins(manager: Any, include_path: str | Path | None) -> dict[str, Any]:
    """A pinned folder's files checked against its manifest, and the harness pointed at them;
    {} for a plain folder or none."""
    if include_path is None:
        return {}
    try:
        manifest = pinned.read_manifest(include_path)
        if manifest is None:
            return {}
        pins = pinned.verify(include_path, manifest)
    except pinned.PinError as exc:
        raise TaskError(str(exc)) from None
    pinned.use_folder_files(manager, include_path, manifest)
    return pins


def run_tasks(lm: Any, tasks: Tasks, *, limit: int | float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """Evaluate `lm` (a harness model, e.g. `SmallLM`) on tasks from `load_tasks`.

    Args:
        lm: the harness model.
        tasks: what `load_tasks` returned.
        limit: examples per task (an int), or a fraction of each task (a float below 1).
        num_fewshot: few-shot examples (None: each task's own setting).
        log_samples: keep every example's requests and responses in the results.
        quiet: silence the harness's logging and progress bars below warnings.

    Returns:
        The harness's results dict (`results`, `versions`, `n-shot`, `configs`, ...).
    """
    from lm_eval import simple_evaluate

    level = logging.getLogger("lm_eval").level
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks.items), limit=limit,
                                  num_fewshot=num_fewshot, log_samples=log_samples,
                                  bootstrap_iters=0 if quiet else 100000,
                                  task_manager=tasks.manager)
    finally:
        logging.getLogger("lm_eval").setLevel(level)
    if results is None:
        raise TaskError("the harness returned no results")
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every task's metrics as `task/metric` -> value (`acc`, `acc_norm`, `exact_match`, ...;
    the harness's filter suffix dropped when it is "none"; standard errors left out)."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric}_{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def format_table(results: dict[str, Any]) -> str:
    """The results as the harness's own table (task, version, filter, n-shot, metric, value,
    stderr)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table.rstrip("\n")


def clean_json(value: Any) -> Any:
    """`value` with what JSON cannot hold turned into what it can (numpy numbers, NaN/inf as
    null, sets and tuples as lists, anything else as its str)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _quiet_harness():
    """A context in which the harness logs errors only and draws no progress bars (its task
    module's bar is the only one our backend leaves; training's own bar stays)."""
    import contextlib
    from functools import partial

    import lm_eval.api.task as task_module

    @contextlib.contextmanager
    def quiet():
        logger = logging.getLogger("lm_eval")
        level, bar = logger.level, task_module.tqdm
        logger.setLevel(logging.ERROR)
        task_module.tqdm = partial(bar, disable=True)
        try:
            yield
        finally:
            task_module.tqdm = bar
            logger.setLevel(level)

    return quiet()


class TaskRunner:
    """Tasks run again and again on a model that changes (training's `--eval_tasks`): loaded
    once, each run on the same examples, with the harness quiet and the global random state
    (Python, NumPy, torch) left as it was, so that a run with evaluations trains exactly as
    one without.

    Args:
        names: task names.
        limit: examples per task (None: all).
        include_path: a task folder.

    Raises:
        TaskError: as `load_tasks`.
    """

    FEWSHOT_SEED = 1234  # the harness's default few-shot seed

    def __init__(self, names: Sequence[str], limit: int | None = None,
                 include_path: str | Path | None = None) -> None:
        with _quiet_harness():
            self.tasks = load_tasks(names, include_path)
            self.task_dict = self.tasks.manager.load(list(self.tasks.items))
        self.limit = limit
        for task in self.task_dict["tasks"].values():
            task.set_fewshot_seed(seed=self.FEWSHOT_SEED)

    def check_fit(self, tokenizer: Any, max_len: int) -> None:
        """Raise TaskError (one line, with counts) if some examples' prompts do not fit a
        context of `max_len` tokens: they would be cut on the left, silently changing the
        score as the model's context changes."""
        counts = []
        with _quiet_harness():
            for name, task in self.task_dict["tasks"].items():
                task.build_all_requests(limit=self.limit, rank=0, world_size=1)
                cut, docs = set(), set()
                for inst in task.instances:
                    docs.add(inst.doc_id)
                    if _does_not_fit(inst, tokenizer, max_len):
                        cut.add(inst.doc_id)
                if cut:
                    counts.append(f"{len(cut)} of {len(docs)} examples of {name}")
        if counts:
            raise TaskError(f"{'; '.join(counts)} do not fit the model's context of {max_len} "
                            "tokens (their prompts would be cut on the left); train with a "
                            "longer --max_seq_len, or choose tasks with shorter prompts")

    def run(self, model: Any, tokenizer: Any, batch_size: int = 8, dtype: Any = None
            ) -> tuple[dict[str, float], Any]:
        """Evaluate `model` (a `LanguageModel`, left in the mode it was in), in autocast
        `dtype` if given.

        Returns:
            (`flat_metrics` of the results, the backend's `ScoringStats`).
        """
        import random

        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        from downstream.harness import SmallLM

        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        lm = SmallLM(model=model, tokenizer=tokenizer, batch_size=batch_size, dtype=dtype)
        lm.quiet = True
        try:
            with _quiet_harness():
                results = evaluate(lm, self.task_dict, limit=self.limit, bootstrap_iters=0,
                                   log_samples=False)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        return flat_metrics(results or {}), lm.stats


def _does_not_fit(inst: Any, tokenizer: Any, max_len: int) -> bool:
    """Whether a harness request would be cut to fit `max_len` tokens (rolling log-likelihoods
    never are: their windows cover any length)."""
    if inst.request_type == "loglikelihood":
        context, ending = inst.args
        return len(tokenizer.encode(context + ending)) + (context == "") > max_len + 1
    if inst.request_type == "generate_until":
        context, gen_kwargs = inst.args
        budget = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                       if k in gen_kwargs), 256)
        return len(tokenizer.encode(context)) > max_len - int(budget)
    return False
