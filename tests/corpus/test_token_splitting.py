"""Token splitting (`--split_tokens`, corpus/token_splitting.py): every split token is the merge
that made it, a split row is the same text in as many tokens, the draws are seeded by the batch's
position (so a resume sees the same batches: tests/training/test_resume.py), unseen-token sharing
counts the split parts as seen, and a tokenizer without merges gets one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_cases import assert_usage_errors
from train_helpers import tiny_flags

from corpus.batches import EpochBatches
from corpus.encoders import load_encoder
from corpus.shards import DataError
from corpus.sources import resolve_local
from corpus.token_splitting import TokenSplitter, has_merges, merge_parents
from corpus.tokenizer_training import TokenizerTrainConfig, train_tokenizer
from training.config import resolve_config
from training.options import parse_args

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> str:
    """A 400-token byte-level BPE trained on 100 KB of Tiny Shakespeare."""
    out = tmp_path_factory.mktemp("split-tok") / "tok"
    train_tokenizer(TokenizerTrainConfig(sources=[resolve_local(str(SHAKESPEARE), None, "text")],
                                         out=out, vocab_size=400, held_out=0,
                                         max_bytes=100_000, progress=False))
    return str(out)


def _token_bytes(enc, i: int) -> bytes:
    return enc.decode([int(i)]).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("name", ["gpt2", "own"])
def test_each_token_splits_into_the_merge_that_made_it(name, own):
    tokenizer = own if name == "own" else name
    enc = load_encoder(tokenizer)
    left, right = merge_parents(tokenizer)
    merged = np.flatnonzero(left >= 0)
    assert len(merged) == enc.vocab_size - 256 - 1  # all but the bytes and <|endoftext|>
    assert left[enc.eot_id] == right[enc.eot_id] == -1
    assert (left[:256] == -1).all() if name == "own" else True
    # decoded through the tokenizer: left + right spell the child, byte for byte
    raw = enc._impl if enc._kind == "tiktoken" else None
    for child in merged[:: max(1, len(merged) // 300)]:
        if raw is not None:
            parts = raw.decode_single_token_bytes(int(left[child])) + \
                raw.decode_single_token_bytes(int(right[child]))
            assert parts == raw.decode_single_token_bytes(int(child))
        else:
            assert enc.decode([int(left[child]), int(right[child])]) == enc.decode([int(child)])


def test_a_split_row_is_the_same_text_in_as_many_tokens(own):
    enc = load_encoder(own)
    text = SHAKESPEARE.read_text(encoding="utf-8")[200_000:230_000]
    rows = enc.encode(text).astype(np.int64)[: 8 * 65].reshape(8, 65)
    splitter = TokenSplitter.for_tokenizer(own, 0.3)
    out = splitter.split_rows(rows, np.random.default_rng(0))
    assert out.shape == rows.shape and out.dtype == np.int64
    assert (out != rows).any(axis=1).all()  # at 0.3 every row of 65 tokens changes
    for canonical, split in zip(rows, out, strict=True):
        whole = enc.decode(canonical.tolist())
        assert whole.startswith(enc.decode(split.tolist()))
    # longer: as many tokens cover less text
    assert sum(len(enc.decode(r.tolist())) for r in out) < sum(len(enc.decode(r.tolist()))
                                                                for r in rows)
    # the same generator state gives the same rows; another seed other rows
    again = splitter.split_rows(rows, np.random.default_rng(0))
    assert np.array_equal(out, again)
    assert not np.array_equal(out, splitter.split_rows(rows, np.random.default_rng(1)))
    # the split is recursive: a part of a split is split again (some tokens reach bytes)
    deep = TokenSplitter.for_tokenizer(own, 0.9).split_rows(rows, np.random.default_rng(0))
    assert (deep < 256).mean() > 0.8
    assert np.array_equal(TokenSplitter.for_tokenizer(own, 0.0).split_rows(rows, None), rows)


def test_batches_are_seeded_by_their_position(own):
    enc = load_encoder(own)
    tokens = enc.encode(SHAKESPEARE.read_text(encoding="utf-8")[:40_000]).astype(np.uint16)
    splitter = TokenSplitter.for_tokenizer(own, 0.2)
    plain = EpochBatches(tokens, 32, 4, seed=3)
    split = EpochBatches(tokens, 32, 4, seed=3, splitter=splitter)
    x, y = split.get(1, 2, 0)
    x2, y2 = EpochBatches(tokens, 32, 4, seed=3, splitter=splitter).get(1, 2, 0)
    assert x.equal(x2) and y.equal(y2)  # a new loader (a resumed run): the same batch
    assert x[:, 1:].equal(y[:, :-1])  # targets are the inputs shifted, after the split
    px, _ = plain.get(1, 2, 0)
    assert not x.equal(px)
    assert not x.equal(split.get(1, 3, 0)[0])
    for row, canonical in zip(x.tolist(), px.tolist(), strict=True):
        assert enc.decode(canonical).startswith(enc.decode(row[:8]))


def test_reachable_is_closed_under_splitting(own):
    splitter = TokenSplitter.for_tokenizer(own, 0.1)
    seen = np.zeros(400, dtype=bool)
    seen[[300, 350, 399]] = True
    closed = splitter.reachable(seen)
    assert closed[[300, 350, 399]].all() and closed.sum() > 3
    has = np.flatnonzero(closed & (splitter.left >= 0))
    assert closed[splitter.left[has]].all() and closed[splitter.right[has]].all()
    assert not closed[np.setdiff1d(np.arange(256, 400), np.flatnonzero(closed))].any()


def test_a_tokenizer_without_merges_is_one_line_or_off_for_a_preset(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"<eos>": 0, "[UNK]": 1, "the": 2, "king": 3},
                                unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    folder = str(tmp_path / "words")
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>",
                            unk_token="[UNK]").save_pretrained(folder)
    with pytest.raises(DataError, match="needs a BPE tokenizer with merges") as info:
        merge_parents(folder)
    assert "\n" not in str(info.value) and not has_merges(folder) and has_merges("gpt2")
    # the preset's --split_tokens is turned off, with a note; one given stays (and then fails
    # in one line when the run builds its batches, as above)
    for argv, expect in ((["--preset", "cpu-10min"], 0.0),
                         (["--preset", "cpu-10min", "--split_tokens", "0.05"], 0.05)):
        notes: list[str] = []
        args, explicit = parse_args([*argv, "--tokenizer", folder, *tiny_flags(tmp_path)])
        config = resolve_config(args, explicit, world_size=1, say=notes.append).config
        assert config.batch.split_tokens == expect
        assert any("--split_tokens off" in n for n in notes) == (expect == 0.0)


def test_bad_split_tokens_flags_are_one_line_exit_2(tmp_path, own):
    assert_usage_errors(REPO / "training" / "train_lm.py", {
        "one": (tiny_flags(tmp_path, "--split_tokens", "1"), "--split_tokens must be in [0, 1)"),
        "negative": (tiny_flags(tmp_path, "--split_tokens", "-0.1"), "--split_tokens"),
    }, tmp_path)
