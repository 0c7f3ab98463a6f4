"""Showing token probabilities: a text table, coloured HTML for Jupyter, colours for terminals.

`ProbabilityView` holds one line of tokens with their probabilities and likeliest alternatives
(from `model.scoring.score` or from generation's `TokenLogprobs`). `str(view)` is a table;
in a notebook, `_repr_html_` shows the tokens as text coloured by probability (log scale: red
at 0.01%, yellow at 1%, green at 100%) with the rank and alternatives in each token's tooltip:
plain HTML and CSS `title` attributes, no JavaScript.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenProb:
    """One token as shown.

    Attributes:
        id: the token id.
        text: the token decoded on its own (a partial UTF-8 character shows as U+FFFD).
        logprob: its log-probability under the model (None: unscored, e.g. the first token).
        rank: its rank under the model (1 = the likeliest; None: unscored).
        alternatives: (id, text, log-probability) of the likeliest tokens, likeliest first.
        sampled_logprob: generation only: its log-probability under the sampling distribution.
    """

    id: int
    text: str
    logprob: float | None
    rank: int | None
    alternatives: list[tuple[int, str, float]] = field(default_factory=list)
    sampled_logprob: float | None = None

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)

    @property
    def sampled_prob(self) -> float | None:
        return None if self.sampled_logprob is None else math.exp(self.sampled_logprob)


def shown(text: str) -> str:
    """A token's text quoted, with newlines and tabs visible: ' the' -> '" the"'."""
    return json.dumps(text, ensure_ascii=False)


def _finite(logprob: float) -> float | None:
    return logprob if math.isfinite(logprob) else None


def _pct(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.2g}%"


def probability_color(p: float) -> str:
    """A background colour for probability p, on a log scale (a language model's probabilities
    span orders of magnitude): red at 0.01% and below, yellow at 1%, green at 100%."""
    x = 1.0 + math.log10(max(p, 1e-12)) / 4  # 0 at 1e-4, 0.5 at 1e-2, 1 at 1
    return f"hsl({round(120 * max(0.0, min(1.0, x)))}, 85%, 82%)"


def ansi_color(text: str, p: float | None) -> str:
    """`text` in a terminal colour for its probability: green >= 50%, yellow >= 10%, else red."""
    if p is None:
        return text
    code = 32 if p >= 0.5 else 33 if p >= 0.1 else 31
    return f"\x1b[{code}m{text}\x1b[0m"


