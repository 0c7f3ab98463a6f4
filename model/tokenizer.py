"""The GPT-2 tokenizer, bundled with the repo so that everything works offline.

`load_tokenizer("gpt2")` loads the copy in `model/assets/gpt2/` (OpenAI's GPT-2 byte-level BPE,
byte-identical to the released `encoder.json` / `vocab.bpe`); any other name is handed to
`transformers.AutoTokenizer.from_pretrained` (a local folder, or a hub name when online).
"""

from __future__ import annotations

from functools import lru_cache

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
