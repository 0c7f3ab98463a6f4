"""Training and evaluation text: which prepared data folder a run reads, and its splits.

Every split comes from token shards made by `corpus.prepare` (the one data path):

- `--data DIR`: a folder made by `prepare_data.py` (any corpus: hub datasets, JSONL, Parquet,
  text...), read memory-mapped, never whole.
- The built-in datasets, prepared into the run's cache (`<cache_dir>/<label>.<tokenizer>/`) the
  first time and whenever the source, the split rule or the tokenizer changes:
  - `shakespeare` (default): Tiny Shakespeare, bundled as `data/tinyshakespeare.txt`, split
    90/10 by characters as nanoGPT does (301,966 / 36,059 GPT-2 tokens). No test split.
  - `wikitext` / `wikitext103`: WikiText-2 / WikiText-103 (raw). `--data_dir DIR` holding
    `train.txt`, `valid.txt`, `test.txt` (or `wiki.{train,valid,test}.tokens` / `.raw`), else
    the Hugging Face dataset, streamed (`pip install datasets`, online once). Each article is a
    document.
  - `--train_file` / `--val_file` / `--test_file`: any UTF-8 text, overriding that split, each
    file one document. Without `--val_file`, the last 10% of `--train_file` (by characters) is
    held out for validation.

`DataArgs` names the data (the flags of `add_data_args`); `load_split(data, split)` returns the
split's tokens (`TokenShards`) and the UTF-8 size of the text they encode (for bits per byte).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.encoders import EncoderError, tokenizer_fingerprint
from corpus.prepare import PrepareConfig, Stream, prepare
from corpus.shards import DataError, TokenShards, open_split, read_manifest
from corpus.sources import HubDataset, LocalFiles

__all__ = ["DataArgs", "DataError", "add_data_args", "dataset_label", "default_cache_dir",
           "describe_split", "load_split", "no_bytes_note", "adopt_data_tokenizer", "data_folder",
           "split_source"]

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare.txt"
SPLITS = ("train", "val", "test")
DATASETS = ("shakespeare", "wikitext", "wikitext103")
_HF_CONFIGS = {"wikitext": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}
_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_DIR_FILES = {
    "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
    "val": ("valid.txt", "val.txt", "validation.txt", "wiki.valid.tokens", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
_LOCAL_FLAGS = ("train_file", "val_file", "test_file", "data_dir")


@dataclass(frozen=True)
class DataArgs:
    """Which data a run or an evaluation reads (the flags of `add_data_args`).

    Attributes:
        data: a folder of token shards made by `prepare_data.py` (`--data`), or None.
        dataset: the built-in dataset (`--dataset`).
        data_dir, train_file, val_file, test_file: local text for the built-in data.
        tokenizer: the tokenizer name or folder the splits are encoded with.
        train_tokenizer: N > 0: train a BPE of N tokens on the training split and encode with
            it (`corpus.split_tokenizer`; training only, resolved into `tokenizer`).
        cache_dir: where the built-in data's shards go (None: `<out_dir>/cache`).
        out_dir: the run directory whose `cache/` holds them (None: `lm_<label>`).
    """

    data: str | None = None
    dataset: str = "shakespeare"
    data_dir: str | None = None
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    tokenizer: str = "gpt2"
    cache_dir: str | None = None
    out_dir: str | None = None
    train_tokenizer: int = field(default=0, metadata={"saved_if_set": True})

    def __post_init__(self) -> None:
        if self.train_tokenizer < 0:
            raise DataError(f"--train_tokenizer must be >= 0 (0: none), got {self.train_tokenizer}")

    @classmethod
    def from_dict(cls, flags: Mapping[str, Any]) -> DataArgs:
        """The data named by `flags` (e.g. `vars()` of parsed flags); absent or None values take
        their defaults, other keys are ignored."""
        given = {f.name: flags[f.name] for f in dataclasses.fields(cls)
                 if flags.get(f.name) is not None}
        return cls(**{k: int(v) if k == "train_tokenizer" else str(v) for k, v in given.items()})

    @property
    def label(self) -> str:
        """Short name of the data (`dataset_label`)."""
        return dataset_label(self)


def add_data_args(parser: argparse.ArgumentParser, train_tokenizer: bool = False) -> None:
    """Add the data flags shared by training and evaluation to `parser` (and training's
    `--train_tokenizer` when `train_tokenizer`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="a folder of token shards made by prepare_data.py (any corpus size)")
    g.add_argument("--dataset", choices=DATASETS, default="shakespeare",
                   help="built-in text to train/evaluate on (default: shakespeare, bundled)")
    g.add_argument("--data_dir", default=None,
                   help="folder with train.txt/valid.txt/test.txt (or wiki.*.tokens) for wikitext; "
                        "tinyshakespeare.txt or input.txt for shakespeare")
    g.add_argument("--train_file", default=None, help="any UTF-8 text file to train on")
    g.add_argument("--val_file", default=None,
                   help="UTF-8 text for validation (default with --train_file: its last 10%%)")
    g.add_argument("--test_file", default=None, help="UTF-8 text for the test split")
    g.add_argument("--tokenizer", default="gpt2",
                   help="tokenizer name or folder (default: gpt2, bundled)")
    g.add_argument("--cache_dir", default=None,
                   help="where the built-in datasets' shards go (default: <run dir>/cache)")
    if train_tokenizer:
        g.add_argument("--train_tokenizer", type=_tokens_or_none, default=0, metavar="N",
                       help="train a byte-level BPE of N tokens on the training split of text "
                            "data (the built-in data or --train_file; cached in --cache_dir) "
                            "and encode with it; 0: none. --tokenizer, --data and --init_from "
                            "name a tokenizer instead")


