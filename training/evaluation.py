"""Windowed perplexity evaluation, shared by `evaluate_lm.py` and the trainer's validation.

The windows are Hugging Face's "perplexity of fixed-length models" loop, defined once in
`model/windows.py` (which `model.scoring` walks too): windows of `seq_len` tokens every `stride`
tokens, each scoring only the tokens no earlier window scored. With `stride == seq_len` (the
default) the windows do not overlap and the first token of each window goes unscored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.windows import count_windows, resolve_window, window_bounds
from training.unseen_tokens import UnseenTokens

_DTYPES = {
    None: None,
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class EvalResult:
    """What one evaluation measured.

    Attributes:
        tokens_scored: how many target tokens contributed to the loss.
        loss: mean negative log-likelihood per scored token, in nats.
        perplexity: exp(loss) (inf if that overflows).
        bits_per_byte: total nats / ln 2 / UTF-8 bytes of the scored tokens' text
            (`training/byte_counts.py`); None without `num_bytes`.
        bytes_scored: that byte count (a mean-based estimate without a byte table), or None.
        windows: how many windows were evaluated.
        seq_len: window length in tokens.
        stride: step between window starts in tokens.
    """

    tokens_scored: int
    loss: float
    perplexity: float
    bits_per_byte: float | None
    bytes_scored: float | None = None
    windows: int = 0
    seq_len: int = 0
    stride: int = 0

    def to_dict(self) -> dict:
        """Return the result as a plain, JSON-serialisable dict."""
        return asdict(self)


def _select_windows(total: int, max_windows: int | None) -> list[int]:
    """All window indices, or `max_windows` of them spread evenly over the data (deterministic)."""
    if max_windows is None or max_windows >= total:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, num=max_windows)})


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under torch.compile / DistributedDataParallel wrappers (for its attributes)."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrap(inner)
    return model


def _resolve_dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 (got {dtype!r})")
    return _DTYPES[dtype]


def _resolve_device(model: torch.nn.Module, device) -> torch.device:
    model_device = next(model.parameters()).device
    if device is None:
        return model_device
    want = torch.device(device)
    same = want.type == model_device.type and want.index in (None, model_device.index)
    if not same:
        raise ValueError(f"device={str(want)!r} but the model is on {model_device}; move it first")
    return model_device


def _slice(tokens, begin: int, end: int) -> torch.Tensor:
    """Tokens [begin, end) as int64 on the CPU; reads only that slice of a memmap."""
    if isinstance(tokens, torch.Tensor):
        return tokens[begin:end].to("cpu", torch.long)
    return torch.from_numpy(np.asarray(tokens[begin:end], dtype=np.int64))


def _batches(
    tokens, indices: list[int], num_tokens: int, seq_len: int, stride: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Yield (inputs [B, T], targets [B, T] with -100 where unscored, windows in batch)."""
    for i in range(0, len(indices), batch_size):
        rows = []
        for k in indices[i : i + batch_size]:
            begin, end, first = window_bounds(k, num_tokens, seq_len, stride)
            window = _slice(tokens, begin, end)
            # Feeding window[:-1] gives the same logits for window[1:] as feeding the whole window
            # (causal attention), and saves one position.
            x, y = window[:-1], window[1:].clone()
            y[: first - begin - 1] = -100
            rows.append((x, y))
        width = max(len(x) for x, _ in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            inputs[r, : len(x)] = x
            targets[r, : len(y)] = y  # right padding: causal, so padding never affects real tokens
        yield inputs, targets, len(rows)


def evaluate_tokens(
    model: torch.nn.Module,
    tokens,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    device=None,
    dtype=None,
    progress: bool = False,
    num_bytes: int | None = None,
    token_bytes: np.ndarray | None = None,
    unseen: UnseenTokens | None = None,
) -> EvalResult:
    """Score `tokens` with sliding windows, exactly as Hugging Face's perplexity guide does.

    Args:
        model: a language model whose `model(idx)` returns logits [B, T, V] (it may be wrapped
            by torch.compile or DistributedDataParallel).
        tokens: 1-D token ids: a numpy array or memmap (e.g. uint16) or a LongTensor.
        seq_len: window length; defaults to (and may not exceed) `model.max_seq_len`.
        stride: step between windows; defaults to `seq_len` (non-overlapping windows). Each
            token is scored once, with up to `seq_len - stride` tokens of context.
        batch_size: windows per forward pass.
        max_windows: evaluate only this many windows, spread evenly over the data (for quick
            validation during training); None evaluates all.
        device: where the model is; defaults to the model's device (the model is never moved).
        dtype: None/"float32" (no autocast), "bfloat16" or "float16" (autocast).
        progress: show a tqdm bar over windows.
        num_bytes: UTF-8 bytes of the text `tokens` encode, for bits per byte: total nats /
            ln 2 / the bytes of the scored tokens only (the first token of the text and of each
            non-overlapping window, and the windows `max_windows` skips, count neither bits
            nor bytes). Without `token_bytes` those bytes are `num_bytes` x scored / tokens.
        token_bytes: the bytes each token id spells (`training.byte_counts.byte_table`, which
            checks it against `num_bytes`): the scored targets' bytes are summed exactly.
        unseen: the trainer's shared unseen-token row (`--unseen_tokens shared`): the same
            loss from the seen tokens' columns and the shared one (the model's unseen rows must
            be equal; `training/unseen_tokens.py`).

    Returns:
        An EvalResult.

    Raises:
        ValueError: for bad arguments, too few tokens, or token ids outside the vocabulary.
    """
    seq_len, stride = _check_arguments(model, tokens, seq_len, stride, batch_size, max_windows,
                                       num_bytes)
    amp_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(model, device)
    num_tokens = int(len(tokens))
    total = count_windows(num_tokens, seq_len, stride)
    indices = _select_windows(total, max_windows)
    batches = _batches(tokens, indices, num_tokens, seq_len, stride, batch_size)
    table = None
    if token_bytes is not None:
        table = torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)
        if table.dim() != 1 or len(table) < int(_unwrap(model).config.vocab_size):
            raise ValueError("token_bytes must give the bytes of every id of the vocabulary")
    nll_sum, scored, scored_bytes = _score(
        model, batches, device=dev, amp_dtype=amp_dtype,
        progress_total=len(indices) if progress else None, unseen=unseen, token_bytes=table)
    if scored == 0:
        raise ValueError("no tokens were scored (every window was a single token)")
    loss = nll_sum / scored
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    bpb = text_bytes = None
    if num_bytes is not None:
        # Only the scored tokens' bytes: summed exactly from the table, else their share of the
        # text at its mean bytes per token (`training/byte_counts.py`).
        text_bytes = scored_bytes if table is not None else num_bytes * scored / num_tokens
        bpb = nll_sum / math.log(2) / text_bytes if text_bytes > 0 else None
    return EvalResult(
        tokens_scored=scored,
        loss=loss,
        perplexity=ppl,
        bits_per_byte=bpb,
        bytes_scored=text_bytes,
        windows=len(indices),
        seq_len=seq_len,
        stride=stride,
    )


