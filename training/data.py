"""Training and evaluation text: where it comes from, and its cached token ids.

Sources, by `--dataset`:

- `shakespeare` (default): Tiny Shakespeare, bundled as `data/tinyshakespeare.txt`, split 90/10
  by characters as nanoGPT does (301,966 / 36,059 GPT-2 tokens). No test split.
- `wikitext` / `wikitext103`: WikiText-2 / WikiText-103 (raw). `--data_dir DIR` holding
  `train.txt`, `valid.txt`, `test.txt` (or `wiki.{train,valid,test}.tokens` / `.raw`), else
  Hugging Face `datasets` when it is installed and online. Articles are separated by EOS.
- `--train_file` / `--val_file` / `--test_file`: any UTF-8 text, overriding that split. Without
  `--val_file`, the last 10% of `--train_file` (by characters) is held out for validation.

Each split is tokenized once into a `uint16` memmap (`<cache_dir>/<label>.<split>.<tok>.bin`) with
a JSON sidecar recording the source's sha256, the tokenizer and the counts; it is rebuilt whenever
the source, the split rule or the tokenizer changes. `load_split(args, split)` returns the memmap
and the UTF-8 size of the text it encodes (for bits per byte).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.fileio import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare.txt"
CACHE_FORMAT = 1
SPLITS = ("train", "val", "test")
DATASETS = ("shakespeare", "wikitext", "wikitext103")
_HF_CONFIGS = {"wikitext": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}
_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_DIR_FILES = {
    "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
    "val": ("valid.txt", "val.txt", "validation.txt", "wiki.valid.tokens", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
# A WikiText article starts with a level-1 heading line: " = Title = " (sections are " = = ...").
_WIKITEXT_ARTICLE = re.compile(r"^ = (?!=)[^\n]* = *$", re.MULTILINE)


class DataError(ValueError):
    """A split is unavailable or unusable; the message is one line saying what to do."""


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags shared by training and evaluation to `parser`."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="shakespeare",
                   help="text to train/evaluate on (default: shakespeare, bundled)")
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
                   help="where token caches go (default: <run dir>/cache)")


def dataset_label(args: argparse.Namespace) -> str:
    """Short name of the data: the dataset, or 'custom' when --train_file is given."""
    return "custom" if getattr(args, "train_file", None) else getattr(args, "dataset", None) or (
        "shakespeare")


def default_cache_dir(args: argparse.Namespace) -> Path:
    """`--cache_dir`, else `<out_dir>/cache`, else `lm_<label>/cache`."""
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir)
    out_dir = getattr(args, "out_dir", None) or f"lm_{dataset_label(args)}"
    return Path(out_dir) / "cache"


@dataclass(frozen=True)
class _Source:
    path: Path  # the text file whose bytes are hashed
    description: str  # for messages and the sidecar
    rule: str  # "all", "head90" (first 90% of characters) or "tail10"
    wikitext: bool = False  # split into articles, EOS between them


def describe_split(args: argparse.Namespace, split: str) -> str:
    """One line naming where `split` comes from (resolving it may download or raise DataError)."""
    src = _resolve_source(args, split)
    rule = {"all": "", "head90": ", first 90% of characters", "tail10": ", last 10% of characters"}
    return f"{src.description}{rule[src.rule]}"


def load_split(args: argparse.Namespace, split: str) -> tuple[np.ndarray, int]:
    """Token ids of one split, cached, and the UTF-8 byte count of the text they encode.

    Args:
        args: a namespace with the flags of `add_data_args` (missing ones take their defaults)
            and optionally `out_dir`.
        split: "train", "val" or "test".

    Returns:
        (tokens, num_bytes): a read-only uint16 memmap and the size of the source text in bytes.

    Raises:
        DataError: the split is unavailable (with how to get it), empty, or not UTF-8.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    src = _resolve_source(args, split)
    tok_name = str(getattr(args, "tokenizer", None) or "gpt2")
    cache_dir = default_cache_dir(args)
    stem = f"{dataset_label(args)}.{split}.{_slug(tok_name)}"
    bin_path, meta_path = cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"
    sha = _sha256(src.path)
    wanted = {"format": CACHE_FORMAT, "source_sha256": sha, "rule": src.rule,
              "tokenizer": tok_name, "wikitext_articles": src.wikitext}
    meta = _read_meta(meta_path)
    fresh = (meta is not None and all(meta.get(k) == v for k, v in wanted.items())
             and bin_path.is_file() and bin_path.stat().st_size == 2 * meta.get("num_tokens", -1))
    if not fresh:
        meta = _build_cache(src, tok_name, bin_path, meta_path, wanted, split)
    if meta["num_tokens"] == 0:
        raise DataError(f"the {split} split ({src.description}) holds no tokens; give a non-empty "
                        "text file")
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")
    return tokens, int(meta["num_bytes"])


# -- where a split comes from -------------------------------------------------------------------