def _tokens_or_none(text: str) -> int:
    """`--train_tokenizer`: a vocabulary size, or 0 for none."""
    if not re.fullmatch(r"\d+", text.strip()):
        raise argparse.ArgumentTypeError(f"expected a vocabulary size (e.g. 4096) or 0, got "
                                         f"{text!r}")
    return int(text)


def dataset_label(data: DataArgs) -> str:
    """Short name of the data: the `--data` folder's name, 'custom' for --train_file, or the
    dataset."""
    if data.data:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.data).resolve().name) or "data"
    return "custom" if data.train_file else data.dataset or "shakespeare"


def default_cache_dir(data: DataArgs) -> Path:
    """`--cache_dir`, else `<out_dir>/cache`, else `lm_<label>/cache`."""
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(data.out_dir or f"lm_{dataset_label(data)}") / "cache"


def check_data_flags(data: DataArgs) -> None:
    """Raise DataError when `--data` is given with flags of the built-in data."""
    if not data.data:
        return
    clash = [f"--{n}" for n in _LOCAL_FLAGS if getattr(data, n)]
    if data.dataset not in (None, "shakespeare"):
        clash.append("--dataset")
    if clash:
        raise DataError(f"--data {data.data} is the whole data; drop {', '.join(clash)} (put "
                        "other text in with prepare_data.py)")


# -- the built-in datasets as preparations ------------------------------------------------------


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: no such file {str(p)!r}")
    return p


def _find_in_dir(data_dir: str, names: tuple[str, ...], dataset: str) -> Path:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"--data_dir {data_dir!r} is not a folder")
    for name in names:
        if (d / name).is_file():
            return d / name
    raise DataError(f"--data_dir {data_dir!r} has no {' or '.join(names)} for --dataset {dataset}; "
                    "add that file, or use --train_file/--val_file")


def _text(path: Path, title: str, char_range: tuple[float, float] | None = None,
          docs: str = "file") -> LocalFiles:
    return LocalFiles(str(path), [path], docs, char_range=char_range, title=title)


