"""Budgets on extra load: the global retry throttle (per executor) and a run's extra-token allowance.

`RetryThrottle` is gRPC's retry throttling (gRFC A6), kept per target model: each model has a token
bucket that starts full at `max_tokens`; a failed attempt on it costs 1 token, a successful one gives
back `token_ratio`. Retries and duplicates *to* that model are allowed only while its bucket holds
more than half. When a model fails for everyone, extra attempts on it stop, so an outage is not
multiplied by the engine's own retries; attempts on other models are unaffected.

`ExtraTokenBudget` is one step's share of its run's allowance for duplicates and retries (a fraction
of the run's expected tokens, split by the driver). A duplicate must fit its expected tokens in what
is left; a retry (nothing else running: it is the step's only way to an answer) needs only that
something is left. Spending counts actual usage once an attempt has ended, so a loser cancelled early costs little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tailrace.engine.errors import TailraceError
from tailrace.engine.prompts import render_messages
from tailrace.engine.specs import ModelChoice, StepSpec
from tailrace.engine.tokens import estimate_prompt_tokens
from tailrace.policies.attempts import AttemptState

# A step's answer is budgeted at half its max_tokens until usage is known (answers rarely fill it).
EXPECTED_OUTPUT_FRACTION = 0.5


class ThrottleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: float = Field(default=10.0, gt=0)
    token_ratio: float = Field(default=0.1, gt=0)


class RetryThrottle:
    def __init__(self, config: ThrottleConfig | None = None) -> None:
        self.config = config or ThrottleConfig()
        self._tokens: dict[str, float] = {}

    def tokens(self, model: str) -> float:
        return self._tokens.get(model, self.config.max_tokens)

    def allows(self, model: str) -> bool:
        return self.tokens(model) > self.config.max_tokens / 2

    def record(self, model: str, failed: bool) -> None:
        t = self.tokens(model)
        self._tokens[model] = max(0.0, t - 1.0) if failed else min(self.config.max_tokens, t + self.config.token_ratio)


class ExtraTokenBudget:
    """A step's allowance for duplicates and retries, in tokens (None: unlimited).

    Stateless over the attempts: what is spent is recomputed from them each time (finished extra
    attempts at their settled tokens, running ones at their expected tokens), so nothing can drift.
    """

    def __init__(self, allowance: int | None) -> None:
        self.allowance = allowance

    def remaining(self, attempts: Sequence[AttemptState], expected_tokens: Sequence[int]) -> float:
        if self.allowance is None:
            return float("inf")
        spent = 0
        for a in attempts:
            if a.role == "primary":
                continue
            spent += a.tokens if a.tokens is not None else expected_tokens[a.tier]
        return self.allowance - spent

    def affords(self, attempts: Sequence[AttemptState], expected_tokens: Sequence[int], tokens: int, role: str) -> bool:
        """A duplicate must fit its expected tokens; a retry needs only that something is left."""
        if role == "primary":
            return True
        left = self.remaining(attempts, expected_tokens)
        return tokens <= left if role == "duplicate" else left > 0


def expected_attempt_tokens(prompt_tokens: int, choice: ModelChoice) -> int:
    """What one attempt is expected to cost: its prompt and half its max_tokens of answer."""
    return prompt_tokens + int(choice.max_tokens * EXPECTED_OUTPUT_FRACTION)


def expected_step_tokens(step: StepSpec, inputs: Mapping[str, Any]) -> int:
    """What one attempt on a step's first rung is expected to cost, before its upstream steps have
    answered: rendered from the inputs when it can be, else from its raw templates."""
    choice = step.models[0]
    try:
        system, prompt = render_messages(step, choice, inputs, {})
    except TailraceError:
        system, prompt = choice.system or step.system, choice.prompt or step.prompt
        prompt += str(step.output.json_schema or "")
    return expected_attempt_tokens(estimate_prompt_tokens(system, prompt), choice)
