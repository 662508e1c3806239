"""The error tree: one base class, a few kinds users can catch."""

from __future__ import annotations


class TailraceError(Exception):
    """Base of every error tailrace raises on purpose."""


class SpecError(TailraceError):
    """A workflow spec or run option is invalid. `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class SpecErrors(TailraceError):
    """Several spec errors found in one check; each names its field. The message lists the first
    `SHOWN` (a spec with a million bad values gets a readable error, not a million lines); `errors`
    keeps them all."""

    SHOWN = 20

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        lines = [f"  - {e}" for e in errors[: self.SHOWN]]
        if len(errors) > self.SHOWN:
            lines.append(f"  ... and {len(errors) - self.SHOWN:,} more")
        super().__init__("invalid workflow spec:\n" + "\n".join(lines))


class InputError(TailraceError):
    """A batch input (file, JSONL line, record) is unusable."""


class ProviderConfigError(TailraceError):
    """A provider cannot be reached as configured (missing key, bad URL)."""


class ConfigurationError(TailraceError):
    """The setup cannot work, whatever is retried: user code an executor cannot resolve, a key the provider
    rejects, a model it does not serve, an endpoint that refuses connections. The message says what to fix."""
