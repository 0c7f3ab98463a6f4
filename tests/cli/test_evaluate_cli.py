"""Windowed evaluation (training/evaluation.py) and its CLI (evaluate_lm.py).

The reference is Hugging Face's perplexity loop run on `GPT2LMHeadModel` with the same weights;
models are tiny and built locally (random, or trained for a few steps here), nothing downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_cases import assert_usage_errors
from transformers import GPT2Config, GPT2LMHeadModel

import evaluate_lm
from model.checkpoint import load_model
from model.hf_interop import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from model.lm import LanguageModel
from model.tokenizer import load_tokenizer
from training.byte_counts import byte_table
from training.evaluation import EvalResult, evaluate_tokens

REPO = Path(__file__).resolve().parents[2]
SEQ = 32  # max_seq_len of every model here
TINY = dict(vocab_size=50257, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_seq_len=SEQ,
            dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_reference_perplexity(hf: GPT2LMHeadModel, ids: torch.Tensor, max_length: int,
                            stride: int, literal_guide_count: bool = False) -> tuple[float, int]:
    """Hugging Face's "Perplexity of fixed-length models" loop, on a (1, N) tensor.

    The guide counts the tokens of a window as `valid labels - batch_size`, which is exact when
    the window's first label is scored but one short for later overlapping windows (their
    first label is already masked). By default we count the labels the shifted loss really
    averages over; `literal_guide_count=True` uses the guide's expression.
    """
    n = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        if literal_guide_count:
            count = int((target_ids != -100).sum()) - target_ids.size(0)
        else:
            count = int((target_ids[:, 1:] != -100).sum())
        if count:
            nll_sum += float(loss) * count
            n_tokens += count
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def text_ids() -> torch.Tensor:
    """~390 GPT-2 tokens of Tiny Shakespeare (from its validation part)."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return torch.tensor(load_tokenizer("gpt2")(text[-1400:])["input_ids"])