def split_source(data: DataArgs, split: str) -> LocalFiles | HubDataset | None:
    """The source of one split of the built-in data, or None when the data has no such split.

    Raises:
        DataError: the split is unavailable (with how to get it).
    """
    train_file = data.train_file
    explicit = {"train": train_file, "val": data.val_file, "test": data.test_file}[split]
    if explicit:
        return _text(_existing(explicit, f"--{split}_file"), f"file {explicit}")
    if train_file:  # custom text: hold out its tail for validation
        if split == "test":
            return None
        path = _existing(train_file, "--train_file")
        rule = (0.0, 0.9) if split == "train" else (0.9, 1.0)
        return _text(path, f"file {train_file}", rule)
    dataset = data.dataset or "shakespeare"
    data_dir = data.data_dir
    if dataset == "shakespeare":
        if split == "test":
            return None
        path = BUNDLED_SHAKESPEARE
        if data_dir:
            path = _find_in_dir(data_dir, ("tinyshakespeare.txt", "input.txt"), "shakespeare")
        rule = (0.0, 0.9) if split == "train" else (0.9, 1.0)
        return _text(_existing(path, "Tiny Shakespeare"), f"Tiny Shakespeare ({path})", rule)
    if data_dir:
        path = _find_in_dir(data_dir, _DIR_FILES[split], dataset)
        return _text(path, f"{dataset} {split} ({path})", docs="wikitext")
    return _hub_wikitext(dataset, split)


def _hub_wikitext(dataset: str, split: str) -> HubDataset:
    config = _HF_CONFIGS[dataset]
    hint = (f"; pass --data_dir DIR holding train.txt/valid.txt/test.txt (or wiki.*.tokens) of "
            f"{config}, or `pip install datasets` and run once with internet access")
    return HubDataset("wikitext", config, _HF_SPLITS[split], docs="wikitext", hint=hint)


def _missing_split(data: DataArgs, split: str) -> DataError:
    if data.train_file:
        return DataError(f"no {split} split for --train_file data; pass --{split}_file FILE")
    return DataError("Tiny Shakespeare has only train and val splits (90/10); evaluate on val, "
                     f"or pass --{split}_file FILE")


