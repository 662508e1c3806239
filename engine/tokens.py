"""Offline token estimation: no tokenizer vocabulary to download at run time.

~4 characters per token is the providers' own rule of thumb for English; budgets reserve
estimates and settle with the provider's reported usage, so the estimate only needs to be close.
"""

from __future__ import annotations

import math

CHARS_PER_TOKEN = 4.0


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate_prompt_tokens(system: str | None, prompt: str) -> int:
    # A few tokens of per-message framing, as chat formats add.
    return estimate_tokens(system or "") + estimate_tokens(prompt) + 8
