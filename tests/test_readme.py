"""The README as a user reads it: its test command is the one CI runs, its demo command runs the demo, and
every Python snippet runs as written (from a directory holding the repository's `examples/`, every
provider key unset, so the built-in simulator serves the calls, on the suite's Ray cluster)."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
PROVIDER_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "RAY_ADDRESS")


def _readme_commands() -> list[str]:
    # One-line bash blocks that build the venv; the test command may first install redis-server.
    return re.findall(r"```bash\n([^\n]*python3 -m venv[^\n]+)\n```", README)


def python_snippets() -> list[tuple[int, str]]:
    return [(README[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2))) for m in SNIPPET.finditer(README)]


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()
    assert "tailrace demo" in demo
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_readme_has_its_python_snippets():
    assert len(python_snippets()) >= 7


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("line", "code"), python_snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_every_python_snippet_runs_as_written(line, code, tmp_path, monkeypatch):
    import ray

    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    path, modules = list(sys.path), set(sys.modules)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name == "checks":  # the example's user module: another snippet imports it afresh
                del sys.modules[name]
        from tailrace.engine.validation import unregister_validator

        unregister_validator("human_review_over_50")
        with contextlib.suppress(ValueError):  # the budget snippet's actor is detached: not ours to keep
            ray.kill(ray.get_actor("tailrace-budget", namespace="tailrace"), no_restart=True)
    if "print(" in code:
        assert printed.getvalue().strip(), "the snippet printed nothing"
