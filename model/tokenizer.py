"""Tokenizers: the bundled GPT-2 one (offline), any Hugging Face one, and the one a checkpoint
carries.

`load_tokenizer("gpt2")` loads the copy in `model/assets/gpt2/` (OpenAI's GPT-2 byte-level BPE,
byte-identical to the released `encoder.json` / `vocab.bpe`); any other name is handed to
`transformers.AutoTokenizer.from_pretrained` (a local folder, or a hub name when online).

A checkpoint carries its tokenizer (training and `convert.py --from_hf` store it): GPT-2's by
name, any other as its files inside the checkpoint. `load_checkpoint_tokenizer(ckpt)` is the one
way to get it (every script loads through it), `write_checkpoint_tokenizer(ckpt, folder)` writes
its files for `AutoTokenizer.from_pretrained` (`convert.py --to_hf`, GGUF export), and
`tokenizer_record(name)` gives the keys to store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.paths import BUNDLED_GPT2_DIR  # re-exported: `model.tokenizer.BUNDLED_GPT2_DIR`

DEFAULT_TOKENIZER = "gpt2"


class TokenizerLoadError(ValueError):
    """A tokenizer could not be loaded; the message is one actionable line."""


def load_tokenizer(name: str = DEFAULT_TOKENIZER):
    """Load a tokenizer with `pad_token` set to `eos_token`, as the guide does.

    Args:
        name: "gpt2" (the bundled copy, no network), a local tokenizer folder, or a hub name.

    Returns:
        A Hugging Face tokenizer.

    Raises:
        TokenizerLoadError: when the tokenizer cannot be loaded (e.g. a hub name while offline).
    """
    return _load_cached(str(name))


@lru_cache(maxsize=4)
def _load_cached(name: str):
    try:
        if name == DEFAULT_TOKENIZER:
            from transformers import GPT2Tokenizer

            tok = GPT2Tokenizer.from_pretrained(str(BUNDLED_GPT2_DIR))
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerLoadError(
            f"could not load tokenizer {name!r} ({first}); use --tokenizer gpt2 for the bundled "
            "GPT-2 tokenizer, or pass a local folder holding tokenizer files"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# -- the tokenizer a checkpoint carries ---------------------------------------------------------
#
# A checkpoint names its tokenizer under "tokenizer": "gpt2" means the bundled copy (nothing else
# is stored). Any other tokenizer is stored in the checkpoint itself, so that the file works on
# another machine: "tokenizer_files" maps file names to their bytes (what `save_pretrained`
# writes: tokenizer.json and tokenizer_config.json for a fast tokenizer) and "tokenizer_sha256"
# is the sha256 of the fast tokenizer's serialized form, the hash a shard manifest records
# (`corpus.encoders`). Bytes and str load with `torch.load(weights_only=True)`. Older checkpoints
# name a folder or hub name only; they load as before, from that name.

FILES_KEY = "tokenizer_files"
SHA256_KEY = "tokenizer_sha256"
_MAIN_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# Loaded stored tokenizers (with their hash), by the digest of their files.
_EMBEDDED: dict[str, tuple[Any, str | None]] = {}


def tokenizer_sha256(tokenizer: Any) -> str | None:
    """sha256 of a fast tokenizer's serialized form (None for a tokenizer without one).

    For tokenizers other than the bundled GPT-2 this is what a shard manifest records as the
    tokenizer's `files_sha256`, so a checkpoint and a data folder can be compared.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def tokenizer_record(name: str, tokenizer: Any = None) -> dict[str, Any]:
    """The checkpoint keys that carry tokenizer `name` (see the comment above).

    Args:
        name: "gpt2" (recorded by name: the bundled copy), a local folder or a hub name.
        tokenizer: the tokenizer `name` loaded already (its files are saved from it); None:
            load it.

    Returns:
        {"tokenizer": "gpt2"}, or {"tokenizer": name, "tokenizer_files": {file: bytes},
        "tokenizer_sha256": hash or None}.

    Raises:
        TokenizerLoadError: the tokenizer cannot be loaded.
    """
    name = str(name)
    if name == DEFAULT_TOKENIZER:
        return {"tokenizer": DEFAULT_TOKENIZER}
    tok = tokenizer if tokenizer is not None else _load_fresh(name)
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {"tokenizer": name, FILES_KEY: files, SHA256_KEY: tokenizer_sha256(tok)}


def checkpoint_tokenizer_name(ckpt: dict[str, Any]) -> str:
    """The tokenizer a checkpoint names ("gpt2" when it names none)."""
    name = ckpt.get("tokenizer")
    return name if isinstance(name, str) and name else DEFAULT_TOKENIZER


