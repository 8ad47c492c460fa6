"""The bounds on one request to ``lm-lightning serve``: beyond them the server answers 400 before any work."""

from __future__ import annotations

from dataclasses import dataclass

from lm_lightning.errors import ConfigError
from lm_lightning.generate import MAX_NEW_TOKENS_LIMIT, MAX_REQUEST_NEW_TOKENS


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 4096
    """The most tokens one choice may ask for (``max_tokens``); also bounded by the model's context
    (prompt tokens + ``max_tokens`` <= block_size)."""
    max_prompt_tokens: int | None = None
    """The most tokens of one prompt (after the chat template). Unset: the model's block_size."""
    max_n: int = 16
    """The most choices of one request (``n`` x the prompts of a completions request)."""
    max_body_bytes: int = 1 << 20
    """The largest request body."""
    max_request_tokens: int = MAX_REQUEST_NEW_TOKENS
    """The most tokens one request may ask for in all (choices x ``max_tokens``): a bound on its time."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ConfigError(f"limits.max_tokens={self.max_tokens} must be in 1 to {MAX_NEW_TOKENS_LIMIT}")
        for name in ("max_n", "max_body_bytes", "max_request_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name}={getattr(self, name)} must be at least 1")
