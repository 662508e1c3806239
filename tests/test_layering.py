"""Dependencies point one way: cluster -> actors -> runtime -> policies -> engine; only actors and cluster
import Ray at module level (runtime's metrics helpers import it lazily, when Ray runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["engine", "policies", "runtime", "actors", "cluster"]


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


@pytest.mark.parametrize("room", ["engine", "policies", "runtime"])
def test_ray_free_rooms_do_not_import_ray_at_module_level(room):
    for path in (ROOT / room).rglob("*.py"):
        assert not any(n == "ray" or n.startswith("ray.") for n in _imports(path, module_level_only=True)), path
