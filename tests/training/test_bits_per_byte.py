"""Bits per byte: the same model and text scored through different tokenizers' views agree with
a direct computation from per-token log-probabilities and the UTF-8 bytes of the scored text
(`training/byte_counts.py`, `training/evaluation.py`), and the figure reaches every report: the
progress line, `metrics.csv`, TensorBoard (tests/training/test_train_data.py), the snapshots and
`best.pt` (kept on resume), `evaluate_lm.py --json`, `bench/quality.py`'s table. A prepared
folder records its splits' byte counts; one whose manifest lacks it says so once.

Offline: GPT-2's bundled tokenizer, and a byte-level BPE and a character-level tokenizer built
here with the `tokenizers` library.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from train_helpers import write_text

import evaluate_lm
import prepare_data
from bench.quality import scores, table_lines, val_curve
from model.lm import LanguageModel
from model.loading import load_for_inference
from model.tokenizer import load_tokenizer
from training import train_lm
from training.byte_counts import byte_table, token_byte_lengths
from training.evaluation import evaluate_tokens
from training.metrics import read_metrics
from training.run_state import RunState

pytestmark = pytest.mark.usefixtures("one_thread")

ASCII = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
         "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
         "resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the "
         "people.\n")
# Multi-byte characters (2, 3 and 4 bytes in UTF-8), which byte-level tokens may cut in two.
UNICODE = ("First Citizen: the café's crème brûlée, naïve Grüße; 世界は舞台 🎭🎭, "
           "Ελληνικά and русский text.\n")
END = "<|end|>"


def _bpe(folder, text: str):
    """A 300-token byte-level BPE trained on `text` (end token id 0), loaded as the repo does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END).save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def _chars(text: str):
    """A character-level tokenizer (one token per character, no byte-level decoder)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {END: 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.decoder = decoders.Fuse()  # the characters joined as they are
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    corpus = write_text(root / "corpus.txt", 3000, seed=5).read_text() + ASCII + UNICODE
    return {"gpt2": load_tokenizer("gpt2"), "bpe": _bpe(root / "bpe", corpus),
            "chars": _chars(ASCII + UNICODE)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LanguageModel(vocab_size=50257, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                      max_seq_len=256, dropout=0.0)
    return m.eval()


def _direct(model, ids: list[int], window: int) -> tuple[float, list[int]]:
    """Bits of every target of non-overlapping windows of `window` tokens, from the model's own
    forward and log-softmax, and the positions of the tokens scored (all but each window's
    first)."""
    bits, scored = 0.0, []
    for begin in range(0, len(ids), window):
        chunk = torch.tensor(ids[begin:begin + window])
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None, :-1])[0].double(), dim=-1)
        bits -= float(logp[torch.arange(len(chunk) - 1), chunk[1:]].sum()) / math.log(2)
        scored += range(begin + 1, begin + len(chunk))
    return bits, scored


def _token_bytes(view: str, tok, text: str, ids: list[int], position: int) -> int:
    """The UTF-8 bytes of the token at `position`, found without our byte table: the character
    itself in the character view, else the token decoded alone (ASCII tokens only)."""
    if view == "chars":
        return len(text[position].encode())
    piece = tok.decode(ids[position:position + 1])
    assert piece.isascii()
    return len(piece.encode())


@pytest.mark.parametrize("view", ["gpt2", "bpe", "chars"])
@pytest.mark.parametrize("case", ["one window", "windows of 16"])
def test_views_agree_with_a_direct_computation(views, model, view, case):
    tok = views[view]
    # The character view has no byte table: its scored tokens count the text's mean bytes per
    # token, exact on ASCII text; the byte-level views are exact on any text.
    text = ASCII if view == "chars" or case != "one window" else ASCII[:80] + UNICODE
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) <= 256
    window = len(ids) if case == "one window" else 16
    num_bytes = len(text.encode())
    table = byte_table(tok, np.asarray(ids), num_bytes, 50257)
    assert (table is None) == (view == "chars")

    res = evaluate_tokens(model, torch.tensor(ids), seq_len=window, num_bytes=num_bytes,
                          token_bytes=table)
    bits, scored = _direct(model, ids, window)
    unscored = sorted(set(range(len(ids))) - set(scored))
    assert unscored == list(range(0, len(ids), window))
    scored_bytes = num_bytes - sum(_token_bytes(view, tok, text, ids, p) for p in unscored)
    assert res.tokens_scored == len(scored)
    assert res.bytes_scored == pytest.approx(scored_bytes, abs=1e-9)
    assert res.bits_per_byte == pytest.approx(bits / scored_bytes, rel=1e-6)


def test_the_views_differ_and_the_text_is_what_counts(views, model):
    """The same text through the three views: different token counts, the same bytes; the mean
    estimate (no table) is within one window's share of the exact figure."""
    text = ASCII + UNICODE
    n = {name: len(tok(text, add_special_tokens=False)["input_ids"]) for name, tok in
         views.items()}
    assert n["gpt2"] < n["bpe"] < n["chars"] == len(text)
    ids = views["gpt2"](text)["input_ids"]
    exact = evaluate_tokens(model, torch.tensor(ids), seq_len=16, num_bytes=len(text.encode()),
                            token_bytes=byte_table(views["gpt2"], ids, len(text.encode())))
    mean = evaluate_tokens(model, torch.tensor(ids), seq_len=16, num_bytes=len(text.encode()))
    assert exact.bytes_scored != mean.bytes_scored
    assert mean.bits_per_byte == pytest.approx(exact.bits_per_byte, rel=2 / 16)


