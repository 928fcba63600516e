"""Name -> entry registries: recipes, data sources, evaluation protocols and Tune schedulers all use this one shape.

An entry is registered where it is defined (a decorator next to the function or class), so adding one touches one
file; `names()` drives the CLI's choices and the parametrised tests. Registering a name twice is an error: two
entries silently shadowing each other is the bug a registry exists to prevent. A registry may be given a `load`
function that imports the modules whose import registers the entries (recipes: every module of the package).
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from .config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, load: Callable[[], None] | None = None):
        self.kind = kind                       # "recipe", "data source", ...: used in messages
        self._entries: dict[str, T] = {}
        self._load = load

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            old = self._entries[name]
            where = getattr(getattr(old, "cls", old), "__module__", None)   # a recipe's entry holds its class
            raise ValueError(f"{self.kind} {name!r} is already registered{f' by {where}' if where else ''}; "
                             f"pick another name")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: the decorated object itself is the entry."""
        return lambda obj: self.add(name, obj)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """In the order of registration (a module lists its entries as it means them to be offered)."""
        self._ensure_loaded()
        return list(self._entries)

    def __contains__(self, name: Any) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()
