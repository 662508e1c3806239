"""Workflow specs: pydantic models usable from Python and loadable from YAML or JSON with one meaning.

A workflow is named steps with `depends_on`. Each step has a prompt template (see `tailrace.engine.templates`),
an ordered model ladder (strong -> fast), an output contract (the quality floor) and a `side_effect`
flag. Cross-field checks (duplicate ids, unknown dependencies, cycles, template references, unknown
providers) run in `WorkflowSpec`'s validator and name the offending field path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ProviderKind = Literal["openai", "anthropic"]
STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderSpec(_Spec):
    """How to reach one provider account. Keys come from the environment, never from the spec."""

    kind: ProviderKind
    base_url: str | None = None  # None: the SDK default (or OPENAI_BASE_URL / ANTHROPIC_BASE_URL)
    api_key_env: str | None = None  # None: OPENAI_API_KEY / ANTHROPIC_API_KEY
    tpm: int | None = Field(default=None, gt=0)  # account tokens per minute, for the budget
    rpm: int | None = Field(default=None, gt=0)
    input_tpm: int | None = Field(default=None, gt=0)  # Anthropic-style separate input/output limits
    output_tpm: int | None = Field(default=None, gt=0)


DEFAULT_PROVIDERS: dict[str, ProviderSpec] = {
    "openai": ProviderSpec(kind="openai"),
    "anthropic": ProviderSpec(kind="anthropic"),
}


class ModelChoice(_Spec):
    """One rung of a step's model ladder."""

    provider: str
    model: str
    max_tokens: int = Field(gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    input_usd_per_mtok: float = Field(default=0.0, ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    prompt: str | None = None  # this model's own prompt variant (a template)
    system: str | None = None
    # Latency prior for a cold model (no samples yet), in seconds.
    expected_ttft_s: float = Field(default=1.0, gt=0)
    expected_latency_s: float = Field(default=5.0, gt=0)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1e6


class OutputContract(_Spec):
    """The quality floor of a step: what a valid answer is."""

    kind: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    # A pydantic model as "package.module:ClassName"; from Python, `schema_model=MyModel` also works.
    schema_model: Any = None
    copy_ids: list[str] = Field(default_factory=list)  # input fields whose values must appear verbatim
    validators: list[str] = Field(default_factory=list)  # names registered with engine.validation
    min_chars: int = Field(default=1, ge=0)


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
    stall_gap_s: float = Field(default=2.0, gt=0)
    # ... or, after streaming for `min_stream_s`, it has delivered fewer tokens than this fraction of
    # its model's median decode rate would have (a slow stream: a straggler that started in time).
    slow_stream_factor: float = Field(default=0.4, ge=0, lt=1)
    min_stream_s: float = Field(default=0.5, gt=0)
    # An attempt is killed (reason `stalled`) and retried when it has no first token by this factor
    # times its TTFT trigger, no complete answer by this factor times its latency trigger, or a
    # silent stream for this factor times `stall_gap_s`. With hedging off it is the only way out.
    timeout_factor: float = Field(default=2.0, gt=1)
    max_concurrent: int = Field(default=3, ge=1)  # attempts of one step in flight at once
    # Speculative duplicates running at once. Recovery after a failed or invalid attempt is not
    # speculation and never counts here.
    max_duplicates: int = Field(default=2, ge=0)
    # A rung is chosen only if this quantile of its latency fits in the step's share of the time left;
    # a duplicate or retry only if it fits before the step's deadline.
    fit_quantile: float = Field(default=0.9, gt=0, lt=1)
    # Transient errors are retried while the deadline allows: the first retry of a rung at once, then
    # after `retry_backoff_s` doubling up to `max_backoff_s` (or the provider's retry-after).
    retry_backoff_s: float = Field(default=0.25, ge=0)
    max_backoff_s: float = Field(default=2.0, ge=0)
    # Duplicates and retries of a run may spend this fraction of the run's expected tokens (shared by
    # the steps running at once). A bound for runs that go wrong, not the average: hedging adds far less.
    extra_token_fraction: float = Field(default=2.0, ge=0)

    @property
    def ttft_trigger_quantile(self) -> float:
        return self.ttft_quantile if self.ttft_quantile is not None else 1.0 - self.max_extra_load

    @property
    def latency_trigger_quantile(self) -> float:
        return self.latency_quantile if self.latency_quantile is not None else 1.0 - self.max_extra_load / 2


class StepSpec(_Spec):
    id: str = Field(pattern=STEP_ID_PATTERN)
    prompt: str
    system: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    models: list[ModelChoice]
    output: OutputContract = Field(default_factory=OutputContract)
    side_effect: bool = False
    hedge: HedgeConfig | None = None  # per-step overrides of the executor's hedging defaults
    # A provider's content-policy rejection (HTTP 400) is a policy decision, not a transient error:
    # "fail" ends the step with it as the reason; "next_model" tries the next rung of the ladder.
    on_content_policy: Literal["fail", "next_model"] = "fail"


class RunOptions(_Spec):
    deadline_s: float = Field(default=30.0, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    tenant: str = "default"
    max_attempts_per_step: int = Field(default=4, ge=1)


class WorkflowSpec(_Spec):
    name: str
    description: str = ""
    inputs: list[str] = Field(default_factory=list)  # input record fields the templates may use
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)
    steps: list[StepSpec]
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
