"""The simulator's request log: one record per finished request, in memory and optionally JSONL.

`Summary` keeps the running totals behind `GET /stats`. API keys are never stored: only `key_hash`, a
short SHA-256 prefix that tells keys apart.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


def key_hash(api_key: str | None) -> str:
    if not api_key:
        return "none"
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass
class RequestRecord:
    ts: float  # wall-clock epoch seconds when the request ended
    request_id: str
    api: str  # openai | anthropic
    model: str
    key_hash: str
    fault: str  # what the simulator did; `rate_limited` also for TPM/RPM rejects
    status: int  # HTTP status sent; 0 when none was (reset, hang, disconnect first)
    stream: bool
    input_tokens: int
    output_tokens: int  # generated, also when cancelled (tokens before the disconnect)
    cancelled: bool  # the client went away (or the server stopped) before the end
    duration_s: float  # real seconds
    idempotency_key: str | None = None
    retry_count: str | None = None  # the `x-stainless-retry-count` header
    occurrence: int = 0  # how many times this exact request content was seen before
    finish: str | None = None  # stop reason in the API's vocabulary, when one was sent
    limited: str | None = None  # "tokens" | "requests" | "too_large": rejected by a TPM/RPM limit
    degraded: bool = False  # inside a brownout window
    sim_time_s: float = 0.0  # simulated seconds since start, at arrival


class Summary:
    """Running totals for `GET /stats`, updated per record so stats cost nothing under load."""

    def __init__(self) -> None:
        self.requests = 0
        self.models: dict[str, dict[str, Any]] = defaultdict(
            lambda: {
                "requests": 0,
                "by_fault": Counter(),
                "by_status": Counter(),
                "input_tokens": 0,
                "output_tokens": 0,
                "cancelled": 0,
            }
        )
        self.cancelled = 0
        self.cancelled_tokens = 0
        self.status_429 = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def add(self, r: RequestRecord) -> None:
        self.requests += 1
        m = self.models[r.model]
        m["requests"] += 1
        m["by_fault"][r.fault] += 1
        m["by_status"][str(r.status)] += 1
        m["input_tokens"] += r.input_tokens
        m["output_tokens"] += r.output_tokens
        self.input_tokens += r.input_tokens
        self.output_tokens += r.output_tokens
        if r.cancelled:
            m["cancelled"] += 1
            self.cancelled += 1
            self.cancelled_tokens += r.output_tokens
        self.status_429 += r.status == 429

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "models": {
                k: {**v, "by_fault": dict(v["by_fault"]), "by_status": dict(v["by_status"])}
                for k, v in self.models.items()
            },
            "cancelled": {"count": self.cancelled, "output_tokens_before_cancel": self.cancelled_tokens},
            "status_429": self.status_429,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


class RequestLog:
    """Thread-safe: the server appends on its loop; tests read from their own thread.

    Memory keeps the last `keep` records (a long `tailrace sim` session must not grow without
    bound); the JSONL file and the summary cover every request.
    """

    def __init__(self, path: str | Path | None = None, keep: int = 200_000) -> None:
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=keep)
        self._summary = Summary()
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def add(self, record: RequestRecord) -> None:
        line = json.dumps(vars(record), separators=(",", ":"))
        with self._lock:
            self._records.append(record)
            self._summary.add(record)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()  # a crashed or killed run keeps every finished request

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(vars(r)) for r in self._records]

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return self._summary.as_dict()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