def _check_arguments(model: torch.nn.Module, tokens, seq_len: int | None, stride: int | None,
                     batch_size: int, max_windows: int | None,
                     num_bytes: int | None) -> tuple[int, int]:
    """Validate `evaluate_tokens`' arguments; returns (seq_len, stride) with defaults filled."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError("tokens must be a 1-D integer tensor")
    else:
        if getattr(tokens, "ndim", None) != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("tokens must be a 1-D integer numpy array or LongTensor")
    base = _unwrap(model)
    max_len = int(getattr(base, "max_seq_len", 0) or base.config.max_seq_len)
    seq_len, stride = resolve_window(seq_len, stride, max_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if num_bytes is not None and num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return seq_len, stride


def _score(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]], *,
           device: torch.device, amp_dtype: torch.dtype | None,
           progress_total: int | None, unseen: UnseenTokens | None = None,
           token_bytes: torch.Tensor | None = None) -> tuple[float, int, int]:
    """(summed negative log-likelihood, tokens scored, their bytes by `token_bytes` or 0)
    over `batches`, in eval mode, no grad."""
    vocab_size = int(_unwrap(model).config.vocab_size)
    bar = None
    if progress_total is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=progress_total, unit="window", desc="evaluating", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    nll_sum, scored, scored_bytes = 0.0, 0, 0
    try:
        with torch.no_grad():
            for inputs, targets, n in batches:
                if inputs.numel() == 0:  # a lone one-token last window: nothing to score
                    if bar is not None:
                        bar.update(n)
                    continue
                top = max(int(inputs.max()), int(targets.max()))
                if top >= vocab_size:
                    raise ValueError(
                        f"token id {top} is outside the model's vocabulary "
                        f"({vocab_size}); was the data encoded with another tokenizer?"
                    )
                if token_bytes is not None:
                    scored_bytes += int(token_bytes[targets[targets != -100]].sum())
                inputs, targets = inputs.to(device), targets.to(device)
                mask = targets != -100
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if unseen is not None:
                        base = _unwrap(model)
                        hidden = base.forward_hidden(inputs)[mask]
                        nll_sum += unseen.nll_sum(hidden, base.lm_head.weight, targets[mask],
                                                  base.config.logit_softcap).item()
                    else:
                        logits = model(inputs)
                if unseen is None:
                    # Only the scored positions go through the (fp32) softmax: with a small
                    # stride that is a fraction of the window, and it keeps memory at one copy
                    # of the logits.
                    picked = logits[mask].float()
                    nll_sum += F.cross_entropy(picked, targets[mask], reduction="sum").item()
                scored += int(mask.sum())
                if bar is not None:
                    bar.update(n)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return nll_sum, scored, scored_bytes


def sample_text(model: torch.nn.Module, prompt: str, tokens: int, seed: int) -> str:
    """A sample of `tokens` tokens after `prompt` for the training log, decoded with the
    model's tokenizer (never raises: a sample is a nicety)."""
    try:
        with model:
            out = model.generate(prompt, max_new_tokens=tokens, temperature=0.8, top_k=200,
                                 seed=seed)
        return model.tokenizer.decode(out[0].tolist())
    except Exception as exc:  # noqa: BLE001 - never stop training for a sample
        return f"(no sample: {exc})"
