"""`model.scoring`: per-token scores and generation's log-probabilities, against direct math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.lm import LanguageModel
from model.scoring import score
from training.evaluation import evaluate_tokens

CFG = dict(vocab_size=97, d_model=24, num_heads=2, num_layers=2, d_ff=48, max_seq_len=16,
           dropout=0.0)


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    m = LanguageModel(**CFG).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so that ranks and top-k mean something
        m.transformer.wte.weight.mul_(40)
    return m


def _direct(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 in one forward pass: (T-1,)."""
    with torch.no_grad():
        lp = F.log_softmax(model(ids[None, :-1])[0].float(), dim=-1)
    return lp.gather(1, ids[1:, None]).squeeze(1)


def test_scores_equal_a_direct_log_softmax(model):
    ids = torch.randint(0, CFG["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    s = score(model, ids, top_k=7)
    assert math.isnan(s.logprobs[0]) and s.ranks[0] == 0 and s.tokens_scored == 11
    torch.testing.assert_close(s.logprobs[1:], _direct(model, ids), rtol=0, atol=1e-5)
    with torch.no_grad():
        lp = F.log_softmax(model(ids[None, :-1])[0].float(), dim=-1)  # (T-1, V)
    true_top = lp.topk(7, dim=-1)
    torch.testing.assert_close(s.top_logprobs[1:], true_top.values, rtol=0, atol=1e-5)
    assert torch.equal(s.top_ids[1:], true_top.indices)
    expected_rank = (lp > lp.gather(1, ids[1:, None])).sum(1) + 1
    assert torch.equal(s.ranks[1:], expected_rank)
    assert s.loss == pytest.approx(-float(s.logprobs[1:].double().mean()), abs=1e-9)
    assert s.perplexity == pytest.approx(math.exp(s.loss))


@pytest.mark.parametrize("stride", [16, 5])
def test_long_texts_use_evaluate_lms_windows(model, stride):
    """Across window boundaries each token is scored from its own window's context, exactly
    as evaluate_tokens does (same loss), and equals a direct log-softmax of that window."""
    ids = torch.randint(0, CFG["vocab_size"], (41,), generator=torch.Generator().manual_seed(2))
    s = score(model, ids, stride=stride)
    ev = evaluate_tokens(model, ids, stride=stride)
    assert s.tokens_scored == ev.tokens_scored and s.windows == ev.windows
    assert s.loss == pytest.approx(ev.loss, abs=1e-5)
    if stride == 16:  # non-overlapping: window 1 is tokens 16..31, token 16 unscored
        assert torch.isnan(s.logprobs[[0, 16, 32]]).all()
        torch.testing.assert_close(s.logprobs[17:32], _direct(model, ids[16:32]), rtol=0,
                                   atol=1e-5)
    else:  # window 3 covers tokens 15..30 and scores 26..30 (21..25 were window 2's)
        assert s.tokens_scored == 40
        torch.testing.assert_close(s.logprobs[26:31], _direct(model, ids[15:31])[-5:], rtol=0,
                                   atol=1e-5)


def test_string_texts_and_bad_input(model):
    class Tok:
        def encode(self, text):
            return [ord(c) % 97 for c in text]

    s = score(model, "hello", tokenizer=Tok())
    assert s.ids.tolist() == [ord(c) % 97 for c in "hello"]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score(model, [5])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        score(model, [5, 97])
    with pytest.raises(ValueError, match="stride must be between"):
        score(model, [1, 2, 3], stride=17)
    with pytest.raises(ValueError, match="top_k must be"):
        score(model, [1, 2, 3], top_k=-1)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=10, top_p=0.9),
    dict(temperature=1.3, repetition_penalty=1.5),
    dict(temperature=0.0),
])
def test_generation_logprobs_equal_rescoring(model, kwargs):
    prompt = [3, 14, 15, 92, 65]
    ids, lp = model.generate(prompt, max_new_tokens=10, seed=0, return_logprobs=True,
                             top_logprobs=4, **kwargs)
    new = ids[0, len(prompt):]
    assert torch.equal(lp.tokens[0], new) and lp.logprobs.shape == (1, 10)
    assert lp.top_ids.shape == (1, 10, 4)
    # The raw distribution: what scoring the generated sequence gives.
    s = score(model, ids[0], top_k=4)
    torch.testing.assert_close(lp.raw_logprobs[0], s.logprobs[len(prompt):], rtol=0, atol=1e-5)
    torch.testing.assert_close(lp.raw_top_logprobs[0], s.top_logprobs[len(prompt):], rtol=0,
                               atol=1e-5)
    assert torch.equal(lp.raw_ranks[0], s.ranks[len(prompt):])
    # The sampling distribution: the chosen token is in it, and it is its top entry or below.
    assert torch.isfinite(lp.logprobs).all() and (lp.logprobs <= 1e-6).all()
    assert (lp.top_logprobs[..., 0] >= lp.logprobs - 1e-6).all()
    if kwargs["temperature"] == 0:
        assert (lp.logprobs == 0).all() and torch.equal(lp.top_ids[..., 0], new[None])


def test_sampling_distribution_sums_to_one_over_the_kept_set(model):
    """With top_k=V alternatives, the sampling distribution's kept tokens hold all the mass,
    and exactly top_k of them are kept (top-p only narrows further)."""
    V = CFG["vocab_size"]
    _, lp = model.generate([1, 2, 3], max_new_tokens=6, seed=3, temperature=0.8, top_k=20,
                           top_p=0.95, return_logprobs=True, top_logprobs=V)
    probs = lp.top_logprobs.exp()  # (1, n, V); excluded tokens have probability 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6), rtol=0, atol=1e-5)
    kept = torch.isfinite(lp.top_logprobs).sum(-1)
    assert ((kept >= 1) & (kept <= 20)).all()
    _, lp = model.generate([1, 2, 3], max_new_tokens=3, seed=3, top_k=20,
                           return_logprobs=True, top_logprobs=V)
    assert (torch.isfinite(lp.top_logprobs).sum(-1) == 20).all()


def test_stream_yields_the_same_records_and_ragged_rows_pad_with_nan(model):
    prompt = [3, 14, 15]
    ids, lp = model.generate(prompt, max_new_tokens=5, seed=4, return_logprobs=True)
    steps = list(model.stream(prompt, max_new_tokens=5, seed=4, return_logprobs=True))
    assert torch.equal(torch.stack([t for t, _ in steps], 1), ids[:, 3:])
    torch.testing.assert_close(torch.stack([p.raw_logprobs for _, p in steps], 1),
                               lp.raw_logprobs)
    model.end_token = None
    _, lp = model.generate([[1, 2], [3, 4, 5, 6]], max_length=7, seed=0, return_logprobs=True)
    assert lp.logprobs.shape == (2, 5)
    assert torch.isnan(lp.raw_logprobs[1, 3:]).all() and torch.isfinite(lp.raw_logprobs[0]).all()
    with pytest.raises(ValueError, match="top_logprobs must be"):
        model.generate([1], max_new_tokens=2, return_logprobs=True, top_logprobs=-1)
    with pytest.raises(ValueError, match="return_logprobs must be"):
        model.generate([1], max_new_tokens=2, return_logprobs="yes")
