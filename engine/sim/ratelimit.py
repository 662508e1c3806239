"""Per-API-key rate limits (requests and tokens per minute) and the headers that report them.

Limits are continuously refilled buckets over one *simulated* minute, charged at admission with
prompt tokens + max_tokens and corrected to what was produced when the request ends (`refund`), as
OpenAI and Anthropic both do; a request rejected with 429 is not charged. One key is one window,
whichever endpoint (OpenAI or Anthropic wire) it calls. Headers are written in *real* time, because
the client acts on them: with time_scale 0.01 a 6 s simulated wait is reported as 60 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Reported (not enforced) when a limit is not configured, so every response still has headers.
NOMINAL_RPM = 10_000
NOMINAL_TPM = 10_000_000
WINDOW_S = 60.0


class Bucket:
    """A bucket of `capacity` refilled at capacity / minute, in simulated seconds."""

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.level = capacity
        self.last = now
        self.charged_total = 0.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.last) * self.capacity / WINDOW_S)
        self.last = now

    def wait_for(self, amount: float) -> float:
        """Simulated seconds until `amount` is available (after `refill`)."""
        return max(0.0, (amount - self.level) * WINDOW_S / self.capacity)

    def until_full(self) -> float:
        return (self.capacity - self.level) * WINDOW_S / self.capacity

    def take(self, amount: float) -> None:
        self.level -= amount
        self.charged_total += amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)
        self.charged_total -= amount


@dataclass(frozen=True)
class LimitSnapshot:
    """A key's limits after an admission decision; durations in simulated seconds."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float


@dataclass(frozen=True)
class Admission:
    ok: bool
    snapshot: LimitSnapshot
    retry_after_s: float | None = None  # simulated; None: waiting will not help
    reason: str = ""  # "requests" | "tokens" | "too_large" when rejected


class RateLimiter:
    """Buckets per key. Unconfigured limits are tracked against nominal values but never enforced."""

    def __init__(self, tpm_limit: int | None, rpm_limit: int | None) -> None:
        self.tpm_limit = tpm_limit
        self.rpm_limit = rpm_limit
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _buckets(self, key: str, now: float) -> tuple[Bucket, Bucket]:
        if key not in self._requests:
            self._requests[key] = Bucket(self.rpm_limit or NOMINAL_RPM, now)
            self._tokens[key] = Bucket(self.tpm_limit or NOMINAL_TPM, now)
        req, tok = self._requests[key], self._tokens[key]
        req.refill(now)
        tok.refill(now)
        return req, tok

    def _snapshot(self, req: Bucket, tok: Bucket) -> LimitSnapshot:
        return LimitSnapshot(
            limit_requests=int(req.capacity),
            remaining_requests=max(0, math.floor(req.level)),
            reset_requests_s=req.until_full(),
            limit_tokens=int(tok.capacity),
            remaining_tokens=max(0, math.floor(tok.level)),
            reset_tokens_s=tok.until_full(),
        )

    def peek(self, key: str, now: float) -> LimitSnapshot:
        """The key's limits without charging anything (for responses to unusable requests)."""
        return self._snapshot(*self._buckets(key, now))

    def admit(self, key: str, tokens: int, now: float) -> Admission:
        """Charge one request of `tokens` (prompt + max_tokens) or reject it, at simulated `now`."""
        req, tok = self._buckets(key, now)
        if self.tpm_limit is not None and tokens > tok.capacity:
            return Admission(False, self._snapshot(req, tok), None, "too_large")
        waits = []
        if self.rpm_limit is not None and req.level < 1:
            waits.append(("requests", req.wait_for(1)))
        if self.tpm_limit is not None and tok.level < tokens:
            waits.append(("tokens", tok.wait_for(tokens)))
        if waits:
            reason, wait = max(waits, key=lambda w: w[1])
            return Admission(False, self._snapshot(req, tok), wait, reason)
        req.take(1)
        tok.take(tokens)
        return Admission(True, self._snapshot(req, tok))

    def refund(self, key: str, tokens: int, now: float) -> None:
        """Return reserved but unused output tokens (the correction to use at the end of a request)."""
        if key in self._tokens and tokens > 0:
            self._tokens[key].refill(now)
            self._tokens[key].give_back(tokens)

    def usage(self, now: float) -> dict[str, dict[str, float]]:
        """Per key: tokens in the current window (capacity - level), and everything ever charged."""
        out: dict[str, dict[str, float]] = {}
        for key, tok in self._tokens.items():
            tok.refill(now)
            out[key] = {
                "window_tokens": round(tok.capacity - tok.level, 1),
                "charged_tokens": round(tok.charged_total, 1),
                "tpm_limit": tok.capacity,
                "enforced": self.tpm_limit is not None,
            }
        return out


def duration_string(seconds: float) -> str:
    """OpenAI's reset format: `84ms`, `1s`, `17.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def openai_headers(s: LimitSnapshot, time_scale: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(s.limit_requests),
        "x-ratelimit-limit-tokens": str(s.limit_tokens),
        "x-ratelimit-remaining-requests": str(s.remaining_requests),
        "x-ratelimit-remaining-tokens": str(s.remaining_tokens),
        "x-ratelimit-reset-requests": duration_string(s.reset_requests_s * time_scale),
        "x-ratelimit-reset-tokens": duration_string(s.reset_tokens_s * time_scale),
    }


def rfc3339(wall_now: float, after_s: float) -> str:
    t = datetime.fromtimestamp(wall_now, UTC) + timedelta(seconds=after_s)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def anthropic_headers(s: LimitSnapshot, time_scale: float, wall_now: float) -> dict[str, str]:
    # One token bucket serves all three token families; input and output report the same bucket.
    out = {
        "anthropic-ratelimit-requests-limit": str(s.limit_requests),
        "anthropic-ratelimit-requests-remaining": str(s.remaining_requests),
        "anthropic-ratelimit-requests-reset": rfc3339(wall_now, s.reset_requests_s * time_scale),
    }
    for family in ("tokens", "input-tokens", "output-tokens"):
        out[f"anthropic-ratelimit-{family}-limit"] = str(s.limit_tokens)
        out[f"anthropic-ratelimit-{family}-remaining"] = str(s.remaining_tokens)
        out[f"anthropic-ratelimit-{family}-reset"] = rfc3339(wall_now, s.reset_tokens_s * time_scale)
    return out


def retry_after_headers(retry_after_s: float, time_scale: float) -> dict[str, str]:
    """`retry-after` in whole seconds (HTTP allows no fraction) and the exact `retry-after-ms`.

    Both SDKs read `retry-after-ms` first; a scaled run needs it, as whole seconds round up a lot.
    """
    real = retry_after_s * time_scale
    return {"retry-after": str(max(1, math.ceil(real))), "retry-after-ms": str(max(1, round(real * 1000)))}
