"""`model.sampling.Sampling`: each bad setting gets its one message, wherever it comes from."""

from __future__ import annotations

import pytest
import torch

from model.engine import Sampling as EngineSampling
from model.sampling import SEED_LIMIT, Sampling, SamplingError, check_setting


def test_defaults_are_valid_and_normalised():
    s = Sampling()
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1.0, None, None, 1.0)
    assert s.generator is None and s.seed is None and s.top_logprobs is None
    s = Sampling(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(s.temperature, float) and isinstance(s.top_p, float)
    assert isinstance(s.repetition_penalty, float)
    assert EngineSampling is Sampling  # the engine re-exports it


@pytest.mark.parametrize("name, value, message", [
    ("temperature", -0.5, "temperature must be >= 0 and finite (0 is greedy), got -0.5"),
    ("temperature", float("nan"), "temperature must be >= 0 and finite (0 is greedy), got nan"),
    ("temperature", float("inf"), "temperature must be >= 0 and finite (0 is greedy), got inf"),
    ("temperature", "hot", "temperature must be >= 0 and finite (0 is greedy), got 'hot'"),
    ("temperature", None, "temperature must be >= 0 and finite (0 is greedy), got None"),
    ("temperature", True, "temperature must be >= 0 and finite (0 is greedy), got True"),
    ("temperature", 10**400, "temperature must be >= 0 and finite (0 is greedy), got 1000"),
    ("top_k", 0, "top_k must be an integer >= 1 or None, got 0"),
    ("top_k", 2.5, "top_k must be an integer >= 1 or None, got 2.5"),
    ("top_k", True, "top_k must be an integer >= 1 or None, got True"),
    ("top_p", 0.0, "top_p must be in (0, 1] or None, got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1] or None, got 1.5"),
    ("top_p", float("nan"), "top_p must be in (0, 1] or None, got nan"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0 and finite (1.0 is off), got 0.0"),
    ("repetition_penalty", float("inf"),
     "repetition_penalty must be > 0 and finite (1.0 is off), got inf"),
    ("repetition_penalty", None,
     "repetition_penalty must be > 0 and finite (1.0 is off), got None"),
    ("generator", 5, "generator must be a torch.Generator or None, got int"),
    ("top_logprobs", -1, "top_logprobs must be an integer >= 0 or None, got -1"),
    ("top_logprobs", 1.0, "top_logprobs must be an integer >= 0 or None, got 1.0"),
    ("seed", -1, "seed must be an integer in [0, 2**64) or None, got -1"),
    ("seed", 2**64, "seed must be an integer in [0, 2**64) or None, got 18446744073709551616"),
    ("seed", 1.0, "seed must be an integer in [0, 2**64) or None, got 1.0"),
])
def test_each_bad_value_has_one_message(name, value, message):
    with pytest.raises(SamplingError) as info:
        Sampling(**{name: value})
    assert str(info.value).startswith(message) and info.value.field == name
    assert isinstance(info.value, ValueError)
    with pytest.raises(SamplingError) as again:  # the same check, one setting at a time
        check_setting(name, value)
    assert str(again.value) == str(info.value)


def test_seed_range_edges():
    assert SEED_LIMIT == 2**64
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        s = Sampling(temperature=0.8, seed=seed)
        gen = s.generator_on(torch.device("cpu"))
        assert gen is s.generator and gen.initial_seed() == seed  # torch takes every one
        assert s.generator_on(torch.device("cpu")) is gen  # made once, then shared
    for seed in (-1, 2**64):
        with pytest.raises(SamplingError, match="seed"):
            Sampling(seed=seed)


def test_generator_wins_over_seed():
    gen = torch.Generator().manual_seed(3)
    s = Sampling(generator=gen, seed=5)
    assert s.generator_on(torch.device("cpu")) is gen and gen.initial_seed() == 3


def test_check_setting_refuses_unknown_names():
    with pytest.raises(SamplingError, match="unknown sampling setting 'colour'"):
        check_setting("colour", 1)


def test_generate_gives_the_sampling_messages():
    from model.lm import LanguageModel

    model = LanguageModel(vocab_size=50, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                          max_seq_len=16)
    for kwargs, message in ((dict(top_p=1.5), "top_p must be in (0, 1] or None, got 1.5"),
                            (dict(seed=-1), "seed must be an integer in [0, 2**64)"),
                            (dict(temperature=-1), "temperature must be >= 0")):
        with pytest.raises(ValueError) as info:
            model.generate([1, 2], max_new_tokens=2, **kwargs)
        assert str(info.value).startswith(message)
    a = model.generate([1, 2], max_new_tokens=5, seed=2**64 - 1)
    b = model.generate([1, 2], max_new_tokens=5, seed=2**64 - 1)
    assert torch.equal(a, b)
