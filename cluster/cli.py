"""The `tailrace` command: run a workflow batch (`run`, `demo`), serve the simulator (`sim`), live with a
cluster (`submit`, `status`, `logs`, `results`, `stop`), read results (`report`, `replay`), show the
cluster budget (`budget status`), and predict or tune a policy from a trace (`whatif`, `tune`).

Each group of subcommands lives in its own module with a `register(sub)` that adds its parsers and
returns their handlers (and may define `interrupted(args)`, the line printed on Ctrl-C); a new group
is one more entry in `COMMAND_MODULES`. Flags are never matched by prefix. Bad input (a missing
file, a malformed JSONL line, an invalid spec) and a setup that cannot work end in one clear
paragraph on stderr and exit status 2, never a traceback (see `cli_common` for every exit status).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from tailrace.cluster import cli_budget, cli_common, cli_ops, cli_run, cli_whatif
from tailrace.cluster.cli_run import DEMO_INPUTS, DEMO_WORKFLOW
from tailrace.engine.errors import TailraceError

COMMAND_MODULES: tuple[ModuleType, ...] = (cli_run, cli_ops, cli_budget, cli_whatif)
Handler = Callable[[argparse.Namespace], int]

__all__ = ["COMMAND_MODULES", "DEMO_INPUTS", "DEMO_WORKFLOW", "main"]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[ModuleType, Handler]]]:
    parser = cli_common.StrictParser(prog="tailrace", description="Valid LLM workflow results, on time.")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, tuple[ModuleType, Handler]] = {}
    for module in COMMAND_MODULES:
        for name, handler in module.register(sub).items():
            handlers[name] = (module, handler)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    module, handler = handlers[args.command]
    try:
        return handler(args)
    except TailraceError as exc:
        cli_common.error(str(exc))
        return cli_common.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        say = getattr(module, "interrupted", None)
        cli_common.errors.print(say(args) if say is not None else "interrupted", highlight=False)
        return cli_common.EXIT_INTERRUPTED
    except Exception as exc:  # never a traceback: one paragraph, and how to get the traceback
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    """Report an error tailrace did not raise on purpose: exit 2 for input too deep to process, else 70."""
    import os

    from rich.markup import escape

    from tailrace.engine.classify import redact_secrets

    if os.environ.get("TAILRACE_DEBUG"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, RecursionError):
        cli_common.error("the input is nested too deeply to process")
        return cli_common.EXIT_BAD_INPUT
    detail = redact_secrets(str(exc))[:300]
    cli_common.errors.print(
        f"[bold red]internal error:[/] {type(exc).__name__}: {escape(detail)} "
        "(set TAILRACE_DEBUG=1 to print the traceback; please report it)",
        highlight=False,
    )
    return 70


if __name__ == "__main__":
    sys.exit(main())
