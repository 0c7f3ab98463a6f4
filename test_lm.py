"""The model's core unit tests: shapes, Hugging Face parity, the KV cache, the samplers,
batching, the sliding window and the `with model:` block.

Run alone with `python -m pytest test_lm.py`; `python -m pytest -q` runs it with tests/.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model.hf_interop import config_from_hf, config_to_hf, state_dict_to_hf
from model.lm import LanguageModel, LMConfig
from model.sampling import filter_logits

CONFIGS = [
    dict(vocab_size=101, d_model=24, num_heads=3, num_layers=2, d_ff=40, max_seq_len=64),
    dict(vocab_size=257, d_model=32, num_heads=4, num_layers=3, d_ff=128, max_seq_len=80),
    dict(vocab_size=50257, d_model=30, num_heads=6, num_layers=1, d_ff=50, max_seq_len=40),
]


def hf_pair(seed: int = 0, **cfg):
    """A random-weight HF GPT2LMHeadModel and our conversion of it, both in eval mode."""
    torch.manual_seed(seed)
    lm_cfg = LMConfig(dropout=0.0, **cfg)
    hf = GPT2LMHeadModel(config_to_hf(lm_cfg)).eval()
    return hf, LanguageModel.from_hf_gpt2(hf).eval()


@pytest.fixture(scope="module")
def pair():
    return hf_pair(**CONFIGS[0])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_logits_match_hf(cfg):
    hf, ours = hf_pair(**cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["max_seq_len"]))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5


def test_state_dict_round_trip_and_config_mapping(pair):
    hf, ours = pair
    back = state_dict_to_hf(ours.state_dict())
    ref = {k: v for k, v in hf.state_dict().items()
           if not k.endswith((".attn.bias", "masked_bias"))}
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert torch.equal(back[k], v), k
    assert config_from_hf(hf.config).to_dict() == ours.config.to_dict()
    assert not any("kv_cache" in k for k in ours.state_dict())


def test_unsupported_hf_options_are_refused():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(GPT2Config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf(GPT2Config(activation_function="relu"))


def test_greedy_matches_hf_generate(pair):
    hf, ours = pair
    prompt = torch.randint(0, 101, (1, 7))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50,
                      do_sample=False, pad_token_id=0)
    out = ours.generate(prompt, max_new_tokens=50, temperature=0)
    assert out.shape == (1, 57)
    assert torch.equal(out, ref)


def test_cached_decode_equals_full_recompute(pair):
    _, model = pair
    seq = torch.randint(0, 101, (2, 40))
    with model:
        model.setup_cache(2)
        logits = model.forward_cached(seq[:, :5], input_pos=0, last_only=True)[:, -1]
        for t in range(5, 40):
            full = model(seq[:, :t])[:, -1]
            assert (logits - full).abs().max().item() <= 1e-5, t
            logits = model.forward_cached(seq[:, t:t + 1], input_pos=t, last_only=True)[:, -1]


def test_static_decode_step_equals_eager(pair, monkeypatch):
    _, model = pair
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # run the static step eagerly
    rows = [torch.randint(0, 101, (n,)) for n in (3, 9, 5)]
    eager = model.generate(rows, max_new_tokens=80, temperature=0)
    static = model.generate(rows, max_new_tokens=80, temperature=0, compile=True)
    del model._compiled_step
    assert torch.equal(eager, static)


# -- the guide's API --------------------------------------------------------------------------


def test_guide_minimal_example_shapes(tiny_config):
    model = LanguageModel(**tiny_config)
    model.eval()
    model.end_token = None
    prompt_ids = torch.tensor([464, 3290, 286])
    with model:
        out = model.generate(prompt_ids, max_length=20, temperature=0.8)
    assert out.shape == (1, 20) and out.dtype == torch.long
    assert torch.equal(out[0, :3], prompt_ids)
    batch = torch.randint(0, 50257, (4, 6))
    out = model.generate(prompt=batch, max_length=10, temperature=0.8, top_p=0.9)
    assert out.shape == (4, 10)
    out = model.generate(batch, max_new_tokens=3, top_k=5)
    assert out.shape == (4, 9)
    assert model.max_seq_len == tiny_config["max_seq_len"]


def test_string_prompts_use_the_tokenizer(tiny_config):
    model = LanguageModel(**tiny_config)
    out = model.generate("Once upon a time", max_length=10, temperature=0)
    from model.tokenizer import load_tokenizer

    ids = load_tokenizer().encode("Once upon a time")
    assert out.shape == (1, 10) and out[0, :len(ids)].tolist() == ids
    out = model.generate(["Hello", "The capital of France"], max_length=12, temperature=0)
    assert out.shape[0] == 2


def test_forward_loss_and_ignore_index(pair):
    _, model = pair
    idx = torch.randint(0, 101, (2, 10))
    targets = torch.randint(0, 101, (2, 10))
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 101), targets.view(-1))
    assert torch.allclose(loss, ref)
    targets[:, :5] = -100
    _, loss2 = model(idx, targets)
    ref2 = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 101),
                                             targets[:, 5:].reshape(-1))
    assert torch.allclose(loss2, ref2)


def test_with_block_restores_mode_grad_and_frees_cache(tiny_config):
    model = LanguageModel(**tiny_config)
    model.train()
    assert torch.is_grad_enabled()
    with model as m:
        assert m is model and not model.training and not torch.is_grad_enabled()
        assert model.has_cache()
        with model:  # nesting keeps the cache until the outer block ends
            pass
        assert model.has_cache()
        model.generate(torch.tensor([1, 2, 3]), max_length=8)
    assert model.training and torch.is_grad_enabled() and not model.has_cache()
    assert model.lm_head.decode_w is None
    model.eval()
    with torch.no_grad():
        model.generate(torch.tensor([1, 2]), max_length=5)
    assert not model.training and not model.has_cache()


# -- samplers ---------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum().item() == 2
    out = filter_logits(logits, top_k=4)
    kept = torch.isfinite(out)[0].nonzero().flatten().tolist()
    assert kept == [1, 2, 3, 5]


@pytest.mark.parametrize("p,expected", [(0.5, 1), (0.79, 2), (0.8, 2), (0.81, 3),
                                        (0.95, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_minimal_nucleus(p, expected):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    out = filter_logits(probs.log(), top_p=p)
    kept = torch.isfinite(out)[0]
    assert kept.sum().item() == expected
    # the kept set is the most likely tokens, and its mass reaches p
    order = probs[0].argsort(descending=True)[:expected]
    assert kept[order].all() and probs[0][kept].sum().item() >= p - 1e-6


def test_top_k_then_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    out = filter_logits(probs.log(), top_k=2, top_p=0.5)
    # renormalised top-2 is [4/7, 3/7]: the nucleus at 0.5 is the first token alone
    assert torch.isfinite(out)[0].tolist() == [True, False, False, False]


def test_sampling_matches_the_softmax_distribution():
    from model.sampling import sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).log_softmax(0).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    expected = logits[0].softmax(0)
    assert (freq - expected).abs().max().item() < 0.015  # ~5 standard errors
    # temperature 0.5 sharpens exactly as softmax(logits / 0.5)
    draws = sample(logits, temperature=0.5, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert (freq - (logits[0] / 0.5).softmax(0)).abs().max().item() < 0.015


def test_repetition_penalty_is_ctrl():
    from model.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_matches_hf(pair):
    hf, ours = pair
    prompt = torch.randint(0, 101, (1, 6))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                      do_sample=False, repetition_penalty=1.8, pad_token_id=0)
    out = ours.generate(prompt, max_new_tokens=30, temperature=0, repetition_penalty=1.8)
    assert torch.equal(out, ref)


def test_same_seed_same_sample(pair):
    _, model = pair
    prompt = torch.tensor([5, 6, 7])
    a = model.generate(prompt, max_new_tokens=30, top_p=0.9, seed=7)
    b = model.generate(prompt, max_new_tokens=30, top_p=0.9, seed=7)
    c = model.generate(prompt, max_new_tokens=30, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(prompt, max_new_tokens=30, top_p=0.9, generator=g), a)


def test_stream_yields_what_generate_returns(pair):
    _, model = pair
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, max_new_tokens=12, seed=3, top_k=20)
    steps = list(model.stream(prompt, max_new_tokens=12, seed=3, top_k=20))
    assert len(steps) == 12 and steps[0].shape == (2,)
    assert torch.equal(torch.stack(steps, 1), out[:, 3:])


# -- end token, batches, window ---------------------------------------------------------------


def test_end_token_stops_rows_and_pads(pair):
    _, model = pair
    prompts = torch.randint(0, 101, (3, 4))
    free = model.generate(prompts, max_new_tokens=20, temperature=0)
    end = int(free[0, 4 + 5])  # row 0 produces this at step 5
    model.end_token = end
    try:
        out = model.generate(prompts, max_new_tokens=20, temperature=0,
                             attention_mask=torch.ones_like(prompts))
    finally:
        model.end_token = None
    used = []
    for b in range(3):
        gen = free[b, 4:].tolist()
        k = gen.index(end) + 1 if end in gen else 20
        assert out[b, 4:4 + k].tolist() == gen[:k]
        assert (out[b, 4 + k:] == end).all()
        used.append(k)
    assert out.size(1) == 4 + max(used)


def test_generation_ends_when_all_rows_finish(pair):
    _, model = pair
    prompt = torch.randint(0, 101, (1, 4))
    free = model.generate(prompt, max_new_tokens=20, temperature=0)
    model.end_token = int(free[0, 6])
    try:
        out = model.generate(prompt, max_new_tokens=20, temperature=0)
    finally:
        model.end_token = None
    assert out.size(1) == 4 + free[0, 4:].tolist().index(int(free[0, 6])) + 1


def test_ragged_batch_equals_one_by_one(pair):
    _, model = pair
    torch.manual_seed(5)
    rows = [torch.randint(1, 101, (n,)) for n in (2, 11, 6, 1)]
    alone = [model.generate(r, max_new_tokens=25, temperature=0)[0] for r in rows]
    batch = model.generate(rows, max_new_tokens=25, temperature=0, pad_token_id=0)
    for b, row in enumerate(rows):
        n = row.numel() + 25
        assert torch.equal(batch[b, :n], alone[b]), b
        assert (batch[b, n:] == 0).all()
    # max_length counts each row's own prompt
    out = model.generate([r.tolist() for r in rows], max_length=20, temperature=0, pad_token_id=0)
    assert out.shape == (4, 20)
    for b in range(len(rows)):
        assert torch.equal(out[b], alone[b][:20])


def test_guide_batch_example_right_padding_with_eos(pair):
    _, model = pair
    eos = 100
    model.end_token = eos
    try:
        rows = [[3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]
        alone = [model.generate(torch.tensor(r), max_length=30, temperature=0)[0] for r in rows]
        longest = max(map(len, rows))
        padded = torch.tensor([r + [eos] * (longest - len(r)) for r in rows])
        out = model.generate(prompt=padded, max_length=30, temperature=0)
    finally:
        model.end_token = None
    for b in range(3):
        assert torch.equal(out[b, :alone[b].numel()], alone[b])


def _window_len(n: int, W: int) -> int:
    """Reference policy: how many of the n tokens so far condition the next prediction."""
    keep = max(1, W - W // 4)
    return n if n <= W else keep + (n - W - 1) % (W - keep + 1)


@pytest.mark.parametrize("W", [16, 9])
def test_sliding_window_matches_full_recompute_reference(W):
    torch.manual_seed(2)
    model = LanguageModel(vocab_size=97, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                          max_seq_len=W, dropout=0.0).eval()
    prompt = torch.randint(0, 97, (5,))
    out = model.generate(prompt, max_new_tokens=4 * W, temperature=0)[0]
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(4 * W):
            ctx = torch.tensor(seq[len(seq) - _window_len(len(seq), W):])[None]
            seq.append(int(model(ctx)[0, -1].argmax()))
    assert out.tolist() == seq


def test_sliding_window_recomputes_rarely(monkeypatch):
    model = LanguageModel(vocab_size=97, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                          max_seq_len=16, dropout=0.0)
    calls = []
    real = model.forward_cached

    def spy(idx, *a, **kw):
        calls.append(idx.size(1))
        return real(idx, *a, **kw)

    monkeypatch.setattr(model, "forward_cached", spy)
    model.generate(torch.tensor([1, 2, 3]), max_new_tokens=200)
    multi = [t for t in calls if t > 1]
    keep = 16 - 16 // 4
    # one prompt prefill, then one recompute per (W - keep + 1) tokens beyond the window
    assert len(multi) <= 1 + math.ceil(200 / (16 - keep + 1))
    assert len(calls) == 200  # one forward per generated token (the last needs none) + prefill


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_length=3), "max_length"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_generation_arguments(pair, kwargs, match):
    _, model = pair
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([1, 2, 3]), **kwargs)


@pytest.mark.parametrize("prompt,match", [
    (torch.tensor([], dtype=torch.long), "empty"),
    ([], "empty"),
    (torch.tensor([1.0, 2.0]), "dtype"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
    (torch.ones(65, dtype=torch.long), r"65 tokens.*max_seq_len\) is 64"),
    (torch.tensor([1, 500]), r"\[0, 101\)"),
    (3.5, "prompt"),
])
def test_bad_prompts(pair, prompt, match):
    _, model = pair
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=30, num_heads=4), "divisible"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(max_seq_len=2.5), "max_seq_len"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(**kwargs)


def test_config_dict_round_trip():
    cfg = LMConfig(d_model=64, num_heads=2)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == ["vocab_size", "d_model", "num_heads", "num_layers", "d_ff",
                                   "max_seq_len", "dropout", *LMConfig.ARCHITECTURE_KEYS]
    with pytest.raises(ValueError, match="unknown"):
        LMConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_default_init_is_gpt2_like():
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=1000, d_model=128, num_layers=8)
    sd = model.state_dict()
    assert abs(sd["transformer.wte.weight"].std().item() - 0.02) < 1e-3
    assert abs(sd["transformer.h.0.attn.c_proj.weight"].std().item() - 0.02 / 4) < 5e-4
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert (sd["transformer.h.0.mlp.c_fc.bias"] == 0).all()


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])
def test_binned_nucleus_equals_full_sort(scale):
    from model.sampling import _outside_nucleus, keep_mask

    torch.manual_seed(int(scale * 100))
    for _ in range(20):
        logits = torch.randn(3, 50257) * scale  # 12.0: logits spread past the bins' 20 nats
        logits[2, :1000] = float("-inf")  # already filtered tokens
        p = float(torch.rand(1)) * 0.98 + 0.01
        vals, idx = torch.sort(logits, dim=-1, descending=True)
        probs = vals.double().softmax(-1)
        ref = torch.zeros_like(logits, dtype=torch.bool).scatter_(
            -1, idx, (probs.cumsum(-1) - probs) < p)
        assert torch.equal(~_outside_nucleus(logits, p), ref)
        assert torch.equal(keep_mask(logits, top_p=p), ref)
        assert torch.equal(~_outside_nucleus(logits[1:2], p), ref[1:2])  # the one-row path


def test_binned_nucleus_with_tied_logits_is_minimal():
    from model.sampling import keep_mask

    torch.manual_seed(0)
    logits = (torch.randn(4, 50257) * 2).bfloat16().float()  # bf16 logits: many exact ties
    for p in (0.3, 0.9, 0.99):
        keep = keep_mask(logits, top_p=p)
        probs = logits.double().softmax(-1)
        for b in range(4):
            kept = probs[b][keep[b]]
            dropped = probs[b][~keep[b]]
            assert kept.sum() >= p  # the nucleus reaches p ...
            assert kept.sum() - kept.min() < p  # ... and no smaller set does
            assert dropped.numel() == 0 or dropped.max() <= kept.min()  # the likeliest tokens
            assert torch.equal(keep_mask(logits[b:b + 1], top_p=p)[0], keep[b])  # one-row path
            tied = probs[b] == kept.min()  # ties at the boundary: lower indices first
            kept_tied = (keep[b] & tied).nonzero().flatten()
            assert torch.equal(kept_tied, tied.nonzero().flatten()[:kept_tied.numel()])


def test_sampling_never_draws_filtered_tokens():
    from model.sampling import sample

    logits = torch.full((4000, 50), -5.0)
    logits[:, 0] = float("-inf")  # token 0 filtered out, as top-k/top-p do
    logits[:, 7] = 3.0
    logits[:, 49] = 3.0
    draws = sample(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {7, 49}


@pytest.mark.parametrize("top_k,top_p,temperature", [(40, None, 0.8), (40, 0.9, 0.8),
                                                   (5, 0.5, 1.0), (1000, 0.95, 1.3)])
def test_top_k_sampling_draws_what_the_full_vocabulary_draw_does(top_k, top_p, temperature):
    """`sample` with top-k runs over the k survivors only; by its definition (temperature, then
    top-k, then top-p, then a draw over what is left) it must pick, seed for seed, the token the
    draw over the whole filtered vocabulary picks."""
    from model.sampling import sample

    torch.manual_seed(0)
    logits = torch.randn(64, 50257) * 3
    logits[:8, :50] = logits[:8, :1]  # tied logits at the top: top-k breaks ties by index
    filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    for seed in range(3):
        fast = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        full = sample(filtered, 1.0, None, None, torch.Generator().manual_seed(seed))
        assert torch.equal(fast, full), (seed, (fast != full).nonzero())


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_weight_copies_match_and_follow_weight_changes(tiny_config, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # more than one thread: the oneDNN-packed copies
    try:
        _check_decode_weight_copies(tiny_config, packed=threads > 1)
    finally:
        torch.set_num_threads(saved)


def _check_decode_weight_copies(tiny_config, packed):
    model = LanguageModel(**tiny_config).eval()
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        plain = model(idx)
        with model:
            assert model.lm_head.decode_w is not None  # made by setup_cache on CPU
            assert model.lm_head.packed == (packed and torch.backends.mkldnn.is_available()
                                            and platform.machine().lower() in ("x86_64", "amd64"))
            assert torch.allclose(model(idx), plain, atol=1e-5)
            model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place change is seen
            changed = model(idx)
        assert model.lm_head.decode_w is None  # freed on exit
        assert torch.allclose(model(idx), changed, atol=1e-5)
        model.generate(idx[0], max_new_tokens=2)  # outside `with`: copies kept for the next call
        assert model.lm_head.decode_w is not None and not model.has_cache()
        model.transformer.h[1].attn.c_attn.bias.add_(1.0)  # bias is used as is
        model.transformer.h[1].attn.c_attn.weight.mul_(0.5)
        again = model(idx)
        model.clear_cache()
        assert torch.allclose(model(idx), again, atol=1e-5)
        assert not torch.allclose(changed, plain, atol=1e-3)
    assert not any("decode" in k for k in model.state_dict())
