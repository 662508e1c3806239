"""Workflow specs: pydantic models usable from Python and loadable from YAML or JSON with one meaning.

A workflow is named steps with `depends_on`. Each step has a prompt template (see `tailrace.engine.templates`),
an ordered model ladder (strong -> fast), an output contract (the quality floor) and a `side_effect`
flag. Cross-field checks (duplicate ids, unknown dependencies, cycles, template references, unknown
providers) run in `WorkflowSpec`'s validator and name the offending field path.

Every number is finite and bounded (`allow_inf_nan=False` and an upper limit on each field): a spec is
input, and `deadline_s: .inf` or `max_tokens: 1e30` would otherwise be a run that never ends or a
reservation no quota can hold. The limits are far above any real use; `SpecLimits` names them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from tailrace.engine._bounds import ShapeError, ShapeLimits, check_shape

ProviderKind = Literal["openai", "anthropic"]
STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class SpecLimits:
    """Upper bounds of a spec's numbers and sizes (a spec is input: nothing in it may be unbounded)."""

    MAX_DEADLINE_S: Final = 86_400.0  # a day: tailrace serves runs, not jobs
    MAX_COST_USD: Final = 1_000_000.0
    MAX_USD_PER_MTOK: Final = 10_000.0
    MAX_LATENCY_S: Final = 3_600.0  # latency priors and hedging durations
    MAX_TOKENS: Final = 1_000_000  # output tokens of one call
    MAX_RATE: Final = 10**12  # tokens or requests per minute
    MAX_ATTEMPTS: Final = 100
    MAX_CONCURRENT: Final = 64  # attempts of one step at once, duplicates per step
    MAX_EXTRA_TOKEN_FRACTION: Final = 100.0
    MAX_STEPS: Final = 1_000
    MAX_MODELS: Final = 32  # rungs of one ladder
    MAX_LIST: Final = 1_000  # inputs, depends_on, copy_ids, validators, providers
    MAX_TEXT_CHARS: Final = 256 * 1024  # one prompt or system template
    MAX_NAME_CHARS: Final = 256  # names, ids, model names, tenants
    MAX_SCHEMA_CHARS: Final = 64 * 1024  # a JSON Schema as compact JSON (it goes into every system prompt)


