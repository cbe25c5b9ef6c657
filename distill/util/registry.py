"""Name -> class (or factory) tables: what the config's names select (tasks, strategies, divergences)."""
from __future__ import annotations

from typing import Callable, Dict


def registrar(table: Dict[str, object], kind: str) -> Callable[[str], Callable]:
    """A decorator factory that enters a class or factory into `table` under a name, once; the
    name is also set on it (`.name`)."""

    def register(name: str) -> Callable:
        def decorate(item):
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            item.name = name
            table[name] = item
            return item

        return decorate

    return register
