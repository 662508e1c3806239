"""The simulator's request log: one record per finished request, in memory and optionally JSONL.

`stats` summarises the records for `GET /stats`. API keys are never stored: only `key_hash`, a
short SHA-256 prefix that tells keys apart.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


def key_hash(api_key: str | None) -> str:
    if not api_key:
        return "none"
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass
class RequestRecord:
    ts: float                        # wall-clock epoch seconds when the request ended
    request_id: str
    api: str                         # openai | anthropic
    model: str
    key_hash: str
    fault: str                       # what the simulator did; `rate_limited` also for TPM/RPM rejects
    status: int                      # HTTP status sent; 0 when none was (reset, hang, disconnect first)
    stream: bool
    input_tokens: int
    output_tokens: int               # generated, also when cancelled (tokens before the disconnect)
    cancelled: bool                  # the client went away (or the server stopped) before the end
    duration_s: float                # real seconds
    idempotency_key: str | None = None
    retry_count: str | None = None   # the `x-stainless-retry-count` header
    occurrence: int = 0              # how many times this exact request content was seen before
    finish: str | None = None        # stop reason in the API's vocabulary, when one was sent
    limited: str | None = None       # "tokens" | "requests" | "too_large": rejected by a TPM/RPM limit
    degraded: bool = False           # inside a brownout window
    sim_time_s: float = 0.0          # simulated seconds since start, at arrival


class RequestLog:
    """Thread-safe: the server appends on its loop; tests read from their own thread."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def add(self, record: RequestRecord) -> None:
        line = json.dumps(asdict(record), separators=(",", ":"))
        with self._lock:
            self._records.append(record)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()  # a crashed or killed run keeps every finished request

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in self._records]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per model by fault and status, tokens, cancellations and 429s."""
    models: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "requests": 0, "by_fault": Counter(), "by_status": Counter(), "input_tokens": 0,
        "output_tokens": 0, "cancelled": 0})
    cancelled = cancelled_tokens = n429 = 0
    for r in records:
        m = models[r["model"]]
        m["requests"] += 1
        m["by_fault"][r["fault"]] += 1
        m["by_status"][str(r["status"])] += 1
        m["input_tokens"] += r["input_tokens"]
        m["output_tokens"] += r["output_tokens"]
        if r["cancelled"]:
            m["cancelled"] += 1
            cancelled += 1
            cancelled_tokens += r["output_tokens"]
        n429 += r["status"] == 429
    return {
        "requests": len(records),
        "models": {k: {**v, "by_fault": dict(v["by_fault"]), "by_status": dict(v["by_status"])}
                   for k, v in models.items()},
        "cancelled": {"count": cancelled, "output_tokens_before_cancel": cancelled_tokens},
        "status_429": n429,
        "input_tokens": sum(r["input_tokens"] for r in records),
        "output_tokens": sum(r["output_tokens"] for r in records),
    }
