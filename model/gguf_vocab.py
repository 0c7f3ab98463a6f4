"""The tokenizer of a GGUF export: a byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model.

llama.cpp tokenizes a byte-level BPE in two steps, as Hugging Face's `tokenizers` does: a
pre-tokenizer splits the text into words (a regex it knows by name, `tokenizer.ggml.pre`), then
BPE merges the bytes of each word. The vocabulary, merges and special tokens are written into the
file; the pre-tokenizer is written as a name, so it must be one llama.cpp implements.

llama.cpp's own converter names the pre-tokenizer by hashing the ids of a fixed text, which only
recognises tokenizers it has seen (the hash depends on the vocabulary). Here it is read from the
tokenizer's own description (`tokenizer.json`): the pre-tokenizer steps and their regex, compared
with the ones behind llama.cpp's names, so that a tokenizer trained here (any vocabulary) is
named too:

- "gpt-2": GPT-2's regex (`ByteLevel` with its built-in regex, or the same regex as a `Split`);
- "smollm": single digits first, then GPT-2's regex (SmolLM and SmolLM2);
- "qwen2": Qwen2's regex (single digits, no space before letters), as a `Split`;
- "llama-bpe": Llama 3's regex (digits in groups of up to three), as a `Split`; llama.cpp then
  also looks whole words up before merging (`ignore_merges`), so the tokenizer must too.

Anything else (another regex, a normalizer other than NFC, a prefix space, byte fallback, a
decoder other than byte-level) is refused with one line: llama.cpp would tokenize differently.
An NFC normalizer is accepted: llama.cpp does not normalize, so text that is not in NFC (rare:
decomposed accents) may tokenize differently; for text in NFC the tokens are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from model.tokenizer import BUNDLED_GPT2_DIR

EOT_ID = 50256  # <|endoftext|>: GPT-2's BOS and EOS
GPT2_VOCAB = 50257

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# regex of a `Split` step -> llama.cpp's pre-tokenizer name
_SPLIT_NAMES = {GPT2_REGEX: "gpt-2", QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}
# llama.cpp looks a whole word up before merging for these names only (its `ignore_merges`)
_IGNORE_MERGES = ("llama-bpe",)


class GGUFExportError(ValueError):
    """A model cannot be written as GGUF exactly; the message is one actionable line."""


def _token_type():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("the GGUF export needs the gguf package: pip install gguf") from None
    return gguf.TokenType


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as GGUF holds it: token strings (byte-level BPE text, as in vocab.json),
    their types, the merges in rank order, llama.cpp's pre-tokenizer name, the special ids and
    whether prompts get BOS/EOS added (as our tools' `tokenizer.encode` does)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str = "gpt-2"
    bos_id: int | None = EOT_ID
    eos_id: int | None = EOT_ID
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def gpt2_vocab(vocab_size: int) -> Vocab:
    """The bundled GPT-2 tokenizer for a model of `vocab_size` tokens (ids past GPT-2's 50,257,
    a padded embedding, become unused `[PAD<id>]` tokens, as llama.cpp's converter writes them).

    Raises:
        GGUFExportError: `vocab_size` is smaller than GPT-2's vocabulary.
    """
    token_type = _token_type()
    if vocab_size < GPT2_VOCAB:
        raise GGUFExportError(
            f"the model has vocab_size {vocab_size} but the GPT-2 tokenizer has {GPT2_VOCAB} "
            "tokens: llama.cpp would produce ids the model has no embedding for")
    by_id = {i: t for t, i in json.loads((BUNDLED_GPT2_DIR / "vocab.json").read_text("utf-8"))
             .items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(token_type.CONTROL if i == EOT_ID else token_type.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(token_type.UNUSED))
    lines = (BUNDLED_GPT2_DIR / "merges.txt").read_text("utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    return Vocab(tokens, types, merges)


# -- any byte-level BPE tokenizer ----------------------------------------------------------------


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _describe(steps: list[dict[str, Any]]) -> str:
    def one(s: dict[str, Any]) -> str:
        if s.get("type") == "Split":
            return f"Split({json.dumps(s.get('pattern'))[:60]})"
        if s.get("type") == "ByteLevel":
            return f"ByteLevel(use_regex={s.get('use_regex', True)})"
        return str(s.get("type"))
    return " + ".join(one(s) for s in steps) or "none"


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a `tokenizer.json`.

    Args:
        spec: the tokenizer's JSON description (`tokenizer.json`, or
            `json.loads(backend_tokenizer.to_str())`).

    Raises:
        GGUFExportError: a tokenizer llama.cpp's byte-level BPE would not reproduce (one line).
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"the tokenizer is a {model.get('type')} model; the GGUF export "
                              "writes byte-level BPE tokenizers only")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise GGUFExportError("the tokenizer's BPE uses byte fallback or word prefixes/"
                              "suffixes, which llama.cpp's byte-level BPE does not")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise GGUFExportError(f"the tokenizer normalizes text ({normalizer.get('type')}), which "
                              "llama.cpp's byte-level BPE does not")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError("the tokenizer's decoder is not byte-level; the GGUF export writes "
                              "byte-level BPE tokenizers only")
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise GGUFExportError("the tokenizer puts a space before every text (add_prefix_space), "
                              "which llama.cpp's byte-level BPE does not")
    name = None
    if kinds and kinds[-1] == "ByteLevel":
        regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            name = "gpt-2"
        elif kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
            name = "smollm"
        elif kinds == ["Split", "ByteLevel"] and not regex and not steps[0].get("invert") \
                and steps[0].get("behavior") == "Isolated":
            name = _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise GGUFExportError(
            f"the tokenizer's pre-tokenizer ({_describe(steps)}) is not one llama.cpp knows "
            "(GPT-2's, SmolLM's, Qwen2's or Llama 3's byte-level split): llama.cpp would split "
            "text differently")
    if bool(model.get("ignore_merges", False)) != (name in _IGNORE_MERGES):
        raise GGUFExportError(
            f"the tokenizer has ignore_merges={bool(model.get('ignore_merges', False))} but "
            f"llama.cpp's {name!r} pre-tokenizer implies the opposite: it would merge "
            "differently")
    return name


def _merges(model: dict[str, Any]) -> list[str]:
    """Merges as "a b" lines (tokenizer.json holds "a b" strings or [a, b] pairs)."""
    out = []
    for m in model.get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise GGUFExportError(f"the tokenizer has a merge llama.cpp cannot store: {m!r}")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether `tokenizer.encode` (what our tools call) adds BOS before and EOS after a text.

    Raises:
        GGUFExportError: it adds other tokens, which GGUF cannot describe.
    """
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and full[1:1 + len(plain)] == plain
    rest = full[int(add_bos) + len(plain):]
    add_eos = eos is not None and rest == [eos]
    if full[int(add_bos):int(add_bos) + len(plain)] != plain or (rest and not add_eos):
        raise GGUFExportError("the tokenizer adds special tokens other than BOS/EOS to every "
                              "text, which GGUF cannot describe")
    return add_bos, add_eos


def _is_bundled_gpt2(tokenizer: Any) -> bool:
    """Whether a tokenizer without tokenizer.json is the bundled GPT-2 one (same vocabulary)."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None or \
            getattr(tokenizer, "vocab_size", None) != GPT2_VOCAB:
        return False
    bundled = json.loads((BUNDLED_GPT2_DIR / "vocab.json").read_text("utf-8"))
    return tokenizer.get_vocab() == bundled


def tokenizer_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """A Hugging Face fast tokenizer (byte-level BPE) as GGUF holds it, for a model of
    `vocab_size` tokens (ids the tokenizer lacks become unused `[PAD<id>]` tokens). The bundled
    GPT-2 tokenizer (`load_tokenizer("gpt2")`, a slow one) gives `gpt2_vocab`.

    Raises:
        GGUFExportError: not a byte-level BPE that llama.cpp reproduces (`pre_tokenizer_name`),
            or more tokens than the model has (one line).
    """
    if _is_bundled_gpt2(tokenizer):
        return gpt2_vocab(vocab_size)
    token_type = _token_type()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the tokenizer has no tokenizer.json (not a fast tokenizer); the "
                              "GGUF export needs one to read its vocabulary and pre-tokenizer")
    spec = json.loads(backend.to_str())
    pre = pre_tokenizer_name(spec)
    model = spec["model"]
    by_id: dict[int, tuple[str, int]] = {
        i: (t, int(token_type.NORMAL)) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        kind = token_type.CONTROL if added.get("special") else token_type.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    if max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(by_id)} but the model has vocab_size "
            f"{vocab_size}: llama.cpp would produce ids the model has no embedding for")
    from tokenizers.pre_tokenizers import ByteLevel

    missing = sum(ch not in model["vocab"] for ch in ByteLevel.alphabet())
    if missing:
        raise GGUFExportError(f"the tokenizer's vocabulary lacks {missing} of the 256 byte "
                              "tokens, so some text has no tokens in llama.cpp")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(token_type.UNUSED)))
        tokens.append(text)
        types.append(kind)
    add_bos, add_eos = _added_specials(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(tokens, types, _merges(model), pre, tokenizer.bos_token_id,
                 tokenizer.eos_token_id, add_bos, add_eos,
                 template if isinstance(template, str) else None)