_L = SpecLimits
_SCHEMA_SHAPE = ShapeLimits(max_depth=48, max_nodes=50_000, max_chars=_L.MAX_SCHEMA_CHARS)
Name = Annotated[str, StringConstraints(max_length=_L.MAX_NAME_CHARS)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProviderSpec(_Spec):
    """How to reach one provider account. Keys come from the environment, never from the spec."""

    kind: ProviderKind
    # None: the SDK default (or OPENAI_BASE_URL / ANTHROPIC_BASE_URL)
    base_url: str | None = Field(default=None, max_length=2048)
    api_key_env: Name | None = None  # None: OPENAI_API_KEY / ...
    tpm: int | None = Field(default=None, gt=0, le=_L.MAX_RATE)  # account tokens per minute, for the budget
    rpm: int | None = Field(default=None, gt=0, le=_L.MAX_RATE)
    # Anthropic-style separate input/output limits
    input_tpm: int | None = Field(default=None, gt=0, le=_L.MAX_RATE)
    output_tpm: int | None = Field(default=None, gt=0, le=_L.MAX_RATE)


DEFAULT_PROVIDERS: dict[str, ProviderSpec] = {
    "openai": ProviderSpec(kind="openai"),
    "anthropic": ProviderSpec(kind="anthropic"),
}


class ModelChoice(_Spec):
    """One rung of a step's model ladder."""

    provider: Name
    model: Name
    max_tokens: int = Field(gt=0, le=_L.MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    input_usd_per_mtok: float = Field(default=0.0, ge=0, le=_L.MAX_USD_PER_MTOK)
    output_usd_per_mtok: float = Field(default=0.0, ge=0, le=_L.MAX_USD_PER_MTOK)
    # this model's own prompt variant (a template)
    prompt: str | None = Field(default=None, max_length=_L.MAX_TEXT_CHARS)
    system: str | None = Field(default=None, max_length=_L.MAX_TEXT_CHARS)
    # Latency prior for a cold model (no samples yet), in seconds.
    expected_ttft_s: float = Field(default=1.0, gt=0, le=_L.MAX_LATENCY_S)
    expected_latency_s: float = Field(default=5.0, gt=0, le=_L.MAX_LATENCY_S)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1e6


class OutputContract(_Spec):
    """The quality floor of a step: what a valid answer is."""

    kind: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    # A pydantic model as "package.module:ClassName"; from Python, `schema_model=MyModel` also works.
    schema_model: Any = None
    # input fields whose values must appear verbatim
    copy_ids: list[Name] = Field(default_factory=list, max_length=_L.MAX_LIST)
    # names registered with engine.validation
    validators: list[Name] = Field(default_factory=list, max_length=_L.MAX_LIST)
    min_chars: int = Field(default=1, ge=0, le=_L.MAX_TOKENS * 16)

    @field_validator("json_schema")
    @classmethod
    def _bounded_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        # The schema is sent with every attempt: a small spec that expands (YAML aliases, shared dicts)
        # to megabytes would cost that on every call. Its compact JSON must fit the bound.
        if schema is not None:
            try:
                check_shape(schema, _SCHEMA_SHAPE)
                size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False))
            except ShapeError as exc:
                where = "/".join(str(k) for k in exc.path) or "(root)"
                raise ValueError(f"at {where}: {exc.message}") from None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"not a JSON value ({type(exc).__name__}: {str(exc)[:80]})") from None
            if size > _L.MAX_SCHEMA_CHARS:
                raise ValueError(f"the schema is {size:,} characters as JSON; at most {_L.MAX_SCHEMA_CHARS:,}")
        return schema


class HedgeConfig(_Spec):
    """How a step controls its tail: when a duplicate starts, how many run at once, what extra load it may add.

    Lives here (not in `policies`) so a step spec can carry it; `tailrace.policies.hedging` implements it.
    A step's `hedge` overrides only the fields it sets; the rest come from the executor's default.
    Durations are in seconds of the run's clock.

    The knob is `max_extra_load`, as in Finagle's BackupRequestFilter: a duplicate starts when the
    newest running attempt has no first token by the `1 - max_extra_load` quantile of its model's time
    to first token (so about that fraction of attempts is backed up), or no complete answer by the
    `1 - max_extra_load / 2` quantile of its latency. `enabled=False` is the same policy with no
    duplicates: one attempt at a time, each killed at its attempt timeout and retried.
    """

    enabled: bool = True  # False: no duplicates (one attempt at a time, with attempt timeouts)
    max_extra_load: float = Field(default=0.05, gt=0, lt=1)
    # Explicit trigger quantiles; None (the default) derives them from `max_extra_load`.
    ttft_quantile: float | None = Field(default=None, gt=0, lt=1)
    latency_quantile: float | None = Field(default=None, gt=0, lt=1)
    # A duplicate also starts when the stream has been silent this long after the first token ...
    stall_gap_s: float = Field(default=2.0, gt=0, le=_L.MAX_LATENCY_S)
    # ... or, after streaming for `min_stream_s`, it has delivered fewer tokens than this fraction of
    # its model's median decode rate would have (a slow stream: a straggler that started in time).
    slow_stream_factor: float = Field(default=0.4, ge=0, lt=1)
    min_stream_s: float = Field(default=0.5, gt=0, le=_L.MAX_LATENCY_S)
    # An attempt is killed (reason `stalled`) and retried when it has no first token by this factor
    # times its TTFT trigger, no complete answer by this factor times its latency trigger, or a
    # silent stream for this factor times `stall_gap_s`. With hedging off it is the only way out.
    timeout_factor: float = Field(default=2.0, gt=1, le=100)
    max_concurrent: int = Field(default=3, ge=1, le=_L.MAX_CONCURRENT)  # attempts of one step in flight at once
    # Speculative duplicates running at once. Recovery after a failed or invalid attempt is not
    # speculation and never counts here.
    max_duplicates: int = Field(default=2, ge=0, le=_L.MAX_CONCURRENT)
    # A rung is chosen only if this quantile of its latency fits in the step's share of the time left;
    # a duplicate or retry only if it fits before the step's deadline.
    fit_quantile: float = Field(default=0.9, gt=0, lt=1)
    # Transient errors are retried while the deadline allows: the first retry of a rung at once, then
    # after `retry_backoff_s` doubling up to `max_backoff_s` (or the provider's retry-after).
    retry_backoff_s: float = Field(default=0.25, ge=0, le=_L.MAX_LATENCY_S)
    max_backoff_s: float = Field(default=2.0, ge=0, le=_L.MAX_LATENCY_S)
    # Duplicates and retries of a run may spend this fraction of the run's expected tokens (shared by
    # the steps running at once). A bound for runs that go wrong, not the average: hedging adds far less.
    extra_token_fraction: float = Field(default=2.0, ge=0, le=_L.MAX_EXTRA_TOKEN_FRACTION)

    @property
    def ttft_trigger_quantile(self) -> float:
        return self.ttft_quantile if self.ttft_quantile is not None else 1.0 - self.max_extra_load

    @property
    def latency_trigger_quantile(self) -> float:
        return self.latency_quantile if self.latency_quantile is not None else 1.0 - self.max_extra_load / 2


