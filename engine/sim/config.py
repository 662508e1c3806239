"""Simulator configuration: faults, model latency profiles, scenarios (`SimConfig`, `scenario`).

Every duration here is in *simulated* seconds; `SimConfig.time_scale` converts them to real
seconds when the server sleeps (0.01 runs 100x faster). Rate-limit windows and brownout windows
are simulated too, so a scaled run keeps the same shape, only faster.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Fault(StrEnum):
    """What the simulator does to one request. `ok` is a normal valid answer."""

    OK = "ok"
    # Latency faults: the answer is valid but late, or never comes.
    STRAGGLER = "straggler"  # TTFT and generation time multiplied by a big factor
    HANG = "hang"  # no headers, or headers and no tokens, until the client leaves
    STALL = "stall"  # the stream starts, pauses for a long gap, then continues
    # Hard errors before any response body.
    HTTP_500 = "http_500"
    OVERLOADED = "overloaded"  # OpenAI 503 server_is_overloaded / Anthropic 529 overloaded_error
    RATE_LIMITED = "rate_limited"  # 429 with retry-after
    QUOTA = "quota"  # 429 that never succeeds (no retry-after)
    CONTEXT_LENGTH = "context_length"  # 400
    CONTENT_POLICY = "content_policy"  # 400
    AUTH = "auth"  # 401
    TOO_LARGE = "too_large"  # 413
    RESET = "reset"  # the TCP connection is dropped before any response
    STREAM_ERROR = "stream_error"  # 200, then an error event or an abrupt close mid-body
    # Invalid outputs: a normal 200 whose content must fail validation.
    EMPTY = "empty"
    TRUNCATED = "truncated"  # cut at max_tokens: finish_reason length / stop_reason max_tokens
    REFUSAL = "refusal"
    FILTERED = "filtered"  # OpenAI finish_reason content_filter / Anthropic stop_reason refusal
    SCHEMA_MISS = "schema_miss"  # valid JSON, but a required property missing or of the wrong type
    ALTERED_ID = "altered_id"  # one copied identifier has one character changed
    NOT_JSON = "not_json"  # prose where JSON was asked


ERROR_FAULTS = frozenset(
    {
        Fault.HTTP_500,
        Fault.OVERLOADED,
        Fault.RATE_LIMITED,
        Fault.QUOTA,
        Fault.CONTEXT_LENGTH,
        Fault.CONTENT_POLICY,
        Fault.AUTH,
        Fault.TOO_LARGE,
    }
)
INVALID_OUTPUT_FAULTS = frozenset(
    {Fault.EMPTY, Fault.TRUNCATED, Fault.REFUSAL, Fault.FILTERED, Fault.SCHEMA_MISS, Fault.ALTERED_ID, Fault.NOT_JSON}
)


class ModelProfile(BaseModel):
    """Latency and output-length model of one model. Total latency ~ TTFT + output_tokens / tps."""

    model_config = ConfigDict(frozen=True)

    ttft_median_s: float = Field(gt=0)
    ttft_sigma: float = Field(ge=0)
    tokens_per_s: float = Field(gt=0)
    tps_sigma: float = Field(default=0.15, ge=0)  # request-to-request spread of decode speed
    output_tokens_median: int = Field(default=120, gt=0)
    output_tokens_sigma: float = Field(default=0.5, ge=0)
    context_window: int = Field(default=128_000, gt=0)
    # None: use SimConfig.fault_rates. A dict replaces the scenario's rates for this model.
    fault_rates: dict[Fault, float] | None = None


# From PROVIDERS.md "Suggested simulator profiles".
DEFAULT_PROFILES: dict[str, ModelProfile] = {
    "fast-small": ModelProfile(ttft_median_s=0.65, ttft_sigma=0.32, tokens_per_s=105),
    "mid": ModelProfile(ttft_median_s=0.75, ttft_sigma=0.5, tokens_per_s=80),
    "strong": ModelProfile(ttft_median_s=1.8, ttft_sigma=0.6, tokens_per_s=50, context_window=200_000),
}

KNOWN_MODELS: dict[str, str] = {
    "gpt-4o-mini": "fast-small",
    "gpt-4.1-mini": "fast-small",
    "gpt-4.1-nano": "fast-small",
    "gpt-5-mini": "fast-small",
    "gpt-5-nano": "fast-small",
    "claude-haiku-4-5": "fast-small",
    "gpt-4.1": "mid",
    "gpt-4o": "mid",
    "claude-sonnet-4-5": "mid",
    "gpt-5": "strong",
    "claude-opus-4-1": "strong",
}


def profile_class(model: str) -> str:
    """The profile class of a model name: exact known names first, then a substring fallback."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    low = model.lower()
    if any(s in low for s in ("mini", "haiku", "small", "nano")):
        return "fast-small"
    if "opus" in low or "gpt-5" in low:
        return "strong"
    return "mid"


