#!/usr/bin/env bash
# The GPU figures in docs/benchmarks.md: run from the repo root on a CUDA machine.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 100 python bench/generation.py --device cuda --dtype bfloat16 --repeats 2 --skip_nanogpt 2>&1 | grep -v '^\[transformers\]'
timeout 100 python bench/generation.py --device cuda --dtype bfloat16 --compile --cases gpt2-124M --repeats 2 --skip_nanogpt 2>&1 | grep -v '^\[transformers\]'
timeout 90 python bench/training.py --device cuda --config gpt2-124m --iters 10 2>&1 | tail -15