def _slug(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
        return name
    tail = re.sub(r"[^A-Za-z0-9_-]+", "_", name.rstrip("/\\").split("/")[-1])[-24:]
    return f"{tail}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _builtin_config(data: DataArgs, split: str) -> PrepareConfig:
    """The preparation of one split of the built-in data the flags name: its own folder,
    `<cache_dir>/<label>.<split>.<tokenizer>/`, so that a split is prepared only when it is used
    (and one whose source is absent, as WikiText's train split beside its test split, does not
    stop the others).

    Raises:
        DataError: the split is unavailable (with how to get it).
    """
    src = split_source(data, split)
    if src is None:
        raise _missing_split(data, split)
    tok = str(data.tokenizer or "gpt2")
    label = dataset_label(data)
    out = default_cache_dir(data) / f"{label}.{split}.{_slug(tok)}"
    big = isinstance(src, HubDataset) or (src.total_bytes or 0) > (64 << 20)
    return PrepareConfig(out=out, streams=[Stream(split, src)], tokenizer=tok, validation="",
                         command=f"corpus/datasets.py: the {split} split of the built-in data "
                                 f"{label!r}", progress=big, log=None, replace_stale=True)


def data_folder(data: DataArgs, split: str = "train") -> Path:
    """The prepared folder `data` names: `--data`, or the built-in data's cache (prepared now
    if needed).

    Raises:
        DataError: the data is unavailable, unprepared or unusable (one line).
    """
    check_data_flags(data)
    if data.data:
        read_manifest(data.data)
        return Path(data.data)
    cfg = _builtin_config(data, split)
    prepare(cfg)
    return cfg.out


def adopt_data_tokenizer(data: DataArgs, tokenizer_given: bool) -> DataArgs:
    """With `--data`, train with the folder's tokenizer; refuse another one given explicitly.

    Args:
        data: the run's data.
        tokenizer_given: `--tokenizer` was given on the command line.

    Returns:
        `data`, with the folder's tokenizer unless `tokenizer_given`.

    Raises:
        DataError: `--tokenizer` names another tokenizer than the folder was prepared with.
    """
    if not data.data:
        return data
    check_data_flags(data)
    manifest = read_manifest(data.data)
    if not tokenizer_given:
        data = dataclasses.replace(data, tokenizer=manifest["tokenizer"]["name"])
    check_tokenizer(data.data, manifest, data.tokenizer)
    return data


def check_tokenizer(directory: str | Path, manifest: dict[str, Any], tokenizer: str) -> None:
    """Raise DataError unless `tokenizer` is the one `manifest` was prepared with (its files)."""
    recorded = manifest.get("tokenizer") or {}
    try:
        same = tokenizer_fingerprint(str(tokenizer)) == recorded.get("files_sha256")
    except EncoderError as exc:
        raise DataError(str(exc)) from None
    if not same:
        raise DataError(f"{directory} was prepared with tokenizer {recorded.get('name')!r} "
                        f"(files sha256 {str(recorded.get('files_sha256'))[:12]}), but this run "
                        f"uses {tokenizer!r}: its ids would mean other tokens; use that tokenizer "
                        "or prepare the data again with this one")


def load_split(data: DataArgs, split: str) -> tuple[TokenShards, int | None]:
    """Token ids of one split, and the UTF-8 byte count of the text they encode.

    Args:
        data: which data (`DataArgs`).
        split: "train", "val" or "test".

    Returns:
        (tokens, num_bytes): the split's shards, memory-mapped, and the size of their text
        (None when the folder's manifest does not record it: `no_bytes_note`).

    Raises:
        DataError: the split is unavailable (with how to get it), empty, or not UTF-8.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    directory = data_folder(data, split)
    tok = str(data.tokenizer or "gpt2")
    try:
        manifest = read_manifest(directory)
        check_tokenizer(directory, manifest, tok)
        tokens = open_split(directory, split, manifest)
    except DataError:
        if data.data:
            raise
        _rebuild(data, split)  # the cache is damaged: make it again
        manifest = read_manifest(directory)
        tokens = open_split(directory, split, manifest)
    tokens.description = _describe(directory, manifest, split, bool(data.data))
    return tokens, tokens.num_bytes


def _rebuild(data: DataArgs, split: str) -> None:
    cfg = _builtin_config(data, split)
    if cfg.out.is_dir():
        for path in cfg.out.iterdir():
            if path.is_file():
                os.unlink(path)
    prepare(cfg)


def _describe(directory: Path, manifest: dict[str, Any], split: str, user_folder: bool) -> str:
    sources = manifest.get("source") or []
    mine = [s for s in sources if s["split"] == split] or [
        s for s in sources if split == "val" and s.get("hold_out")]
    what = mine[0]["description"] if mine else "?"
    if not user_folder:
        return what
    info = manifest["splits"][split]
    held = (f", {manifest['validation']['description']}"
            if split == "val" and mine and mine[0].get("hold_out") else "")
    return f"{directory} ({len(info['shards'])} shard(s) of {what}{held})"


def no_bytes_note(tokens: TokenShards, split: str) -> str:
    """The one line that says bits per byte is unavailable for a split of unknown byte count."""
    return (f"note: bits per byte is unavailable: the manifest of {tokens.description} records "
            f"no UTF-8 byte count for its {split} split; prepare the folder again with "
            "prepare_data.py to get it")


def describe_split(data: DataArgs, split: str) -> str:
    """One line naming where `split` comes from (may prepare the data, or raise DataError)."""
    return load_split(data, split)[0].description
