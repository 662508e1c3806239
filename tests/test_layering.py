"""Dependencies point one way: cluster -> actors -> whatif -> runtime -> policies -> engine; only actors and
cluster import Ray at module level (runtime's metrics helpers import it lazily, when Ray runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["engine", "policies", "runtime", "whatif", "actors", "cluster"]


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("room", ORDER)
def test_imports_point_one_way(room):
    allowed = {f"tailrace.{r}" for r in ORDER[: ORDER.index(room) + 1]}
    for path in (ROOT / room).rglob("*.py"):
        for name in _imports(path, module_level_only=False):
            if name.startswith("tailrace."):
                assert ".".join(name.split(".")[:2]) in allowed, f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("room", ["engine", "policies", "runtime", "whatif"])
def test_ray_free_rooms_do_not_import_ray_at_module_level(room):
    for path in (ROOT / room).rglob("*.py"):
        assert not any(n == "ray" or n.startswith("ray.") for n in _imports(path, module_level_only=True)), path


_REAL_CLOCK_CALLS = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("time", "time_ns"),
    ("time", "monotonic_ns"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("asyncio", "wait_for"),
}


@pytest.mark.parametrize("room", ORDER)
def test_time_is_read_only_through_the_injected_clock(room):
    """Outside engine/clock.py nothing reads the real clock or waits on the event loop's clock:
    `time.time()`, `time.monotonic()`, `asyncio.wait_for`, `asyncio.wait(..., timeout=)` all go through
    a `Clock` (engine.clock's `wait_first`, `wait_all`, `wait_for`), so tests can run on fake time."""
    for path in (ROOT / room).rglob("*.py"):
        if path == ROOT / "engine" / "clock.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert (name, node.func.attr) not in _REAL_CLOCK_CALLS, f"{where} calls {name}.{node.func.attr}"
            if (name, node.func.attr) == ("asyncio", "wait"):
                assert not any(k.arg == "timeout" for k in node.keywords), f"{where}: asyncio.wait(timeout=)"
            assert node.func.attr != "time" or name != "loop", f"{where} reads the event loop's clock"
