"""model/dropout.py: the CPU dropout's mask keeps values at its stated rate, scales them to keep
the expectation, passes gradients through the same mask; causal attention built on it equals
SDPA without dropout and the probabilities-times-mask definition with it; a training forward
pass (which takes that path on CPU) equals the evaluation one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ARCHITECTURES
from model.dropout import Dropout, causal_attention_with_dropout, dropout, keep_mask
from model.lm import LanguageModel


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_mask_rate_and_scale(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep, scale = keep_mask((n,), p)
    kept = round((1 - p) * 65536) / 65536  # p rounded to a multiple of 1/65,536
    assert scale == pytest.approx(1 / kept, rel=1e-12) and abs(kept - (1 - p)) <= 2 ** -17
    sigma = math.sqrt(n * kept * (1 - kept))
    assert abs(keep.sum().item() - n * kept) < 6 * sigma
    # the 16-bit parts of one 64-bit draw are independent: neighbours agree as chance says
    both = (keep[0::4] & keep[1::4]).float().mean().item()
    assert both == pytest.approx(kept * kept, abs=6 * math.sqrt(kept ** 2 / (n / 4)))
    again = keep_mask((n,), p)[0]
    assert not torch.equal(keep, again)  # a new mask per call


def test_values_and_gradients_go_through_one_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 128, dtype=torch.float64, requires_grad=True)
    layer = Dropout(0.25)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    y = layer(x)
    kept = y != 0
    scale = 65536 / (65536 - round(0.25 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale, rtol=0, atol=1e-12)
    y.backward(torch.ones_like(y) * 3)
    assert torch.equal(x.grad, kept.double() * 3 * scale)
    assert 0.70 < kept.float().mean() < 0.80
    assert dropout(x, 0.0) is x and dropout(x, 0.3, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_equals_sdpa_without_dropout(kv_heads):
    torch.manual_seed(2)
    q = torch.randn(3, 4, 37, 16)
    k, v = torch.randn(3, kv_heads, 37, 16), torch.randn(3, kv_heads, 37, 16)
    ours = causal_attention_with_dropout(q, k, v, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         enable_gqa=kv_heads != 4)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)


def test_attention_dropout_is_the_masked_probabilities():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 19, 8) for _ in range(3))
    torch.manual_seed(7)
    ours = causal_attention_with_dropout(q, k, v, 0.3)
    torch.manual_seed(7)
    keep, scale = keep_mask((2, 4, 19, 19), 0.3)
    probs = F.scaled_dot_product_attention(q, k, torch.eye(19).expand(2, 4, 19, 19),
                                           is_causal=True)  # the softmax of the scores
    assert torch.allclose(ours, (probs * keep * scale) @ v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "modern", "llama"])
def test_training_forward_equals_evaluation_without_dropout(arch):
    torch.manual_seed(4)
    model = LanguageModel(vocab_size=97, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                          max_seq_len=40, dropout=0.0, **ARCHITECTURES[arch])
    x = torch.randint(0, 97, (3, 40))
    model.train()  # causal attention as matrix products on CPU
    train_logits, _ = model(x, x)
    model.eval()  # SDPA
    eval_logits, _ = model(x, x)
    assert torch.allclose(train_logits, eval_logits, atol=1e-5, rtol=1e-5)
