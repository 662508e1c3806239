"""The README's test command is the one CI runs, and its demo command runs the demo."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    # One-line bash blocks that build the venv; the test command may first install redis-server.
    return re.findall(r"```bash\n([^\n]*python3 -m venv[^\n]+)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()
    assert "tailrace demo" in demo
    assert tests in (ROOT / ".ci" / "run").read_text()
