"""Training: `train_lm.py` (the CLI) and the pieces it is made of.

options.py (flags, presets), config.py (the typed run configuration, resolved once), start.py
(new, --init_from, --resume), build.py (model, optimizer, scaler), optim.py (AdamW/Muon,
schedule), loop.py (the Trainer), step.py (one optimizer step), fused_loss.py (LM head + loss),
unseen_tokens.py (the shared column of unseen tokens), evaluation.py (windowed perplexity,
samples), budget.py (--time_budget arithmetic), measure.py (timing a run's parts), run_state.py
(counters, snapshot payload), snapshots.py (crash-safe checkpoints), metrics.py / loggers.py
(CSV, plot, TensorBoard, W&B), explain.py (--explain), preflight.py (paths, memory),
distributed.py (torchrun). The data lives in corpus/, shared helpers in common/.
"""
