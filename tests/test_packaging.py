"""One `tailrace` namespace: the repository's root folders install as `tailrace.*` and nothing else, and a
user's own `engine/` or `cluster/` folder cannot shadow them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TOOL = PYPROJECT["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found = {"tailrace"}
    for name, folder in TOOL["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *rel]))
    return found


def test_every_sub_package_is_installed_under_tailrace():
    assert set(TOOL["packages"]) == _packages_on_disk()
    assert all(p == "tailrace" or p.startswith("tailrace.") for p in TOOL["packages"])
    assert PYPROJECT["project"]["scripts"]["tailrace"] == "tailrace.cluster.cli:main"


@pytest.fixture
def shadowing_dir(tmp_path: Path) -> Path:
    """A user's project folder with its own `engine/` and `cluster/` packages, as tried by a new user."""
    for name in ("engine", "cluster", "actors", "policies"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    (tmp_path / "engine" / "clock.py").write_text("raise ImportError('the user module was imported')\n")
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_import_and_cli_work_from_a_folder_with_its_own_engine_and_cluster(shadowing_dir):
    example = ROOT / "examples" / "support_triage" / "workflow.yaml"
    code = (
        "import tailrace\n"
        "from tailrace import run_batch, load_workflow, WorkflowSpec, RunOptions, HedgeConfig, BudgetConfig\n"
        "from tailrace.cluster.api import run_batch as rb\n"
        "from tailrace.engine.clock import Deadline\n"
        f"spec = load_workflow({str(example)!r})\n"
        "assert isinstance(spec, WorkflowSpec) and rb is run_batch\n"
        "print('ok', len(spec.steps))\n"
    )
    out = _run([sys.executable, "-c", code], shadowing_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 6"
    cli = shutil.which("tailrace", path=str(Path(sys.executable).parent))
    assert cli is not None
    out = _run([cli, "run", "no-such-workflow.yaml", "--inputs", "no-such.jsonl"], shadowing_dir)
    assert out.returncode == 2, out.stderr  # the CLI loaded its own modules and reported the missing file
    assert "no-such-workflow.yaml" in out.stderr + out.stdout
    out = _run([sys.executable, "-m", "tailrace.cluster.cli", "--help"], shadowing_dir)
    assert out.returncode == 0 and "tailrace" in out.stdout


def test_the_wheel_holds_only_tailrace_and_works_on_its_own(tmp_path, shadowing_dir):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = wheels.glob("tailrace-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tailrace"}
    for module in (
        "tailrace/__init__.py",
        "tailrace/engine/clock.py",
        "tailrace/runtime/budget_exchange.lua",
        "tailrace/cluster/grafana/tailrace.json",
        "tailrace/engine/sim/server.py",
    ):
        assert module in names, module
    # Installed alone (no editable finder), it imports from a folder that holds look-alike packages.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "import tailrace.engine.clock as c, tailrace.runtime.budget_ledger as l; print(c.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=shadowing_dir,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