class StepSpec(_Spec):
    id: str = Field(pattern=STEP_ID_PATTERN, max_length=_L.MAX_NAME_CHARS)
    prompt: str = Field(max_length=_L.MAX_TEXT_CHARS)
    system: str | None = Field(default=None, max_length=_L.MAX_TEXT_CHARS)
    depends_on: list[Name] = Field(default_factory=list, max_length=_L.MAX_STEPS)
    models: list[ModelChoice] = Field(max_length=_L.MAX_MODELS)
    output: OutputContract = Field(default_factory=OutputContract)
    side_effect: bool = False
    hedge: HedgeConfig | None = None  # per-step overrides of the executor's hedging defaults
    # A provider's content-policy rejection (HTTP 400) is a policy decision, not a transient error:
    # "fail" ends the step with it as the reason; "next_model" tries the next rung of the ladder.
    on_content_policy: Literal["fail", "next_model"] = "fail"


class RunOptions(_Spec):
    deadline_s: float = Field(default=30.0, gt=0, le=_L.MAX_DEADLINE_S)
    max_cost_usd: float | None = Field(default=None, gt=0, le=_L.MAX_COST_USD)
    tenant: Name = "default"
    max_attempts_per_step: int = Field(default=4, ge=1, le=_L.MAX_ATTEMPTS)


class WorkflowSpec(_Spec):
    name: Name
    description: str = Field(default="", max_length=_L.MAX_TEXT_CHARS)
    # input record fields the templates may use
    inputs: list[Name] = Field(default_factory=list, max_length=_L.MAX_LIST)
    providers: dict[Name, ProviderSpec] = Field(default_factory=dict, max_length=_L.MAX_LIST)
    steps: list[StepSpec] = Field(max_length=_L.MAX_STEPS)
    defaults: RunOptions = Field(default_factory=RunOptions)

    @model_validator(mode="after")
    def _check(self) -> WorkflowSpec:
        from tailrace.engine.spec_checks import check_workflow

        check_workflow(self)
        return self

    def all_providers(self) -> dict[str, ProviderSpec]:
        return {**DEFAULT_PROVIDERS, **self.providers}

    def step(self, step_id: str) -> StepSpec:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)
