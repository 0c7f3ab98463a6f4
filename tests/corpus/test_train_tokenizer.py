"""train_tokenizer.py: a byte-level BPE trained on the sources prepare_data.py reads; any text
round-trips byte for byte; the same source gives the same files whatever the thread count; the
summary's figures are the held-out sample's; bad input is one line, exit 2, nothing written
(corpus/tokenizer_training.py). Prepare, train, generate, serve, evaluate and the GGUF export
with such a tokenizer: tests/training/test_own_tokenizer.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_cases import assert_usage_errors
from text_cases import hard_texts

import train_tokenizer
from corpus.encoders import load_encoder
from corpus.tokenizer_training import (
    EOT,
    TokenizerTrainConfig,
    new_tokenizer,
    split_text,
)
from corpus.tokenizer_training import train_tokenizer as train

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
VOCAB = 1024


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tokenizer trained by the command on Tiny Shakespeare and a JSONL file of hard texts
    (two sources, read in order), with what it printed."""
    root = tmp_path_factory.mktemp("train-tok")
    records = root / "hard.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in hard_texts() if t))
    out = root / "tok"
    argv = [str(SHAKESPEARE), str(records), "--vocab_size", str(VOCAB), "--out", str(out),
            "--special_tokens", "<|im_start|>", "<|im_end|>", "--no_progress"]
    proc = subprocess.run([sys.executable, str(REPO / "train_tokenizer.py"), *argv], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAYON_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoTokenizer

    return dict(root=root, out=out, argv=argv, stdout=proc.stdout, records=records,
                tok=AutoTokenizer.from_pretrained(str(out)))


def test_the_folder_is_a_gpt2_style_tokenizer(trained):
    tok = trained["tok"]
    assert len(tok) == VOCAB and sorted(_files(trained["out"])) == ["tokenizer.json",
                                                                    "tokenizer_config.json"]
    assert tok.eos_token == tok.bos_token == EOT and tok.eos_token_id == 0
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    spec = json.loads((trained["out"] / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                     "trim_offsets": True, "use_regex": True}
    assert spec["decoder"]["type"] == "ByteLevel" and spec["normalizer"] is None
    assert len(spec["model"]["merges"]) == VOCAB - 256 - 3
    config = json.loads((trained["out"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # Learnt from the text: Shakespeare's words are single tokens.
    assert len(tok.encode(" the")) == len(tok.encode(" thou")) == 1
    from model.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name(spec) == "gpt-2"  # llama.cpp's name for GPT-2's split


@pytest.mark.parametrize("index", range(len(hard_texts())))
def test_any_text_round_trips_byte_for_byte(trained, index):
    """decode(encode(x)) == x through transformers (what the scripts use), the `tokenizers`
    backend and the data preparation's encoder."""
    text = hard_texts()[index]
    tok = trained["tok"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))  # never more tokens than bytes
    enc = load_encoder(str(trained["out"]))
    assert enc.decode(enc.encode(text)) == text
    literal = f"a {EOT} b<|im_end|>"  # special tokens written in the text survive too
    assert tok.decode(tok.encode(text + literal)) == text + literal


def test_the_same_source_gives_the_same_files_whatever_the_threads(trained, tmp_path):
    """The fixture trained on one thread; this trains on every core, in this process."""
    again = tmp_path / "again"
    argv = [*trained["argv"]]
    argv[argv.index("--out") + 1] = str(again)
    assert train_tokenizer.main(argv) == 0
    assert _files(again) == _files(trained["out"])


def test_summary_figures_are_the_held_out_samples(trained):
    """The printed figures are recomputed here: every 20th piece of the text (the default
    --held_out 0.05) is held out, never trained on, and encoded with both tokenizers."""
    texts = [SHAKESPEARE.read_text(encoding="utf-8"),
             *(json.loads(line)["text"] for line in trained["records"].read_text().splitlines())]
    pieces = [p for t in texts for p in split_text(t)]
    held = [p for i, p in enumerate(pieces) if int((i + 1) * 0.05) > int(i * 0.05)]
    nbytes = sum(len(p.encode("utf-8")) for p in held)
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert 0.04 < nbytes / total < 0.06
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(trained["out"] / "tokenizer.json"))
    ours.encode_special_tokens = True
    n_ours = sum(len(ours.encode(p).ids) for p in held)
    n_gpt2 = sum(len(load_encoder("gpt2").encode(p)) for p in held)
    out = trained["stdout"]
    assert f"{nbytes / n_ours:.3f} bytes per token, GPT-2's 50,257 tokens " \
           f"{nbytes / n_gpt2:.3f} ({n_ours:,} tokens against {n_gpt2:,}" in out, out
    assert f"of {VOCAB:,} tokens (256 bytes, 3 special, {VOCAB - 259:,} merges)" in out
    assert "peak memory" in out and f"--tokenizer {trained['out']}" in out


def test_pieces_split_words_as_the_whole_text_does():
    """The text reaches the trainer in pieces cut only where GPT-2's pre-tokenizer splits, so
    the word counts are the whole text's."""
    pre = new_tokenizer().pre_tokenizer
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000] + "\n".join(hard_texts())
    for size in (7, 64, 1000):
        pieces = list(split_text(text, size))
        assert "".join(pieces) == text and len(pieces) > len(text) // (size * 5)
        words = [w for p in pieces for w, _ in pre.pre_tokenize_str(p)]
        assert words == [w for w, _ in pre.pre_tokenize_str(text)]
    assert list(split_text("x" * 100, 10)) == ["x" * 100]  # nowhere to cut: one piece
    assert list(split_text("")) == []


def test_max_bytes_and_no_held_out(tmp_path):
    summary = train(TokenizerTrainConfig(
        sources=[_source(SHAKESPEARE)], out=tmp_path / "tok", vocab_size=300, held_out=0,
        max_bytes=200_000, progress=False))
    assert summary.held_out_bytes == summary.held_out_tokens == 0
    assert 200_000 <= summary.train_bytes < 200_000 + 5 * 4096
    assert summary.vocab_size == 300 and (tmp_path / "tok" / "tokenizer.json").is_file()
    assert not any("held-out sample" in line for line in summary.lines())


def _source(path: Path):
    from corpus.sources import resolve_local

    return resolve_local(str(path), None, "text")


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be, that is the question\n" * 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine text\n\xff\xfe broken\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    src = str(SHAKESPEARE)
    cases = {
        "below the byte alphabet": ([src, "--vocab_size", "256", "--out", out],
                                    "--vocab_size 256 is below the byte alphabet: at least 257"),
        "below, with specials": ([src, "--vocab_size", "258", "--out", out,
                                  "--special_tokens", "<a>", "<b>"], "at least 259"),
        "above what the text supports": ([small, "--vocab_size", "5000", "--out", out],
                                          "the text supports only "),
        "empty source": ([empty, "--vocab_size", "300", "--out", out], "no text to train on"),
        "missing source": ([tmp_path / "no-such.txt", "--vocab_size", "300", "--out", out],
                           "no such file, folder or glob"),
        "missing file named like a hub dataset": (["data/no-such.txt", "--vocab_size", "300",
                                                   "--out", out], "no such file"),
        "existing folder": ([src, "--vocab_size", "300", "--out", full], "pass --force"),
        "invalid utf-8": ([bad_utf8, "--vocab_size", "300", "--out", out], "UTF-8"),
        "held_out too big": ([src, "--vocab_size", "300", "--out", out, "--held_out", "0.9"],
                             "--held_out"),
        "repeated special": ([src, "--vocab_size", "300", "--out", out, "--special_tokens",
                              EOT], "given once"),
        "no vocab_size": ([src, "--out", out], "--vocab_size"),
        "zero vocab_size": ([src, "--vocab_size", "0", "--out", out], "positive integer"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_usage_errors(REPO / "train_tokenizer.py", cases, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no temporary one
    assert _files(full) == {"keep.txt": b"mine"}
    # What the text supports is named, and asking for exactly that works.
    err = subprocess.run([sys.executable, str(REPO / "train_tokenizer.py"), str(small),
                          "--vocab_size", "5000", "--out", str(out), "--held_out", "0"],
                         capture_output=True, text=True).stderr
    supported = int(err.split("supports only ")[1].split(" ")[0].replace(",", ""))
    assert train_tokenizer.main([str(small), "--vocab_size", str(supported), "--out", str(out),
                                 "--held_out", "0", "--no_progress"]) == 0
    # --force replaces a folder whole.
    assert train_tokenizer.main([str(small), "--vocab_size", "260", "--out", str(full),
                                 "--force", "--no_progress"]) == 0
    assert sorted(_files(full)) == ["tokenizer.json", "tokenizer_config.json"]


def test_progress_off_a_terminal_is_a_line_now_and_then(capsys):
    from corpus.tokenizer_training import _LogLines

    lines = _LogLines(total=2000, every=0.0)
    lines.update(500)
    lines.update(500)
    lines.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and lines.shown
    assert err[1].startswith("reading and counting words: 1.00 KB of 2.00 KB (50%), ")
    quiet = _LogLines(total=None)  # the default: a line every 30 s, none for a short read
    quiet.update(10)
    assert capsys.readouterr().err == "" and not quiet.shown
