"""Lazy package exports (PEP 562): a package names what it exports and where each name lives; a module is
imported on first use. Every Ray actor process imports `tailrace.<package>` on its way to its own module,
and importing every sibling eagerly cost each of them about half a second of CPU."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, for `exports` (name -> module that defines it)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
