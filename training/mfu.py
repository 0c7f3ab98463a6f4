"""Model FLOPs utilization: the model's FLOPs per token, and the peak of known GPUs.

MFU = model FLOPs per second / peak. The model's FLOPs per token are 6 x parameters (without
position embeddings; the tied LM head counts) + 12 x layers x d_model x context, as in nanoGPT
and PaLM. Peaks are the cards' bf16 dense datasheet figures; elsewhere (CPUs, unknown GPUs) the
peak is unknown and the trainer logs no MFU (`bench/training.py` measures a practical one).
"""

from __future__ import annotations

import torch

from model.lm import LanguageModel

# bf16 dense tensor-core peaks from the datasheets, TFLOP/s (SXM parts unless named).
GPU_PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
             ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0),
             ("RTX 3090", 71.0)]


def flops_per_token(model: LanguageModel) -> float:
    """Training FLOPs per token of `model` (forward and backward): 6 x the weights of its matrix
    products (the LM head included; an untied token embedding is a lookup and does not count)
    plus the attention scores and their weighted sum over the context (12 x layers x the query
    heads' width x context)."""
    cfg = model.config
    params = model.num_params(non_embedding=True)
    if not cfg.tie_embeddings:
        params -= model.transformer.wte.weight.numel()
    attn_width = cfg.num_heads * cfg.head_dim  # d_model unless head_dim says otherwise
    return 6 * params + 12 * cfg.num_layers * attn_width * cfg.max_seq_len


def datasheet_peak(device: torch.device) -> float | None:
    """The bf16 dense peak of `device` in TFLOP/s, when it is a GPU we know; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAKS:
        if key in name:
            return value
    return None
