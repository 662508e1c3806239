"""What the budget limits, and what one attempt costs against each limit: `BudgetConfig` and friends.

Limits are per provider *account* (one API key; several provider names can share one, as the
simulator's do) and optionally per model. Each limit becomes one bucket per family: `tokens` (TPM),
`requests` (RPM), and for Anthropic-style accounts `input_tokens` and `output_tokens` separately.
Tenants have a weight (their fair share under contention) and an optional daily USD allowance,
which is a bucket of its own (`usd:<tenant>:<UTC day>`, no refill).

An attempt is charged at reservation what the provider charges at admission: estimated prompt
tokens + `max_tokens`. How it settles depends on how the provider counts the limit: `usage` (OpenAI
and Anthropic: the output reservation is corrected to what was produced when the request ends) or
`admission` (a provider that keeps max_tokens charged; only our prompt over-estimate comes back).
An attempt that failed still counts its prompt against the window; one cancelled before its usage
was reported counts its whole reservation (the provider may have produced more than arrived).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tailrace.policies.spend import SpendAsk, Usage

if TYPE_CHECKING:
    from tailrace.engine.specs import WorkflowSpec

Charges = Literal["admission", "usage"]
FAMILIES = ("tokens", "requests", "input_tokens", "output_tokens")
DEFAULT_CHARGES: dict[str, Charges] = {"openai": "usage", "anthropic": "usage"}
ALL_MODELS = "*"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitSpec(_Spec):
    """One provider limit: an account (and model, or all its models) with per-window quotas."""

    account: str
    model: str | None = None  # None: the whole account, every model
    tpm: int | None = Field(default=None, gt=0)
    rpm: int | None = Field(default=None, gt=0)
    input_tpm: int | None = Field(default=None, gt=0)  # Anthropic-style separate limits
    output_tpm: int | None = Field(default=None, gt=0)
    charges: Charges | None = None  # None: by the attempt's provider kind
    window_s: float | None = Field(default=None, gt=0)  # None: BudgetConfig.window_s

    def quotas(self) -> dict[str, int]:
        values = {
            "tokens": self.tpm,
            "requests": self.rpm,
            "input_tokens": self.input_tpm,
            "output_tokens": self.output_tpm,
        }
        return {family: v for family, v in values.items() if v is not None}


class TenantBudget(_Spec):
    weight: float = Field(default=1.0, gt=0)  # share of contended capacity
    daily_usd: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class BucketSpec:
    key: str
    family: str  # tokens | requests | input_tokens | output_tokens | usd
    capacity: float
    rate_per_s: float
    charges: Charges | None = None


class BudgetConfig(_Spec):
    """The cluster's budget. Pass to `run_batch(budget=...)`; every field has a working default."""

    limits: list[LimitSpec] = Field(default_factory=list)
    tenants: dict[str, TenantBudget] = Field(default_factory=dict)
    default_tenant: TenantBudget = Field(default_factory=TenantBudget)
    accounts: dict[str, str] = Field(default_factory=dict)  # provider name -> account id (the shared key)
    provider_kinds: dict[str, str] = Field(default_factory=dict)  # provider name -> openai | anthropic
    window_s: float = Field(default=60.0, gt=0)  # the "minute"; 60 * time_scale for a scaled simulator
    # Durability and sharing: the ledger lives in Redis when set (redis:// or rediss://, password inside).
    redis_url: SecretStr | None = None
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]+$")  # ledger key prefix in Redis
    actor_name: str = "tailrace-budget"
    redis_timeout_s: float = Field(default=0.5, gt=0)
    redis_fallback_fraction: float = Field(default=0.5, gt=0, le=1)  # local limit while Redis is down
    # How executors reach the ledger: short leases spent locally, or one actor call per attempt.
    mode: Literal["lease", "direct"] = "lease"
    lease_ttl_s: float = Field(default=2.0, gt=0)
    flush_interval_s: float = Field(default=0.05, gt=0)  # how often executors report and top up
    idle_release_s: float = Field(default=1.0, gt=0)  # return a lease unused for this long
    # The ledger (budget actor) silent this long, with no lease left to spend: no budget can be had, and runs
    # and reservations are refused at once, saying why. Long enough for Ray to restart or replace the actor.
    ledger_timeout_s: float = Field(default=10.0, gt=0)
    spare_fraction: float = Field(default=0.25, ge=0, le=1)  # duplicates only while this much is free
    # Runs that cannot be served before their deadline are refused at submission.
    admission: bool = True
    admission_margin: float = Field(default=0.03, ge=0, lt=1)  # plan with (1 - margin) of each rate
    # A cold workflow's steps are planned at this multiple of their latency priors (at most half the run's time).
    admission_latency_factor: float = Field(default=1.5, ge=1)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _url(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    # ---- derived --------------------------------------------------------------------------------

    def for_workflow(self, workflow: WorkflowSpec) -> BudgetConfig:
        """Add the limits a workflow's providers declare (`tpm`, `rpm`, `input_tpm`, `output_tpm`) where
        this config has no account-wide limit for that account, and learn the providers' kinds."""
        kinds = dict(self.provider_kinds)
        limits = list(self.limits)
        have = {(lim.account, lim.model) for lim in limits}
        used = {m.provider for s in workflow.steps for m in s.models}
        for name, spec in workflow.all_providers().items():
            if name not in used:
                continue
            kinds.setdefault(name, spec.kind)
            account = self.accounts.get(name, name)
            declared = LimitSpec(
                account=account, tpm=spec.tpm, rpm=spec.rpm, input_tpm=spec.input_tpm, output_tpm=spec.output_tpm
            )
            if declared.quotas() and (account, None) not in have:
                limits.append(declared)
                have.add((account, None))
        return self.model_copy(update={"limits": limits, "provider_kinds": kinds})

    def merged(self, newer: BudgetConfig) -> BudgetConfig:
        """This config updated with a newer one's limits, tenants and accounts (a second workflow on a
        running cluster). Where the ledger lives (Redis URL, namespace) never changes at run time."""
        limits = {(lim.account, lim.model): lim for lim in self.limits}
        limits.update({(lim.account, lim.model): lim for lim in newer.limits})
        keep = {"redis_url", "namespace", "actor_name"}
        update = {k: getattr(newer, k) for k in type(self).model_fields if k not in keep}
        update.update(
            limits=list(limits.values()),
            tenants={**self.tenants, **newer.tenants},
            accounts={**self.accounts, **newer.accounts},
            provider_kinds={**self.provider_kinds, **newer.provider_kinds},
        )
        return self.model_copy(update=update)

    def account_of(self, provider: str) -> str:
        return self.accounts.get(provider, provider)

    def tenant(self, name: str) -> TenantBudget:
        return self.tenants.get(name, self.default_tenant)

    def weight(self, tenant: str) -> float:
        return self.tenant(tenant).weight

    def charges_for(self, limit: LimitSpec, provider: str) -> Charges:
        return limit.charges or DEFAULT_CHARGES.get(self.provider_kinds.get(provider, provider), "admission")

    def buckets_for(self, provider: str, model: str) -> list[BucketSpec]:
        """Every rate bucket an attempt on (provider, model) is charged against."""
        account = self.account_of(provider)
        out = []
        for limit in self.limits:
            if limit.account != account or limit.model not in (None, model):
                continue
            window = limit.window_s or self.window_s
            for family, quota in limit.quotas().items():
                out.append(
                    BucketSpec(
                        bucket_key(family, account, limit.model),
                        family,
                        float(quota),
                        quota / window,
                        self.charges_for(limit, provider),
                    )
                )
        return out

    def spend_bucket(self, tenant: str, day: str) -> BucketSpec | None:
        limit = self.tenant(tenant).daily_usd
        if limit is None:
            return None
        return BucketSpec(f"usd:{tenant}:{day}", "usd", float(limit), 0.0)

    def bucket(self, key: str) -> BucketSpec | None:
        """Resolve a bucket key to its capacity and rate (the actor trusts only its own config)."""
        family, _, rest = key.partition(":")
        if family == "usd":
            tenant, _, day = rest.rpartition(":")
            return self.spend_bucket(tenant, day)
        account, _, model = rest.partition(":")
        for limit in self.limits:
            if limit.account == account and (limit.model or ALL_MODELS) == model:
                quota = limit.quotas().get(family)
                if quota is not None:
                    return BucketSpec(
                        key, family, float(quota), quota / (limit.window_s or self.window_s), limit.charges
                    )
        return None

    def redacted_redis_url(self) -> str | None:
        return None if self.redis_url is None else redact_url(self.redis_url.get_secret_value())


def bucket_key(family: str, account: str, model: str | None) -> str:
    return f"{family}:{account}:{model or ALL_MODELS}"


def utc_day(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%d")


def redact_url(url: str) -> str:
    """`rediss://user:secret@host:6380/0` -> `rediss://user:***@host:6380/0`; query strings dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    rest = rest.split("?", 1)[0]
    creds, at, host = rest.rpartition("@")
    if not at:
        return f"{scheme}://{host}"
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


# ---- what one attempt costs against a bucket ---------------------------------------------------------


def reserve_amount(spec: BucketSpec, ask: SpendAsk) -> float:
    """Charged before the attempt is sent: what the provider charges at admission, at most."""
    if spec.family == "tokens":
        return float(ask.input_tokens + ask.max_output_tokens)
    if spec.family == "requests":
        return 1.0
    if spec.family == "input_tokens":
        return float(ask.input_tokens)
    if spec.family == "output_tokens":
        return float(ask.max_output_tokens)
    return float(ask.cost_usd)


def settled_amount(spec: BucketSpec, charges: Charges, ask: SpendAsk, used: Usage) -> float:
    """What the attempt finally counts against the bucket, after it ended (however it ended)."""
    if spec.family == "requests":
        return 1.0
    if spec.family == "usd":
        return float(used.cost_usd)
    if used.cancelled and not used.reported:
        return reserve_amount(spec, ask)  # the provider may have produced more than arrived before the cancel
    # Without reported usage (a failed attempt) the provider still counted the prompt it admitted.
    prompt = float(used.input_tokens if used.reported else max(used.input_tokens, ask.input_tokens))
    output = float(used.output_tokens) if charges == "usage" else float(ask.max_output_tokens)
    if spec.family == "input_tokens":
        return prompt
    if spec.family == "output_tokens":
        return output
    return prompt + output