def test_byte_table_rules(views):
    gpt2 = token_byte_lengths(views["gpt2"], 50304)
    assert len(gpt2) == 50304 and gpt2[50256] == 0 and gpt2[50300] == 0  # separator, padding
    assert gpt2[views["gpt2"].convert_tokens_to_ids("Ġthe")] == 4
    assert token_byte_lengths(views["chars"]) is None  # not byte-level
    ids = views["gpt2"]("To be, or not to be<|endoftext|>")["input_ids"]
    assert 50256 in ids  # a file's literal special token: the table spells too few bytes
    assert byte_table(views["gpt2"], ids, len(b"To be, or not to be<|endoftext|>")) is None
    assert byte_table(views["gpt2"], ids[:-1], len(b"To be, or not to be")) is not None
    assert byte_table(views["gpt2"], ids[:-1], None) is None
    with pytest.raises(ValueError, match="token_bytes"):
        evaluate_tokens(LanguageModel(vocab_size=50257, d_model=16, num_heads=2, num_layers=1,
                                      d_ff=32, max_seq_len=16),
                        torch.tensor(ids[:-1]), num_bytes=19, token_bytes=np.ones(300))


# -- prepared data, the trainer and evaluate_lm.py -------------------------------------------------


MODEL = ["--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
         "--max_seq_len", "32", "--batch_size", "4", "--eval_windows", "0", "--warmup_steps", "2",
         "--lr", "3e-3", "--dropout", "0", "--no_plot", "--dtype", "float32", "--log_interval",
         "1", "--eval_interval", "2", "--save_interval", "100"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Shards prepared with a byte-level BPE; validation from a JSONL of multi-byte documents."""
    root = tmp_path_factory.mktemp("prepared")
    train = write_text(root / "train.txt", 3000, seed=3)
    tok = _bpe(root / "tok", train.read_text() + UNICODE)
    docs = [f"{UNICODE.strip()} {i}\n" + write_text(root / f"d{i}.txt", 40, seed=i).read_text()
            for i in range(12)]
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert prepare_data.main([str(train), "--out", str(root / "data"), "--tokenizer",
                              str(root / "tok"), "--val_source", str(root / "val.jsonl"),
                              "--no_progress", "--num_proc", "1"]) == 0
    return dict(root=root, data=root / "data", tok=tok, docs=docs)


def test_prepared_split_records_its_bytes_and_the_table_spells_them(prepared):
    from corpus.datasets import DataArgs, load_split

    manifest = json.loads((prepared["data"] / "manifest.json").read_text())
    val_bytes = sum(len(d.encode()) for d in prepared["docs"])
    assert manifest["splits"]["val"]["bytes"] == val_bytes
    tokens, num_bytes = load_split(DataArgs(data=str(prepared["data"]),
                                            tokenizer=str(prepared["root"] / "tok")), "val")
    assert num_bytes == val_bytes
    eot = prepared["tok"].eos_token_id
    assert int((tokens[:] == eot).sum()) == len(prepared["docs"]) - 1  # separators: 0 bytes
    assert byte_table(prepared["tok"], tokens, num_bytes, 300) is not None


def _val_lines(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in
            re.finditer(r"step (\d+) \| val loss [\d.]+ \| ppl [\d.]+ \| ([\d.]+) bits/byte", out)}


def test_trainer_reports_it_everywhere_and_resume_keeps_it(prepared, tmp_path, capsys,
                                                            monkeypatch):
    run = tmp_path / "run"
    flags = ["--data", str(prepared["data"]), "--out_dir", str(run), *MODEL]
    monkeypatch.setenv("LM_MAX_STEPS", "4")
    assert train_lm.main([*flags, "--max_steps", "6"]) == 0
    out = capsys.readouterr().out
    shown = _val_lines(out)
    rows = {int(r["step"]): r for r in read_metrics(run / "metrics.csv") if r["kind"] == "val"}
    assert sorted(shown) == sorted(rows) == [2, 4]
    for step, row in rows.items():  # metrics.csv's column is what the progress line showed
        assert f"{float(row['bits_per_byte']):.3f}" == shown[step]

    best = torch.load(run / "snapshots" / "best.pt", weights_only=True)
    best_step = min(rows, key=lambda s: float(rows[s]["loss"]))
    assert best["step"] == best_step
    assert best["val_bpb"] == best["best_val_bpb"] == float(rows[best_step]["bits_per_byte"])
    assert f"{best['best_val_bpb']:.3f} bits/byte" in out.splitlines()[-2]  # the "done:" line
    loaded = load_for_inference(str(run / "snapshots" / "best.pt"), device="cpu")
    assert f"{best['val_bpb']:.4g} bits/byte" in loaded.describe()

    # evaluate_lm.py on best.pt, every window of 32 as the trainer did: the same figure
    assert evaluate_lm.main(["--checkpoint", str(run / "snapshots" / "best.pt"), "--data",
                             str(prepared["data"]), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_scored_exact"] is True and report["seq_len"] == 32
    assert report["bits_per_byte"] == pytest.approx(best["val_bpb"], rel=1e-6)

    # Resume, and make its evaluation worse than the best: the best figure is kept from the
    # snapshot into the next one and into the closing line.
    from training.loop import Trainer

    real = Trainer.validation_loss

    def worse(self, max_windows):
        res = real(self, max_windows)
        res.loss, res.bits_per_byte = res.loss + 1.0, res.bits_per_byte + 1.0
        return res

    monkeypatch.setattr(Trainer, "validation_loss", worse)
    monkeypatch.delenv("LM_MAX_STEPS")
    assert train_lm.main(["--out_dir", str(run), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    latest = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    assert latest["step"] == 6 and latest["best_val_bpb"] == best["best_val_bpb"]
    assert latest["val_bpb"] == pytest.approx(float(read_metrics(run / "metrics.csv")[-1]
                                                     ["bits_per_byte"]))
    assert latest["val_bpb"] > latest["best_val_bpb"] + 0.5
    assert f"best val loss {best['best_val_loss']:.4f}, {best['best_val_bpb']:.3f} bits/byte" \
        in out


def test_a_manifest_without_byte_counts_says_so_once(prepared, tmp_path, capsys):
    import shutil

    data = tmp_path / "old"
    shutil.copytree(prepared["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    for split in manifest["splits"].values():
        del split["bytes"]
        for shard in split["shards"]:
            del shard["bytes"]
    (data / "manifest.json").write_text(json.dumps(manifest))

    run = tmp_path / "run"
    assert train_lm.main(["--data", str(data), "--out_dir", str(run), *MODEL,
                          "--max_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("bits per byte is unavailable") == 1 and "bits/byte" not in out
    assert [r["bits_per_byte"] for r in read_metrics(run / "metrics.csv")
            if r["kind"] == "val"] == [""]
    snap = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    assert snap["val_bpb"] is None and snap["best_val_bpb"] is None and snap["val_loss"] > 0

    assert evaluate_lm.main(["--checkpoint", str(run), "--data", str(data), "--device",
                             "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["bits_per_byte"] is None and report["num_bytes"] is None
    assert captured.err.count("bits per byte is unavailable") == 1
    assert evaluate_lm.main(["--checkpoint", str(run), "--data", str(data), "--device",
                             "cpu"]) == 0
    assert "bits per byte: unavailable" in capsys.readouterr().out


def test_run_state_round_trips_bits_per_byte_and_old_snapshots_have_none():
    from corpus.batches import EpochBatches

    batches = EpochBatches(np.arange(2000, dtype=np.uint16) % 500, 32, 4, 1, 1, 0, 1)
    state = RunState(step=7, best_val=4.25, last_val=(4.5, 90.0, 6), last_bpb=2.1,
                     best_bpb=2.05)
    saved = {**state.fields(batches, seed=1), "epoch": 0}
    assert saved["val_bpb"] == 2.1 and saved["best_val_bpb"] == 2.05
    assert RunState.from_snapshot(saved, batches, 1, say=print) == state
    old = RunState.from_snapshot({"step": 5, "epoch": 0, "val_loss": 5.0}, batches, 1,
                                 say=lambda s: None)
    assert old.last_bpb is None and old.best_bpb is None


def test_quality_bench_reports_bits_per_byte():
    """bench/quality.py's parsing of evaluate_lm.py --json and its table (no runs)."""
    report = {"loss": 4.5, "perplexity": 90.0, "bits_per_byte": 2.1}
    ours = {"name": "ours", "plan": {"step_s": 0.8, "steps": 600}, "train_min": 8.6,
            "wall_s": 563.0, **scores(report)}
    ref = {**ours, "name": "reference", **scores({**report, "loss": 5.0,
                                                   "bits_per_byte": 2.3})}
    header, row_ours, row_ref, summary, note = table_lines([ours, ref])
    assert header.split()[8:11] == ["val", "loss", "bits/byte"]
    assert row_ours.split()[5:7] == ["4.5000", "2.1000"]
    assert row_ref.split()[5:7] == ["5.0000", "2.3000"]
    # runs compare in bits per byte (any tokenizers), in nats per token only without them
    assert summary == "ours is 0.2000 bits/byte lower than reference"
    assert "nats per token do not" in note
    # the lower of the two is named first, whichever recipe came first
    assert table_lines([ref, ours])[-2] == "ours is 0.2000 bits/byte lower than reference"
    old = {**ref, **scores({"loss": 5.0, "perplexity": 148.4})}  # no bits per byte recorded
    lines = table_lines([ours, old])
    assert lines[2].split()[6] == "n/a"
    assert lines[3] == "ours is 0.5000 nats/token lower than reference"
    rows = [{"kind": "val", "elapsed_s": "60", "loss": "4.5", "bits_per_byte": "2.1"},
            {"kind": "train", "elapsed_s": "61", "loss": "4.4", "bits_per_byte": ""}]
    assert val_curve(rows) == [(1.0, 2.1)]
    assert val_curve([{**rows[0], "bits_per_byte": ""}]) == [(1.0, 4.5)]

