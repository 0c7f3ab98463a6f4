"""Corpus preparation: text sources in, self-describing token shards out (no torch, no trainer).

sources.py (files, globs, hub datasets), encoders.py (tokenizers for preparation), shards.py
(the shard format and its manifest), prepare.py (the parallel pipeline), datasets.py (the
built-in datasets and splits the trainer and `evaluate_lm.py` load), batches.py (the epoch
sampler).
"""
