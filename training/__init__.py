"""Training: `train_lm.py` (the CLI) and the pieces it is made of.

data.py (sources and token caches), batches.py (epoch order), fused_loss.py (LM head + loss),
step.py (one optimizer step), optim.py (AdamW, schedule), snapshots.py / fileio.py (crash-safe
checkpoints), metrics.py (CSV and plot), distributed.py (torchrun), options.py (flags, presets),
explain.py (--explain), evaluation.py (windowed perplexity).
"""