def has_embedded_tokenizer(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint stores its tokenizer's files (not only a name)."""
    return ckpt.get(FILES_KEY) is not None


def load_checkpoint_tokenizer(ckpt: dict[str, Any]) -> Any:
    """The tokenizer a checkpoint carries: the one way every script and export gets it.

    Its stored files when it has them (checked against their recorded hash), else the tokenizer
    it names (`load_tokenizer`: the bundled GPT-2 for "gpt2" or no name). `pad_token` is set to
    `eos_token` when unset, as `load_tokenizer` does.

    Args:
        ckpt: a checkpoint dict (`model.checkpoint.read_checkpoint`, `read_weights_source`).

    Returns:
        A Hugging Face tokenizer; for stored files, its `name_or_path` is the recorded name.

    Raises:
        TokenizerLoadError: the stored files are incomplete or damaged, or the named tokenizer
            cannot be loaded (one line).
    """
    if not has_embedded_tokenizer(ckpt):
        return load_tokenizer(checkpoint_tokenizer_name(ckpt))
    files = _stored_files(ckpt)
    key = _files_digest(files)
    if key not in _EMBEDDED:
        with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
            _write_files(files, Path(tmp))
            tok = _load_fresh(tmp, what="the checkpoint's stored tokenizer")
        sha = tokenizer_sha256(tok)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.name_or_path = checkpoint_tokenizer_name(ckpt)
        if len(_EMBEDDED) >= 4:
            _EMBEDDED.pop(next(iter(_EMBEDDED)))
        _EMBEDDED[key] = (tok, sha)
    tok, sha = _EMBEDDED[key]
    recorded = ckpt.get(SHA256_KEY)
    if recorded and sha != recorded:
        raise TokenizerLoadError(
            f"the checkpoint's stored tokenizer does not match its recorded hash "
            f"({str(recorded)[:12]}); the checkpoint is damaged: use another snapshot, or pass "
            "--tokenizer")
    return tok


def tokenizer_source(ckpt: dict[str, Any]) -> str:
    """A name or folder that `load_tokenizer` and data preparation (`corpus.encoders`) load as
    the checkpoint's tokenizer.

    For a checkpoint without stored files, the name it records ("gpt2" when none). For stored
    files: the recorded name when it still loads here as the same tokenizer (same hash), else a
    folder holding the stored files, named by their hash, in the system's temporary directory
    (written once, then reused while its files are the stored ones).

    Raises:
        TokenizerLoadError: as `load_checkpoint_tokenizer`.
    """
    name = checkpoint_tokenizer_name(ckpt)
    if not has_embedded_tokenizer(ckpt):
        return name
    tok = load_checkpoint_tokenizer(ckpt)
    try:
        if tokenizer_sha256(_load_fresh(name)) == tokenizer_sha256(tok) is not None:
            return name
    except TokenizerLoadError:
        pass  # moved from another machine: use the stored files
    files = _stored_files(ckpt)
    digest = ckpt.get(SHA256_KEY) or _files_digest(files)
    folder = Path(tempfile.gettempdir()) / f"small-lm-tokenizer-{str(digest)[:16]}"
    if folder.is_dir() and {p.name: p.read_bytes() for p in folder.iterdir()} == files:
        return str(folder)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    _write_files(files, tmp)
    try:
        os.replace(tmp, folder)  # atomic; fails when another process wrote it meanwhile
    except OSError:
        return str(tmp)
    return str(folder)


def write_checkpoint_tokenizer(ckpt: dict[str, Any], folder: str | Path) -> Path:
    """Write the files of a checkpoint's tokenizer into `folder` (created if needed), so that
    `AutoTokenizer.from_pretrained(folder)` loads it: the stored files, the bundled GPT-2 files
    for "gpt2", or `save_pretrained` of the tokenizer it names.

    Returns:
        `folder`.

    Raises:
        TokenizerLoadError: as `load_checkpoint_tokenizer`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if has_embedded_tokenizer(ckpt):
        load_checkpoint_tokenizer(ckpt)  # the files must load and match their hash
        _write_files(_stored_files(ckpt), folder)
    elif checkpoint_tokenizer_name(ckpt) == DEFAULT_TOKENIZER:
        for path in BUNDLED_GPT2_DIR.iterdir():
            if path.is_file():
                (folder / path.name).write_bytes(path.read_bytes())
    else:
        load_tokenizer(checkpoint_tokenizer_name(ckpt)).save_pretrained(str(folder))
    return folder


def _stored_files(ckpt: dict[str, Any]) -> dict[str, bytes]:
    """The checkpoint's stored tokenizer files, checked to be usable (one-line errors)."""
    files = ckpt.get(FILES_KEY)
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, (bytes, str)) for k, v in files.items()):
        raise TokenizerLoadError(f"the checkpoint's {FILES_KEY!r} is not a mapping of file names "
                                 "to their contents; the checkpoint is damaged, pass --tokenizer")
    bad = [k for k in files if not k or k != Path(k).name or k.startswith(".")]
    if bad:
        raise TokenizerLoadError(f"the checkpoint's stored tokenizer has a bad file name "
                                 f"{bad[0]!r}; the checkpoint is damaged, pass --tokenizer")
    if not any(k in files for k in _MAIN_FILES):
        held = ", ".join(sorted(files)) or "no files"
        raise TokenizerLoadError(f"the checkpoint's stored tokenizer files are incomplete "
                                 f"(tokenizer.json is missing; it holds {held}); pass "
                                 "--tokenizer with the tokenizer the model was trained with")
    return {k: v.encode("utf-8") if isinstance(v, str) else v for k, v in files.items()}


def _files_digest(files: dict[str, bytes]) -> str:
    """One sha256 over file names and contents."""
    digest = hashlib.sha256()
    for fname, data in sorted(files.items()):
        digest.update(fname.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _write_files(files: dict[str, bytes], folder: Path) -> None:
    for fname, data in files.items():
        (folder / fname).write_bytes(data)


def _load_fresh(name: str, what: str | None = None) -> Any:
    """`AutoTokenizer.from_pretrained(name)`, uncached and unchanged; one-line errors."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
        raise TokenizerLoadError(
            f"could not load {what or f'tokenizer {name!r}'} ({_first_line(exc)}); pass "
            "--tokenizer gpt2 for the bundled GPT-2 tokenizer, or a local folder holding "
            "tokenizer files") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
