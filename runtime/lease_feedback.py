"""What a provider's answer says about its limits, read from one attempt's usage (429s and headers).

A 429 blocks each bucket the attempt touched for its Retry-After (1 s when it gave none). Rate-limit
headers that show fewer tokens left than the ledger's last view (another client on the key) lower
the ledger to the provider's figure, aged by the refill since the attempt was granted: the header is
as old as the attempt. Pure: the lease pool applies the result here at once and sends it to the
ledger with its next report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tailrace.policies.budget_config import BucketSpec, Charges
from tailrace.policies.leases import BucketView, ProviderFeedback
from tailrace.policies.spend import Usage

REMAINING_HEADERS = {
    "tokens": ("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"),
    "requests": ("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"),
    "input_tokens": ("anthropic-ratelimit-input-tokens-remaining",),
    "output_tokens": ("anthropic-ratelimit-output-tokens-remaining",),
}
DEFAULT_BLOCK_S = 1.0  # a 429 without Retry-After


@dataclass
class Feedback:
    """Per bucket: what to tell the ledger, and until when (monotonic) to grant nothing here."""

    report: dict[str, ProviderFeedback] = field(default_factory=dict)
    blocked_until: dict[str, float] = field(default_factory=dict)


def read_feedback(
    specs: Iterable[tuple[BucketSpec, Charges]],
    used: Usage,
    views: Mapping[str, BucketView],
    age_s: float,
    now: float,
) -> Feedback:
    out = Feedback()
    if used.status != 429 and not used.rate_limit:
        return out
    headers = {k.lower(): v for k, v in used.rate_limit.items()}
    for spec, _ in specs:
        if spec.family == "usd":
            continue
        if used.status == 429:
            blocked = used.retry_after_s if used.retry_after_s is not None else DEFAULT_BLOCK_S
            out.blocked_until[spec.key] = now + blocked
            out.report[spec.key] = ProviderFeedback(blocked_s=blocked)
            continue
        said = _number(next((headers[h] for h in REMAINING_HEADERS.get(spec.family, ()) if h in headers), None))
        view = views.get(spec.key)
        if said is None or view is None:
            continue
        aged = said + spec.rate_per_s * max(0.0, age_s)
        if aged < view.level - 0.01 * spec.capacity:
            out.report[spec.key] = ProviderFeedback(remaining=aged)
    return out


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