@pytest.fixture(scope="module")
def random_pair() -> tuple[LanguageModel, GPT2LMHeadModel]:
    """A random GPT2LMHeadModel (every weight perturbed) and ours converted from it."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=SEQ, n_embd=32, n_layer=2,
                                    n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale, base = (0.1, 1.0) if ".ln_" in name or "ln_f" in name else (0.05, 0.0)
            p.copy_(base + scale * torch.randn_like(p))
    hf.eval()
    ours = LanguageModel.from_config(config_from_hf(hf.config))
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()))
    return ours.eval(), hf


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    """A tiny byte-level model trained briefly on Tiny Shakespeare, and its HF twin.

    Bytes (vocab 256) instead of GPT-2 tokens keep training to a few seconds of CPU while the
    model still learns real text (its loss falls from ~5.5 to ~2.5 nats/byte).
    """
    raw = (REPO / "data" / "tinyshakespeare.txt").read_bytes()
    data = torch.tensor(list(raw[:200_000]))
    torch.manual_seed(0)
    model = LanguageModel(**{**TINY, "vocab_size": 256})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(150):
        starts = torch.randint(0, len(data) - SEQ - 1, (16,), generator=gen)
        x = torch.stack([data[s : s + SEQ] for s in starts])
        y = torch.stack([data[s + 1 : s + SEQ + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    hf = GPT2LMHeadModel(config_to_hf(model.config))
    hf.load_state_dict(state_dict_to_hf(model.state_dict()))
    held_out = torch.tensor(list(raw[-1500:]))  # the validation part, never trained on
    return SimpleNamespace(model=model, hf=hf.eval(), losses=losses, text=held_out)


# -- equal to Hugging Face -------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [SEQ, 16, 5])
def test_perplexity_equals_hf_on_random_weights(random_pair, text_ids, stride):
    ours, hf = random_pair
    ref_ppl, ref_count = hf_reference_perplexity(hf, text_ids[None], SEQ, stride)
    result = evaluate_tokens(ours, text_ids, stride=stride, batch_size=7)
    assert result.tokens_scored == ref_count
    assert rel(result.perplexity, ref_ppl) <= 1e-4
    assert result.seq_len == SEQ and result.stride == stride


def test_non_overlapping_equals_the_guides_literal_loop(random_pair, text_ids):
    ours, hf = random_pair
    ref_ppl, ref_count = hf_reference_perplexity(hf, text_ids[None], SEQ, SEQ,
                                                 literal_guide_count=True)
    result = evaluate_tokens(ours, text_ids.numpy().astype(np.uint16))
    assert (result.tokens_scored, result.windows) == (ref_count, math.ceil(len(text_ids) / SEQ))
    assert rel(result.perplexity, ref_ppl) <= 1e-4


@pytest.mark.parametrize("stride", [SEQ, 8])
def test_perplexity_equals_hf_on_a_trained_model(trained, stride):
    assert trained.losses[-1] < trained.losses[0] - 2.0  # it did learn the text
    ref_ppl, ref_count = hf_reference_perplexity(trained.hf, trained.text[None], SEQ, stride)
    result = evaluate_tokens(trained.model, trained.text, stride=stride)
    assert result.tokens_scored == ref_count
    assert rel(result.perplexity, ref_ppl) <= 1e-4
    assert result.perplexity < 40  # far below a random byte model's ~256


# -- windowing, inputs, modes ----------------------------------------------------------------------


class Bigram(torch.nn.Module):
    """A 'language model' whose prediction depends only on the previous token."""

    def __init__(self, vocab: int = 50, max_seq_len: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.max_seq_len = max_seq_len
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=max_seq_len)

    def forward(self, idx):
        return self.emb(idx)


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 4), (16, 1), (8, 5), (2, 2)])
def test_every_token_scored_once_batching_independent(seq_len, stride):
    model = Bigram()
    tokens = np.random.default_rng(0).integers(0, 50, size=203).astype(np.uint16)
    t = torch.from_numpy(tokens.astype(np.int64))
    logp = torch.log_softmax(model.emb.weight.detach(), -1)
    windows = 1 + max(0, math.ceil((len(t) - seq_len) / stride))
    # Overlapping windows score tokens 1..N-1; disjoint ones skip each window's first token.
    if stride < seq_len:
        scored = list(range(1, len(t)))
    else:
        scored = [i for i in range(len(t)) if i % seq_len]
    expected = -float(sum(logp[t[i - 1], t[i]] for i in scored)) / len(scored)
    results = [evaluate_tokens(model, data, seq_len=seq_len, stride=stride, batch_size=bs)
               for data in (tokens, t) for bs in (1, 3, 64)]
    for r in results:
        assert (r.tokens_scored, r.windows) == (len(scored), windows)
        assert abs(r.loss - expected) < 1e-5


def test_memmap_input_and_bits_per_byte(tmp_path, random_pair, text_ids):
    ours, _ = random_pair
    path = tmp_path / "tokens.bin"
    text_ids.numpy().astype(np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    a = evaluate_tokens(ours, mm, num_bytes=1400)
    b = evaluate_tokens(ours, text_ids)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert b.bits_per_byte is None
    # Without a byte table the scored tokens count their share of the bytes (the first token
    # of each of the non-overlapping windows is not scored, and counts no bytes).
    assert a.tokens_scored < len(text_ids)
    assert a.bytes_scored == pytest.approx(1400 * a.tokens_scored / len(text_ids))
    assert a.bits_per_byte == pytest.approx(a.loss * a.tokens_scored / math.log(2)
                                            / a.bytes_scored)
    assert set(a.to_dict()) == {"tokens_scored", "loss", "perplexity", "bits_per_byte",
                                "bytes_scored", "windows", "seq_len", "stride"}
    assert isinstance(a, EvalResult) and json.loads(json.dumps(a.to_dict())) == a.to_dict()


def test_max_windows_is_an_even_deterministic_subset(random_pair, text_ids):
    ours, _ = random_pair
    full = evaluate_tokens(ours, text_ids, stride=16, num_bytes=1400)
    part = evaluate_tokens(ours, text_ids, stride=16, max_windows=5, num_bytes=1400)
    again = evaluate_tokens(ours, text_ids, stride=16, max_windows=5, num_bytes=1400)
    assert part.windows == 5 and part == again
    assert 0 < part.tokens_scored < full.tokens_scored
    assert abs(part.loss - full.loss) < 0.5  # a sample of the same data
    # Bits per byte of a sample estimates the full value (bytes scaled by the share scored).
    assert part.bits_per_byte == pytest.approx(full.bits_per_byte, rel=0.05)
    assert evaluate_tokens(ours, text_ids, max_windows=10**6) == evaluate_tokens(ours, text_ids)


def test_restores_train_or_eval_mode_even_on_error(random_pair, text_ids):
    ours, _ = random_pair
    ours.train()
    try:
        evaluate_tokens(ours, text_ids[:100])
        assert ours.training
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            evaluate_tokens(ours, torch.tensor([1, 2, 60000, 3]))
        assert ours.training
    finally:
        ours.eval()
    evaluate_tokens(ours, text_ids[:100])
    assert not ours.training


def test_bfloat16_autocast_is_close_to_float32(random_pair, text_ids):
    ours, _ = random_pair
    fp32 = evaluate_tokens(ours, text_ids)
    bf16 = evaluate_tokens(ours, text_ids, dtype="bfloat16")
    assert bf16.tokens_scored == fp32.tokens_scored
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.02)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=0), "stride"), (dict(stride=SEQ + 1), "stride"),
    (dict(seq_len=SEQ + 1), "seq_len"), (dict(seq_len=1), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_windows=0), "max_windows"), (dict(dtype="int8"), "dtype"),
    (dict(device="cuda"), "device"), (dict(num_bytes=0), "num_bytes"),
])
def test_bad_arguments_raise_value_error(random_pair, text_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_tokens(random_pair[0], text_ids, **kwargs)


@pytest.mark.parametrize("tokens,match", [
    (torch.tensor([5]), "at least 2"), (torch.zeros(2, 4, dtype=torch.long), "1-D"),
    (np.zeros(5, dtype=np.float32), "integer"),
])
def test_bad_tokens_raise_value_error(random_pair, tokens, match):
    with pytest.raises(ValueError, match=match):
        evaluate_tokens(random_pair[0], tokens)


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_file_json_matches_the_function(tiny_checkpoint, tmp_path, capsys):
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[-1200:]
    sample = tmp_path / "sample.txt"
    sample.write_text(text, encoding="utf-8")
    tok = load_tokenizer("gpt2")
    ids = tok(text)["input_ids"]
    model, _ = load_model(tiny_checkpoint, device="cpu")
    table = byte_table(tok, np.array(ids), len(text.encode()), model.config.vocab_size)
    direct = evaluate_tokens(model, torch.tensor(ids), stride=16, num_bytes=len(text.encode()),
                             token_bytes=table)
    assert evaluate_lm.main(["--checkpoint", str(tiny_checkpoint), "--file", str(sample),
                             "--stride", "16", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_scored"] == direct.tokens_scored == len(ids) - 1
    assert report["loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert report["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-6)
    assert report["num_bytes"] == len(text.encode()) and report["stride"] == 16
    # every token but the first is scored: the text's bytes but the first token's
    assert report["bytes_scored_exact"] is True
    assert report["bytes_scored"] == len(text.encode()) - len(tok.decode(ids[:1]).encode())


def test_cli_dataset_split_text_report(tiny_checkpoint, tmp_path, capsys):
    """The training data options: --val_file through corpus/datasets.py, cached, text output."""
    val = tmp_path / "val.txt"
    val.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    args = ["--checkpoint", str(tiny_checkpoint), "--val_file", str(val), "--cache_dir",
            str(tmp_path / "cache"), "--batch_size", "3"]
    assert evaluate_lm.main(args) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert set(lines) == {"checkpoint", "data", "windows", "tokens scored", "loss",
                          "perplexity", "bits per byte"}
    assert "val split" in lines["data"]
    loss, ppl = float(lines["loss"].split()[0]), float(lines["perplexity"])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert any((tmp_path / "cache").iterdir())  # tokenized once, cached


def test_cli_process_prints_progress_and_report(tiny_checkpoint, tmp_path):
    """One real process: exit 0, the report on stdout, a tqdm bar over windows on stderr."""
    sample = tmp_path / "s.txt"
    sample.write_text("To be, or not to be, that is the question. " * 30)
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate_lm.py"), "--checkpoint", str(tiny_checkpoint),
         "--file", str(sample), "--device", "cpu"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "perplexity:" in proc.stdout and "bits per byte:" in proc.stdout
    assert "window" in proc.stderr and "Traceback" not in proc.stderr




def test_cli_errors_are_one_line_exit_2(tiny_checkpoint, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Some text to evaluate, long enough for a few windows. " * 10)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "run").mkdir()
    ck = str(tiny_checkpoint)
    base = ["--checkpoint", ck, "--file", str(good)]
    cases = {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope.pt"], "checkpoint not found"),
        "corrupt checkpoint": (["--checkpoint", tmp_path / "corrupt.pt"], "corrupt"),
        "empty run dir": (["--checkpoint", tmp_path / "run"], "no checkpoint"),
        "no checkpoint flag": (["--file", good], "--checkpoint"),
        "stride zero": ([*base, "--stride", "0"], "--stride"),
        "stride > seq_len": ([*base, "--stride", "64"], "stride"),
        "stride > --seq_len": ([*base, "--seq_len", "8", "--stride", "9"], "--stride"),
        "seq_len too long": ([*base, "--seq_len", "64"], "seq_len"),
        "batch size zero": ([*base, "--batch_size", "0"], "--batch_size"),
        "not an int": ([*base, "--stride", "two"], "invalid int value"),
        "bad dtype": ([*base, "--dtype", "int8"], "--dtype"),
        "bad split": (["--checkpoint", ck, "--split", "dev"], "--split"),
        "no cuda": ([*base, "--device", "cuda"], "CUDA is not available"),
        "bad device": ([*base, "--device", "tpu"], "device"),
        "missing file": (["--checkpoint", ck, "--file", tmp_path / "nope.txt"], "no such file"),
        "empty file": (["--checkpoint", ck, "--file", tmp_path / "empty.txt"], "0 token"),
        "not utf-8": (["--checkpoint", ck, "--file", tmp_path / "latin1.txt"], "not UTF-8"),
        "file and split": ([*base, "--split", "val"], "--file evaluates the whole file"),
        "shakespeare test": (["--checkpoint", ck, "--split", "test"], "only train and val"),
        "no data_dir": (["--checkpoint", ck, "--dataset", "wikitext", "--data_dir",
                         tmp_path / "nowhere"], "not a folder"),
        "missing val_file": (["--checkpoint", ck, "--val_file", tmp_path / "nope.txt"],
                             "no such file"),
        "bad tokenizer": ([*base, "--tokenizer", str(tmp_path / "no-tokenizer")],
                          "could not load tokenizer"),
    }
    assert_usage_errors(REPO / "evaluate_lm.py", cases, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert not (tmp_path / "lm_shakespeare").exists()  # no cache written by failed runs
