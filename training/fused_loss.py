"""The LM head and the cross-entropy loss in one pass, chunked over rows.

`model(idx, targets)` materialises the logits of every position ([B*T, V] floats: 411 MB for a
batch of 8 x 256 with GPT-2's 50,257 tokens), then log-softmax reads and writes them again in the
forward and twice more in the backward. On a CPU that memory traffic costs more than the matrix
products. Here the logits exist one chunk of rows at a time (small enough to stay in cache), and
the gradients of the hidden states and of the head's weight are computed during the forward pass,
since the loss is the last node of the graph. The arithmetic is the same as
`F.cross_entropy(hidden @ weight.T, targets)`: logits in the compute dtype (bf16 under autocast,
as `nn.Linear` would give), softmax in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from training.targets import IGNORE_INDEX

if TYPE_CHECKING:
    from training.unseen_tokens import UnseenTokens



def _softmax_into(logits: torch.Tensor, out: torch.Tensor) -> None:
    """`out[:] = softmax(logits, dim=1)`, written in place where PyTorch allows it."""
    if _HAS_SOFTMAX_OUT:
        torch._softmax(logits, 1, False, out=out)  # the ATen op behind softmax; saves a copy
    else:
        out.copy_(torch.softmax(logits, dim=1))


def _probe_softmax_out() -> bool:
    try:
        x = torch.tensor([[0.0, 1.0]])
        out = torch.empty_like(x)
        torch._softmax(x, 1, False, out=out)
        return torch.allclose(out, torch.softmax(x, dim=1))
    except Exception:  # noqa: BLE001 - any failure: use the public path
        return False


_HAS_SOFTMAX_OUT = _probe_softmax_out()


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int, compute_dtype: torch.dtype,
                logit_bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)  # one cast of the (V, C) weight for both products below
        bias = None if logit_bias is None else logit_bias.to(compute_dtype)
        n_rows, vocab = h.size(0), w.size(0)
        valid = targets != IGNORE_INDEX
        any_ignored = bool((~valid).any())
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
        minus_one = -valid.to(compute_dtype).unsqueeze(1)
        # The mean is over scored positions; the 1/count is applied to the two small gradient
        # outputs (in backward), not to the (N, V) buffer.
        scale = valid.sum().clamp(min=1).reciprocal().to(torch.float32)

        # d nll / d logits = softmax - one_hot(target), per row, in the compute dtype (what
        # autocast's backward would feed the weight products too).
        grad_logits = torch.empty(n_rows, vocab, dtype=compute_dtype, device=h.device)
        grad_h = torch.empty_like(h)
        nll_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            g = grad_logits[rows]
            if softcap is None:
                logits = h[rows] @ w.t() if bias is None else torch.addmm(bias, h[rows], w.t())
            else:  # logits = cap * tanh(h @ w.T / cap) (+ bias)
                t = torch.tanh((h[rows] @ w.t()).div_(softcap))
                logits = t * softcap if bias is None else torch.add(bias, t, alpha=softcap)
            _softmax_into(logits, g)  # fp32 accumulation whatever the dtype
            p_target = g.gather(1, safe_targets[rows]).squeeze(1).float()
            nll_sum -= (p_target.clamp_min(1e-38).log() * valid[rows]).sum()
            g.scatter_add_(1, safe_targets[rows], minus_one[rows])
            if any_ignored:
                g.mul_(valid[rows].unsqueeze(1))
            if softcap is not None:
                g.mul_(1 - t * t)  # through the cap: d cap*tanh(z/cap) / dz = 1 - tanh^2
            torch.mm(g, w, out=grad_h[rows])
        # (V, C) = ((C, N) @ (N, V)).T: this operand order runs faster than G.T @ h on CPUs.
        grad_w = (h.t() @ grad_logits).t()
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return nll_sum * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, scale = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        factor = grad_out.to(torch.float32) * scale
        grad_hidden = grad_h.to(h_dtype).mul_(factor.to(h_dtype))
        grad_weight = grad_w.to(w_dtype, memory_format=torch.contiguous_format)
        return (grad_hidden, grad_weight.mul_(factor.to(w_dtype)), None, None, None, None,
                None)


def default_chunk_rows(vocab_size: int, device_type: str) -> int:
    """Rows of logits per chunk: ~24 MB of fp32 on CPUs (cache-sized), ~1 GB on GPUs."""
    budget = (1 << 30) if device_type == "cuda" else (24 << 20)
    return max(16, budget // (4 * vocab_size))


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int | None = None,
                          logit_bias: torch.Tensor | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T (+ logit_bias)` against `targets`, without
    storing the logits; with `softcap` c, of `c * tanh(hidden @ weight.T / c) (+ logit_bias)`.

    Args:
        hidden: final hidden states, (N, C) (any leading shape is flattened).
        weight: the LM head's weight, (V, C) (nn.Linear layout).
        targets: (N,) next-token ids; -100 marks positions to ignore.
        chunk_rows: rows of logits computed at a time (default: `default_chunk_rows`).
        logit_bias: (V,) added to every row of logits (the shared unseen-token column's log U,
            `training/unseen_tokens.py`); not trained.
        softcap: the model's `logit_softcap` (None: no cap).

    Returns:
        A scalar fp32 loss; its backward gives the gradients of `hidden` and `weight`.
    """
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.size(0), dev)
    with torch.autocast(dev, enabled=False):
        return _LMHeadCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype,
                                         logit_bias, softcap)


class TrainingModule(torch.nn.Module):
    """What the trainer runs (and wraps in DDP): `forward(idx, targets)` -> mean loss.

    Mathematically `model(idx, targets)[1]`, but with the LM head and loss fused
    (`lm_head_cross_entropy`) unless `fused_head=False` or under float16 autocast. With
    `compile_trunk`, the blocks go through `torch.compile` (the fused head stays eager: it is a
    few large matrix products). With `unseen` (`--unseen_tokens shared`), the head computes only
    the columns of the tokens that occur in training and one shared column (the same loss;
    `training/unseen_tokens.py`).
    """

    def __init__(self, model: torch.nn.Module, fused_head: bool = True,
                 compile_trunk: bool = False, chunk_rows: int | None = None,
                 unseen: UnseenTokens | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused_head = fused_head
        self.chunk_rows = chunk_rows
        self.unseen = unseen
        self._hidden = self._plain_hidden
        if compile_trunk:
            self._hidden = torch.compile(self._plain_hidden)

    def _plain_hidden(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.forward_hidden(idx)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dev = idx.device.type
        fp16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
        weight, bias = self.model.lm_head.weight, None  # wte's, unless the model is untied
        softcap = getattr(getattr(self.model, "config", None), "logit_softcap", None)
        if self.unseen is not None:
            weight, bias = self.unseen.head_weight(weight), self.unseen.logit_bias
            targets = self.unseen.target_columns(targets)
        # The fused loss keeps d loss / d logits in the compute dtype before GradScaler's scale is
        # applied: fine for bf16's range, not for fp16's, which therefore takes the plain path.
        if not self.fused_head or fp16:
            if self._hidden is self._plain_hidden and self.unseen is None:
                return self.model(idx, targets)[1]
            logits = torch.nn.functional.linear(self._hidden(idx), weight).float()
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            logits = logits if bias is None else logits + bias
            return torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=IGNORE_INDEX)
        return lm_head_cross_entropy(self._hidden(idx), weight, targets, self.chunk_rows, bias,
                                     softcap)
