"""The decode engine (model/engine.py): rows that join and leave between steps decode as alone."""

from __future__ import annotations

import pytest
import torch

from model.engine import DecodeEngine, Sampling
from model.lm import LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny model: threads only cost here


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return LanguageModel(vocab_size=101, d_model=24, num_heads=3, num_layers=2, d_ff=40,
                         max_seq_len=16, dropout=0.0).eval()


def _alone(model, prompt, n, **kw):
    return model.generate(prompt, max_new_tokens=n, **kw)[0, prompt.numel():].tolist()


def test_rows_joining_and_leaving_decode_as_alone(model):
    """Greedy and seeded rows added at different steps, into freed slots, past the window."""
    torch.manual_seed(0)
    prompts = [torch.randint(0, 101, (n,)) for n in (3, 12, 1, 7)]
    settings = [dict(temperature=0), dict(temperature=0.9, top_p=0.8, seed=11),
                dict(temperature=0), dict(temperature=1.3, top_k=20, seed=5)]
    lengths = [40, 9, 30, 25]  # 40 and 30 slide the 16-token window
    expected = [_alone(model, p, n, **kw)
                for p, n, kw in zip(prompts, lengths, settings, strict=True)]

    def sampling(kw):
        gen = torch.Generator().manual_seed(kw["seed"]) if "seed" in kw else None
        return Sampling(kw["temperature"], kw.get("top_k"), kw.get("top_p"), generator=gen)

    engine = DecodeEngine(model, max_rows=3)
    got: dict[int, list[int]] = {}
    live: dict[int, object] = {}
    arrivals = {0: [0, 1], 4: [2], 11: [3]}  # step -> rows that join before it
    step = 0
    try:
        while step == 0 or live:
            for i in arrivals.get(step, []):
                live[i] = engine.add(prompts[i], sampling(settings[i]))
                got[i] = []
            out = engine.step()
            tokens = out.tokens.tolist()
            assert not out.nonfinite.any()
            for i, row in list(live.items()):
                got[i].append(tokens[row.slot])
                if len(got[i]) == lengths[i]:
                    engine.release(row)
                    del live[i]
            step += 1
        assert engine.free_slots == 3
    finally:
        engine.close()
    for i in range(4):
        assert got[i] == expected[i], i
    assert not model.has_cache()


def test_ragged_batch_past_the_window_equals_one_by_one(model):
    torch.manual_seed(1)
    rows = [torch.randint(0, 101, (n,)) for n in (2, 14, 6)]
    alone = [model.generate(r, max_new_tokens=40, temperature=0)[0] for r in rows]
    batch = model.generate(rows, max_new_tokens=40, temperature=0, pad_token_id=0)
    for b, row in enumerate(rows):
        assert torch.equal(batch[b, :row.numel() + 40], alone[b]), b


def test_a_full_engine_refuses_a_row_and_rows_need_a_prompt(model):
    engine = DecodeEngine(model, max_rows=1)
    try:
        engine.add(torch.tensor([1, 2]), Sampling(0.0))
        with pytest.raises(RuntimeError, match="in use"):
            engine.add(torch.tensor([1]), Sampling(0.0))
        engine.release(engine.rows[0])
        with pytest.raises(ValueError, match="1 to 16"):
            engine.add(torch.tensor([], dtype=torch.long), Sampling(0.0))
        with pytest.raises(RuntimeError, match="no rows"):
            engine.step()
    finally:
        engine.close()