def _resolve_source(args: argparse.Namespace, split: str) -> _Source:
    train_file = getattr(args, "train_file", None)
    explicit = {"train": train_file, "val": getattr(args, "val_file", None),
                "test": getattr(args, "test_file", None)}[split]
    if explicit:
        return _Source(_existing(explicit, f"--{split}_file"), f"file {explicit}", "all")
    if train_file:  # custom text: hold out its tail for validation
        if split == "val":
            return _Source(_existing(train_file, "--train_file"), f"file {train_file}", "tail10")
        if split == "test":
            raise DataError("no test split for --train_file data; pass --test_file FILE")
    dataset = getattr(args, "dataset", None) or "shakespeare"
    data_dir = getattr(args, "data_dir", None)
    if dataset == "shakespeare":
        if split == "test":
            raise DataError("Tiny Shakespeare has only train and val splits (90/10); evaluate "
                            "on val, or pass --test_file FILE")
        path = BUNDLED_SHAKESPEARE
        if data_dir:
            path = _find_in_dir(data_dir, ("tinyshakespeare.txt", "input.txt"), "shakespeare")
        rule = "head90" if split == "train" else "tail10"
        return _Source(_existing(path, "Tiny Shakespeare"), f"Tiny Shakespeare ({path})", rule)
    if data_dir:
        path = _find_in_dir(data_dir, _DIR_FILES[split], dataset)
        return _Source(path, f"{dataset} {split} ({path})", "all", wikitext=True)
    return _from_hugging_face(args, dataset, split)


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


def _from_hugging_face(args: argparse.Namespace, dataset: str, split: str) -> _Source:
    """Download a WikiText split through `datasets` once, keeping it as text in the cache."""
    config = _HF_CONFIGS[dataset]
    path = default_cache_dir(args) / f"{config}.{split}.txt"
    how = (f"pass --data_dir DIR holding train.txt/valid.txt/test.txt (or wiki.*.tokens) of "
           f"{config}, or `pip install datasets` and run once with internet access")
    if path.is_file():
        return _Source(path, f"{config} {split} (Hugging Face, cached at {path})", "all", True)
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {dataset} is not available offline: {how}") from None
    try:
        rows = datasets.load_dataset("wikitext", config, split=_HF_SPLITS[split])
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one actionable line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"could not download {config} ({first}); {how}") from None
    with atomic_write(path, "w") as f:
        for text in rows["text"]:
            f.write(text)
    return _Source(path, f"{config} {split} (Hugging Face, cached at {path})", "all", True)


# -- the token cache ----------------------------------------------------------------------------


def _slug(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
        return name
    tail = re.sub(r"[^A-Za-z0-9_-]+", "_", name.rstrip("/\\").split("/")[-1])[-24:]
    return f"{tail}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_text(src: _Source) -> str:
    try:
        with open(src.path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{src.path} is not UTF-8 text (byte {exc.start}); convert it "
                        "first") from None
    except OSError as exc:
        raise DataError(f"cannot read {src.path}: {exc.strerror}") from None
    cut = int(len(text) * 0.9)  # nanoGPT's split: by characters
    return {"all": text, "head90": text[:cut], "tail10": text[cut:]}[src.rule]


def _documents(text: str, wikitext: bool) -> list[str]:
    if not wikitext:
        return [text]
    starts = [m.start() for m in _WIKITEXT_ARTICLE.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    docs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]
    return [d for d in docs if d.strip()]


def _pieces(doc: str, target: int = 1 << 20) -> list[str]:
    """Cut a long text at line starts, where GPT-2's pre-tokenizer always splits anyway, so that
    encoding the pieces gives the same ids as encoding the whole (and runs in parallel)."""
    out, start = [], 0
    boundary = re.compile(r"\n(?=\S)")
    while len(doc) - start > target:
        m = boundary.search(doc, start + target)
        if m is None:
            break
        out.append(doc[start:m.end()])
        start = m.end()
    out.append(doc[start:])
    return out


def _encoder(tok):
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer: batched, parallel, no length warnings
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]


def _build_cache(src: _Source, tok_name: str, bin_path: Path, meta_path: Path, wanted: dict,
                 split: str) -> dict:
    from model.tokenizer import TokenizerLoadError, load_tokenizer

    try:
        tok = load_tokenizer(tok_name)
    except TokenizerLoadError as exc:
        raise DataError(str(exc)) from None
    vocab = len(tok)
    if vocab > 65536:
        raise DataError(f"tokenizer {tok_name!r} has {vocab:,} tokens; the uint16 token cache "
                        "holds at most 65,536")
    text = _read_text(src)
    num_bytes = len(text.encode("utf-8"))
    docs = _documents(text, src.wikitext)
    del text
    eos = tok.eos_token_id if len(docs) > 1 else None
    encode = _encoder(tok)
    num_tokens = 0
    with atomic_write(bin_path) as f:
        batch: list[str] = []
        ends: list[bool] = []  # does this piece end a document?

        def flush() -> None:
            nonlocal num_tokens
            for ids, last in zip(encode(batch), ends, strict=True):
                if last and eos is not None:
                    ids = list(ids) + [eos]
                arr = np.asarray(ids, dtype=np.uint16)
                f.write(arr.tobytes())
                num_tokens += arr.size
            batch.clear()
            ends.clear()

        size = 0
        for doc in docs:
            pieces = _pieces(doc)
            for i, piece in enumerate(pieces):
                batch.append(piece)
                ends.append(i == len(pieces) - 1)
                size += len(piece)
            if size > (16 << 20):  # bound memory on big corpora (WikiText-103: 540 MB)
                flush()
                size = 0
        flush()
    meta = dict(wanted, split=split, source=str(src.path), description=src.description,
                vocab_size=vocab, num_tokens=num_tokens, num_bytes=num_bytes,
                num_documents=len(docs), eos_between_documents=eos is not None)
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta
