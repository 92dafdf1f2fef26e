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
