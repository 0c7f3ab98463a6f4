"""The bundled GPT-2 tokenizer (offline, byte-identical to OpenAI's) and UTF-8-safe detokenizing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from model.textstream import Detokenizer, StopFilter
from model.tokenizer import BUNDLED_GPT2_DIR, TokenizerLoadError, load_tokenizer

REPO = BUNDLED_GPT2_DIR.parents[2]

# OpenAI's released encoder.json / vocab.bpe (see ../shared/README.md).
SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

TEXT = "Hello world! Ünïcödé: 你好, 日本語テキスト, emoji 🙂👍🏽, and a\ttab.\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.mark.parametrize("name", sorted(SHA256))
def test_bundled_files_are_openais(name):
    digest = hashlib.sha256((BUNDLED_GPT2_DIR / name).read_bytes()).hexdigest()
    assert digest == SHA256[name]


def test_bundled_tokenizer(tok):
    assert len(tok) == 50257
    assert tok.eos_token_id == 50256 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level BPE is lossless
    assert load_tokenizer("gpt2") is tok  # loaded once per process


def test_guide_literal_from_pretrained_offline(hf_home, tmp_path):
    """The guide's `GPT2Tokenizer.from_pretrained("gpt2")`, with no network, from an HF cache.

    Also: an unknown tokenizer name gives a one-line `TokenizerLoadError` when offline.
    """
    code = f"""
import json
from transformers import GPT2Tokenizer
from model.tokenizer import TokenizerLoadError, load_tokenizer

tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
tokenizer.pad_token = tokenizer.eos_token
try:
    load_tokenizer("no-such-user/no-such-tokenizer")
    err = None
except TokenizerLoadError as exc:
    err = str(exc)
print(json.dumps(dict(ids=tokenizer.encode({TEXT!r}), n=len(tokenizer),
                      pad=tokenizer.pad_token_id, err=err)))
"""
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids"] == load_tokenizer("gpt2").encode(TEXT)
    assert out["n"] == 50257 and out["pad"] == 50256
    assert out["err"] is not None and "\n" not in out["err"]
    assert "no-such-user/no-such-tokenizer" in out["err"] and "--tokenizer gpt2" in out["err"]


def test_folder_without_tokenizer_files_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(tmp_path / "empty"))
    assert "\n" not in str(info.value) and "empty" in str(info.value)


# -- incremental, UTF-8-safe detokenizing -----------------------------------------------------


def _pieces(tok, ids, prefix=()):
    detok = Detokenizer(tok, prefix_ids=prefix)
    return [detok.feed(i) for i in ids] + [detok.flush()]


def test_split_characters_are_printed_whole(tok):
    ids = tok.encode(TEXT)
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in naive)  # GPT-2 does split these characters across tokens
    pieces = _pieces(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == TEXT
    assert "你" in pieces and "👍" not in "".join(naive)


def test_concatenation_equals_decode_for_any_ids(tok):
    """Random ids (invalid UTF-8 included, special token included) decode exactly as HF does."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) if rng.random() < 0.5 else rng.randrange(100, 300)
               for _ in range(rng.randint(1, 25))]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids) + 1), tok.eos_token_id)
        pieces = _pieces(tok, ids)
        ref = tok.decode(ids)
        assert "".join(pieces) == ref, ids
        if "\ufffd" not in ref:
            assert not any("\ufffd" in p for p in pieces[:-1]), ids


def test_prefix_conditions_but_is_not_returned(tok):
    ids = tok.encode("abc 你好 def")
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))
    rest = "".join(_pieces(tok, ids[cut:], prefix=ids[:cut]))
    assert tok.decode(ids[:cut]).rstrip("\ufffd") + rest == "abc 你好 def"


class _CharTokenizer:
    """A non-byte-level tokenizer (one id per character) for the generic path."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_generic_tokenizer_path():
    text = "héllo wörld"
    pieces = _pieces(_CharTokenizer(), [ord(c) for c in text], prefix=[ord(">")])
    assert "".join(pieces) == text and pieces[1] == "é"


# -- stop strings -------------------------------------------------------------------------------


def _stop_stream(parts, stops):
    f = StopFilter(stops)
    out = [f.feed(p) for p in parts]
    return "".join(out) + f.flush(), f


@pytest.mark.parametrize("parts, stops, expected, stopped", [
    (["Hello", " wor", "ld\n", "next"], ["\n"], "Hello world", True),
    (["ab", "c", "END", "x"], ["END"], "abc", True),
    (["ab", "cE", "N", "D!"], ["END"], "abc", True),  # a stop string split across pieces
    (["x", "EN", "y"], ["END"], "xENy", False),  # a partial match is released
    (["abcd"], ["abcd", "bc"], "a", True),  # the first one completed wins
    (["a", "b"], [], "ab", False),
])
def test_stop_filter(parts, stops, expected, stopped):
    text, f = _stop_stream(parts, stops)
    assert text == expected and f.stopped is stopped


def test_stop_filter_holds_back_only_what_could_start_a_stop():
    f = StopFilter(["<END>"])
    assert f.feed("abc<E") == "abc"
    assert f.feed("Z") == "<EZ"
    assert f.feed("<END> more") == "" and f.stopped and f.matched == "<END>"
    assert f.feed("ignored") == "" and f.flush() == ""