class BrownoutConfig(BaseModel):
    """One model degrades in periodic windows of simulated time; every other model stays healthy.

    The model is degraded while `(sim_time - offset_s) mod period_s < duration_s` (and sim_time >=
    offset_s), where sim_time is simulated seconds since the server started. `model="auto"` lets
    the server pick the first OpenAI mid/strong model it is asked for (so any workflow sees a
    brownout); until then nothing is degraded.
    """

    model_config = ConfigDict(frozen=True)

    model: str = "gpt-4.1"
    period_s: float = Field(default=30.0, gt=0)
    duration_s: float = Field(default=8.0, ge=0)
    offset_s: float = Field(default=10.0, ge=0)
    latency_factor: float = Field(default=3.0, ge=1)
    overloaded_rate: float = Field(default=0.4, ge=0, le=1)

    def degraded(self, model: str, sim_time: float) -> bool:
        if model != self.model or sim_time < self.offset_s:
            return False
        return (sim_time - self.offset_s) % self.period_s < self.duration_s


class LatencyModel(BaseModel):
    """The shape of a request's latency around its model profile (a family, so no result depends on one
    hand-picked distribution):

    * `lognormal`: TTFT = median x e^N(0, sigma), the profile's own spread (the default);
    * `pareto`: TTFT = median x a Pareto factor of shape `pareto_alpha` with median 1 (alpha 1.5: finite
      mean, infinite variance; p99 is ~14x the median);
    * `bimodal`: lognormal, and a `slow_fraction` of requests in a mode `slow_factor` times slower
      (first token and decode both).
    Faults (stragglers, hangs, ...) come on top, from the fault rates.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal["lognormal", "pareto", "bimodal"] = "lognormal"
    pareto_alpha: float = Field(default=1.5, gt=1)
    slow_fraction: float = Field(default=0.1, ge=0, le=1)
    slow_factor: float = Field(default=4.0, ge=1)


class SimConfig(BaseModel):
    """Everything that decides the simulator's behaviour. Plans are a pure function of this."""

    model_config = ConfigDict(frozen=True)

    name: str = "custom"
    seed: int = 0
    time_scale: float = Field(default=1.0, gt=0)
    profiles: dict[str, ModelProfile] = Field(default_factory=lambda: dict(DEFAULT_PROFILES))
    model_profiles: dict[str, ModelProfile] = Field(default_factory=dict)  # model name -> override
    fault_rates: dict[Fault, float] = Field(default_factory=dict)  # probability per request
    straggler_factor: tuple[float, float] = (3.0, 10.0)  # uniform range
    stall_s: tuple[float, float] = (10.0, 30.0)  # gap length, uniform range
    stall_at: float | None = Field(default=None, ge=0, le=1)  # where in the stream a stall starts; None: anywhere
    latency: LatencyModel = Field(default_factory=LatencyModel)
    script: dict[str, list[Fault]] = Field(default_factory=dict)  # model -> faults of its first N requests
    force_fault: dict[str, Fault] = Field(default_factory=dict)  # model -> always this fault
    brownout: BrownoutConfig | None = None
    tpm_limit: int | None = Field(default=None, gt=0)  # tokens per minute per API key (enforced)
    rpm_limit: int | None = Field(default=None, gt=0)  # requests per minute per API key (enforced)
    max_stream_chunks: int = Field(default=20, ge=1)  # bounds the cost of one streamed response
    default_max_tokens: int = Field(default=4096, gt=0)  # OpenAI requests without max_tokens

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        for rates in [self.fault_rates, *(p.fault_rates or {} for p in self.model_profiles.values())]:
            if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
                raise ValueError("fault rates must be >= 0 and sum to at most 1")
        for lo, hi in (self.straggler_factor, self.stall_s):
            if not 0 < lo <= hi:
                raise ValueError("ranges must be (low, high) with 0 < low <= high")
        return self

    def profile(self, model: str) -> ModelProfile:
        if model in self.model_profiles:
            return self.model_profiles[model]
        cls = profile_class(model)
        return self.profiles.get(cls) or DEFAULT_PROFILES[cls]

    def rates(self, model: str) -> dict[Fault, float]:
        own = self.profile(model).fault_rates
        return dict(own) if own is not None else dict(self.fault_rates)


