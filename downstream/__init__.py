"""Downstream tasks (HellaSwag, ARC, LAMBADA, ... or a local task folder) scored through
lm-evaluation-harness with the repo's own model.

- `downstream.scoring`: the model side, plain torch (no harness import): log-likelihoods of
  endings with each context computed once across its endings, the harness's rolling windows,
  and generation with stop strings on the decode engine.
- `downstream.harness`: the harness's model interface over that (`SmallLM`, registered as
  `small-lm`), imported only when the harness is installed (`pip install "lm-eval==0.4.13"`).
- `downstream.tasks`: running named tasks (a local task folder with `include_path`), one-line
  errors for bad inputs, the results as a table and as flat metrics for training's loggers.
- `downstream.save` and `downstream.manifest`: pinned task folders: tasks saved with the sha256
  of their data (`evaluate_lm.py --tasks A,B --save_tasks DIR`), checked before every run.
- `downstream.cli`: the harness's own command line with `small-lm` registered
  (`small-lm-eval --model small-lm --model_args checkpoint=...`, or `python -m downstream`).
"""
