"""The work one request may ask for, and the shutdown's grace period: `serve_lm.py`'s limits
flags and their defaults (no torch here, so `serve_lm.py --help` stays instant).

- `--max_tokens_limit` (default 4096): new tokens per choice. Four GPT-2 contexts of text
  (generation past the context slides the window), so a user does not meet it by accident,
  while no request can hold a row for ever.
- `--max_request_tokens` (default 65536): tokens per request, its prompts' tokens plus
  choices x `max_tokens` (the most its `usage.total_tokens` can reach): one request may fill
  the default 16 rows at the per-choice limit, no more.
- `--request_timeout_s` (default: none): seconds a request may decode, from when its first row
  starts; then its rows are freed and its choices end with finish_reason "length".
- `--shutdown_grace_s` (default 10): after SIGTERM, how long running choices may go on.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOKENS_LIMIT = 4096
MAX_REQUEST_TOKENS = 65536
# Under the 30 s that Kubernetes (and 90 s that systemd) wait after SIGTERM before SIGKILL,
# with room for the rest of the shutdown.
SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True)
class Limits:
    """The work one request may ask for.

    Attributes:
        max_tokens: the most new tokens per choice (`max_tokens`).
        request_tokens: the most tokens per request: its prompts' tokens plus choices x
            `max_tokens`.
        timeout: seconds a request may decode (from its first row's start), or None.
    """

    max_tokens: int = MAX_TOKENS_LIMIT
    request_tokens: int = MAX_REQUEST_TOKENS
    timeout: float | None = None

    def max_tokens_error(self, max_tokens: int) -> str | None:
        """The message of the 400 for a choice's `max_tokens` over the limit, or None."""
        if max_tokens <= self.max_tokens:
            return None
        return (f"max_tokens is {max_tokens}, over this server's limit of {self.max_tokens} "
                "new tokens per choice (serve_lm.py --max_tokens_limit)")

    def request_error(self, prompt_tokens: int, choices: int, max_tokens: int) -> str | None:
        """The message of the 400 for a request that could use more tokens than the limit (its
        prompts' tokens plus `choices` x `max_tokens`), or None."""
        total = prompt_tokens + choices * max_tokens
        if total <= self.request_tokens:
            return None
        return (f"this request could use {total} tokens ({prompt_tokens} prompt tokens + "
                f"{choices} choices x max_tokens {max_tokens}), over this server's limit of "
                f"{self.request_tokens} tokens per request (serve_lm.py --max_request_tokens); "
                "ask for fewer choices or tokens")
