"""One table keyed by op (or name) per concern, written once: registering a key twice raises."""

from __future__ import annotations

from typing import Callable


def registrar(table: dict, what: str) -> Callable[[str], Callable]:
    """A decorator factory filling `table`: `@register(key)` stores the function under `key`."""

    def register(key: str):
        def store(fn):
            if key in table:
                raise ValueError(f"a {what} for {key} is already registered")
            table[key] = fn
            return fn

        return store

    return register


def lazy_exports(module: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module's `__getattr__` for `exports` (name -> the module defining it): each name is imported
    on first use and then kept, so importing the package itself costs nothing."""
    import importlib
    import sys

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
