"""Which endpoint and key each provider of a workflow uses: configured ones, or the embedded simulator.

With no API key and no base URL configured for any provider the workflow uses, tailrace runs the
built-in provider simulator instead, and says so. A half-configured setup is an error, never a silent
fallback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from tailrace.engine.errors import ProviderConfigError
from tailrace.engine.providers.base import DEFAULT_KEY_ENV, DEFAULT_URL_ENV, AdapterSettings
from tailrace.engine.specs import DEFAULT_PROVIDERS, ProviderSpec, WorkflowSpec

SIMULATOR_KEY = "tailrace-simulator"


@dataclass(frozen=True)
class SimulatorEndpoints:
    openai_base_url: str
    anthropic_base_url: str

    def for_kind(self, kind: str) -> str:
        return self.openai_base_url if kind == "openai" else self.anthropic_base_url


def used_providers(workflow: WorkflowSpec) -> dict[str, ProviderSpec]:
    known = workflow.all_providers()
    names = {m.provider for s in workflow.steps for m in s.models}
    return {name: known[name] for name in sorted(names)}


def _configured(spec: ProviderSpec) -> bool:
    key = os.environ.get(spec.api_key_env or DEFAULT_KEY_ENV[spec.kind])
    url = spec.base_url or os.environ.get(DEFAULT_URL_ENV[spec.kind])
    return bool(key or url)


def needs_simulator(workflow: WorkflowSpec) -> bool:
    """True when no provider the workflow uses has a key or a URL configured."""
    return not any(_configured(spec) for spec in used_providers(workflow).values())


def serving_spec(workflows: Sequence[WorkflowSpec]) -> WorkflowSpec:
    """One spec whose providers are every provider the workflows use (an engine serving them all); with
    no workflows, the default `openai` and `anthropic` providers."""
    providers: dict[str, ProviderSpec] = {}
    for workflow in workflows:
        for name, spec in used_providers(workflow).items():
            if providers.setdefault(name, spec) != spec:
                raise ProviderConfigError(
                    f"provider {name!r} is configured differently by two workflows ({workflow.name!r} and "
                    "an earlier one): give them different provider names"
                )
    if not providers:
        providers = dict(DEFAULT_PROVIDERS)
    names = sorted(providers)
    steps = [
        {"id": f"p{i}", "prompt": "-", "models": [{"provider": name, "model": "-", "max_tokens": 1}]}
        for i, name in enumerate(names)
    ]
    return WorkflowSpec.model_validate({"name": "engine", "providers": providers, "steps": steps})


def resolve_providers(
    workflow: WorkflowSpec, simulator: SimulatorEndpoints | None = None
) -> dict[str, AdapterSettings]:
    settings: dict[str, AdapterSettings] = {}
    for name, spec in used_providers(workflow).items():
        if simulator is not None:
            settings[name] = AdapterSettings(
                kind=spec.kind, base_url=simulator.for_kind(spec.kind), api_key=SIMULATOR_KEY
            )
            continue
        key_env = spec.api_key_env or DEFAULT_KEY_ENV[spec.kind]
        base_url = spec.base_url or os.environ.get(DEFAULT_URL_ENV[spec.kind])
        if not os.environ.get(key_env):
            if not base_url:
                raise ProviderConfigError(
                    f"provider {name!r} ({spec.kind}) has no API key: set {key_env}, or give it a "
                    f"base_url, or unset every provider key to use the built-in simulator"
                )
            # A compatible local server often needs no key; the SDKs still want one.
            settings[name] = AdapterSettings(kind=spec.kind, base_url=base_url, api_key="unused")
            continue
        settings[name] = AdapterSettings(kind=spec.kind, base_url=base_url, api_key_env=key_env)
    return settings