# Small error rates from PROVIDERS.md, a realistic latency tail and ~1.5% empty answers.
HEAVY_TAIL_RATES: dict[Fault, float] = {
    Fault.STRAGGLER: 0.04,
    Fault.HANG: 0.002,
    Fault.STALL: 0.005,
    Fault.HTTP_500: 0.003,
    Fault.OVERLOADED: 0.002,
    Fault.RESET: 0.001,
    Fault.STREAM_ERROR: 0.002,
    Fault.EMPTY: 0.015,
    Fault.TRUNCATED: 0.003,
    Fault.REFUSAL: 0.001,
    Fault.SCHEMA_MISS: 0.004,
    Fault.ALTERED_ID: 0.002,
    Fault.NOT_JSON: 0.002,
}

# The fault mix every latency family of the tail benchmark shares (issue 8's provider): 2 % HTTP 500/529,
# 1 % 429, 3 % invalid answers, 0.5 % connection resets.
FAMILY_FAULT_RATES: dict[Fault, float] = {
    Fault.HTTP_500: 0.01,
    Fault.OVERLOADED: 0.01,
    Fault.RATE_LIMITED: 0.01,
    Fault.RESET: 0.005,
    Fault.EMPTY: 0.015,
    Fault.REFUSAL: 0.005,
    Fault.SCHEMA_MISS: 0.005,
    Fault.NOT_JSON: 0.005,
}
# The heavy-tail mix on top of it: 4 % of requests 8x slower, 1 % hangs.
HEAVY_TAIL_MIX_RATES: dict[Fault, float] = {**FAMILY_FAULT_RATES, Fault.STRAGGLER: 0.04, Fault.HANG: 0.01}
# The latency families of `benchmarks/tail.py --families all`, each a scenario of its own.
FAMILIES = ("heavy-tail-mix", "pareto", "bimodal", "brownout-mix")

SCENARIOS: dict[str, dict[str, Any]] = {
    # No faults at all: every request gets a valid answer. Outputs kept short for quick runs.
    "clean": {
        "name": "clean",
        "profiles": {
            k: p.model_copy(update={"output_tokens_median": 80, "output_tokens_sigma": 0.3})
            for k, p in DEFAULT_PROFILES.items()
        },
    },
    "heavy-tail": {"name": "heavy-tail", "fault_rates": HEAVY_TAIL_RATES},
    # A correlated outage of one model; the others stay clean so the effect is isolated.
    "brownout": {"name": "brownout", "brownout": BrownoutConfig()},
    # Per-key token-per-minute enforcement, charged at admission as prompt + max_tokens.
    "tpm": {"name": "tpm", "tpm_limit": 100_000},
    # ---- latency families (see FAMILIES) ----
    "heavy-tail-mix": {"name": "heavy-tail-mix", "fault_rates": HEAVY_TAIL_MIX_RATES, "straggler_factor": (8.0, 8.0)},
    "pareto": {"name": "pareto", "fault_rates": FAMILY_FAULT_RATES, "latency": {"family": "pareto"}},
    "bimodal": {"name": "bimodal", "fault_rates": FAMILY_FAULT_RATES, "latency": {"family": "bimodal"}},
    # The first rung 6x slower with 10 % 503/529 for 20 s of every 50 s.
    "brownout-mix": {
        "name": "brownout-mix",
        "fault_rates": FAMILY_FAULT_RATES,
        "brownout": BrownoutConfig(
            model="gpt-4.1", period_s=50.0, duration_s=20.0, offset_s=10.0, latency_factor=6.0, overloaded_rate=0.1
        ),
    },
    # ---- single failure modes (issue 8's defects) on the first rung, gpt-4.1 ----
    # It accepts the request and never answers.
    "silent-route": {"name": "silent-route", "force_fault": {"gpt-4.1": Fault.HANG}},
    # Every stream stops half-way for 30 s.
    "stall-halfway": {
        "name": "stall-halfway",
        "force_fault": {"gpt-4.1": Fault.STALL},
        "stall_at": 0.5,
        "stall_s": (30.0, 30.0),
    },
    # Every first token takes 20 s.
    "slow-first-token": {
        "name": "slow-first-token",
        "model_profiles": {"gpt-4.1": ModelProfile(ttft_median_s=20.0, ttft_sigma=0.0, tokens_per_s=80)},
    },
}


def scenario(name: str, **overrides: Any) -> SimConfig:
    """A named scenario's config, with any `SimConfig` field overridden (validated)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SimConfig.model_validate({**SCENARIOS[name], **overrides})
