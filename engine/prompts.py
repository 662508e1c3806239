"""What one rung of a step sends: its system text (with the output contract's instructions) and prompt.

One function, used by the runner to build the call and by the budget estimates, so both count the same
text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tailrace.engine.specs import ModelChoice, StepSpec
from tailrace.engine.templates import render
from tailrace.engine.validation import contract_instructions


def render_messages(
    step: StepSpec, choice: ModelChoice, inputs: Mapping[str, Any], upstream: Mapping[str, Any]
) -> tuple[str | None, str]:
    """(system, prompt) for `choice`: its own prompt variant or the step's. Raises TemplateError when
    an upstream output the templates need is missing or lacks the path."""
    prompt = render(choice.prompt or step.prompt, inputs, upstream)
    system_template = choice.system or step.system
    system_parts = [render(system_template, inputs, upstream)] if system_template else []
    instructions = contract_instructions(step.output, inputs)
    if instructions:
        system_parts.append(instructions)
    return "\n\n".join(system_parts) or None, prompt