class ProbabilityView:
    """Tokens with their probabilities; a table as text and coloured tokens in Jupyter.

    Args:
        tokens: the tokens, in order.
        title: a heading line (e.g. the perplexity).
        sampled: whether the probabilities come from generation (adds the sampling column).
    """

    def __init__(self, tokens: list[TokenProb], title: str | None = None,
                 sampled: bool = False) -> None:
        self.tokens, self.title, self.sampled = tokens, title, sampled

    @classmethod
    def from_scores(cls, scores: Any, tokenizer: Any, title: str | None = None
                    ) -> ProbabilityView:
        """From `model.scoring.score`'s `TokenScores`; the default title has the perplexity."""
        tokens = []
        for i, tid in enumerate(scores.ids.tolist()):
            lp = float(scores.logprobs[i])
            alts = [] if math.isnan(lp) else _alternatives(
                scores.top_ids[i].tolist(), scores.top_logprobs[i].tolist(), tokenizer)
            tokens.append(TokenProb(tid, tokenizer.decode([tid]), _finite(lp),
                                    int(scores.ranks[i]) or None, alts))
        if title is None:
            title = (f"{scores.tokens_scored} tokens scored: loss {scores.loss:.4f} nats, "
                     f"perplexity {scores.perplexity:.2f}")
        return cls(tokens, title)

    @classmethod
    def from_generation(cls, record: Any, tokenizer: Any, title: str | None = None
                        ) -> ProbabilityView:
        """From one row of generation's `TokenLogprobs` ((n,) and (n, k) tensors).

        The probability and alternatives are the model's (raw distribution); `sampled_prob`
        is the probability under the distribution the token was drawn from.
        """
        tokens = []
        for i, tid in enumerate(record.tokens.tolist()):
            lp = float(record.raw_logprobs[i])
            alts = _alternatives(record.raw_top_ids[i].tolist(),
                                 record.raw_top_logprobs[i].tolist(), tokenizer)
            tokens.append(TokenProb(tid, tokenizer.decode([tid]), _finite(lp),
                                    int(record.raw_ranks[i]), alts,
                                    _finite(float(record.logprobs[i]))))
        return cls(tokens, title, sampled=True)

    def table(self, k: int | None = None) -> str:
        """One line per token: probability, rank and up to `k` alternatives (default: all)."""
        head = ["#", "token", "prob", *(["sampled"] if self.sampled else []), "rank",
                "alternatives"]
        rows = []
        for i, t in enumerate(self.tokens):
            alts = ", ".join(f"{shown(text)} {_pct(math.exp(lp))}"
                             for _, text, lp in t.alternatives[:k])
            rows.append([str(i + 1), shown(t.text), _pct(t.prob),
                         *([_pct(t.sampled_prob)] if self.sampled else []),
                         "-" if t.rank is None else str(t.rank), alts])
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head) - 1)]
        lines = [self.title] if self.title else []
        for r in [head, *rows]:
            cells = [r[c].rjust(widths[c]) if c in (0, 2, 3, 4) and r is not head
                     else r[c].ljust(widths[c]) for c in range(len(head) - 1)]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        spans = []
        for t in self.tokens:
            if t.prob is None:
                tip = f"{shown(t.text)}: no score (no context before it)"
                style = "border-bottom:1px dotted #888"
            else:
                tip = f"{shown(t.text)}: {_pct(t.prob)}, rank {t.rank}"
                if t.sampled_prob is not None:
                    tip += f" (sampled with {_pct(t.sampled_prob)})"
                tip += "".join(f"\n  {shown(text)} {_pct(math.exp(lp))}"
                               for _, text, lp in t.alternatives)
                style = f"background:{probability_color(t.prob)}"
            spans.append(f'<span class="lm-tok" style="{style}" '
                         f'title="{html.escape(tip, quote=True)}">{html.escape(t.text)}</span>')
        title = (f'<div style="font-weight:bold;margin-bottom:4px">{html.escape(self.title)}'
                 "</div>" if self.title else "")
        legend = ('<div style="font-size:smaller;color:#666;margin-top:4px">probability: '
                  + " ".join(f'<span style="background:{probability_color(p)}">{label}</span>'
                             for p, label in ((1e-4, "0.01%"), (1e-3, "0.1%"), (1e-2, "1%"),
                                              (0.1, "10%"), (1.0, "100%")))
                  + "; hover a token for its rank and alternatives</div>")
        return (f'<div class="lm-probs">{title}<div style="font-family:monospace;'
                f'white-space:pre-wrap;line-height:1.7">{"".join(spans)}</div>{legend}</div>')

    def to_dicts(self) -> list[dict[str, Any]]:
        """The tokens as JSON-ready dicts (natural-log probabilities; None where there is none)."""
        out = []
        for t in self.tokens:
            d = {"id": t.id, "text": t.text, "logprob": t.logprob, "rank": t.rank}
            if self.sampled:
                d["sampled_logprob"] = t.sampled_logprob
            d["top"] = [{"id": i, "text": text, "logprob": lp} for i, text, lp in t.alternatives]
            out.append(d)
        return out


def _alternatives(ids: list[int], logprobs: list[float], tokenizer: Any
                  ) -> list[tuple[int, str, float]]:
    return [(i, tokenizer.decode([i]), lp) for i, lp in zip(ids, logprobs, strict=True)
            if math.isfinite(lp)]


def json_record(gen: Any, prompt: str, prompt_ids: list[int], text: str, seed: int | None
                ) -> str:
    """One generation (a finished `TextGeneration` with `top_logprobs`) as a line of JSON."""
    rate = gen.new_tokens / gen.seconds if gen.seconds > 0 else None
    return json.dumps({
        "prompt": prompt, "text": text, "prompt_tokens": len(prompt_ids),
        "new_tokens": gen.new_tokens, "finish_reason": gen.finish_reason, "seed": seed,
        "tokens": gen.probabilities().to_dicts(),
        "timing": {"seconds": gen.seconds, "first_token_seconds": gen.first_token_seconds,
                   "tokens_per_second": rate},
    }, ensure_ascii=False)
