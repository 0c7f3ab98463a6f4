"""Text that tokenizers get wrong: every Unicode plane, control characters, NUL, long runs of
whitespace, emoji sequences, combining marks (the round-trip and llama.cpp tests share it)."""

from __future__ import annotations

import random

HARD = [
    "\x00NUL\x00 and every C0 control: " + "".join(chr(c) for c in range(32)) + "\x7f",
    "C1 controls and separators: " + "".join(chr(c) for c in range(0x80, 0xA0)) + "\u2028\u2029",
    " " * 300 + "spaces" + "\t" * 40 + "tabs" + "\n" * 30 + "\r\n" * 20 + "   " + "\n \n \n",
    "\u00a0\u2000\u2003\u200b\u3000\ufeff odd spaces, a BOM and a zero-width space",
    "emoji \U0001F600\U0001F469\u200d\U0001F4BB\U0001F468\u200d\U0001F469\u200d\U0001F467 "
    "\U0001F1EB\U0001F1F7 \U0001F44D\U0001F3FD \u2764\ufe0f",
    "combining: e\u0301 a\u0308\u0323 \u0915\u094d\u0937 \u0e01\u0e34\u0e4a "
    "Z\u0351\u0357\u0364\u036b\u0300\u0301 n\u0303",
    "I'll don't 'TIS they've 1234567 3.14159 \u0660\u0661\u0662 \u00bd \u2164 \U0001D7D8",
    "RTL \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 CJK \u6f22\u5b57 "
    "\ud55c\uad6d\uc5b4 \u304b\u306a",
    "private use \ue000\U000F0000\U0010FFFD, noncharacters \ufffe\uffff\U0001FFFF, "
    "tags \U000E0041\U000E007F",
    "",
    "x",
]


def every_plane(seed: int = 0, length: int = 400) -> str:
    """Random text with code points from all 17 Unicode planes (no surrogates), mixed with
    ASCII, spaces and newlines so that words of every kind form."""
    rng = random.Random(seed)
    out = []
    for i in range(length):
        if i % 3:
            out.append(rng.choice("ab \n\t.,'1"))
            continue
        plane = i // 3 % 17
        while True:
            cp = rng.randrange(plane << 16, (plane + 1) << 16)
            if not 0xD800 <= cp <= 0xDFFF:
                break
        out.append(chr(cp))
    return "".join(out)


def hard_texts() -> list[str]:
    """`HARD`, three random texts over every plane, and all of them joined."""
    texts = [*HARD, *(every_plane(seed) for seed in range(3))]
    return [*texts, "\n".join(texts)]
