"""Short names to factories; a miss names the valid choices."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gradexp.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map for one kind of component (models, activations, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def decorate(self, name: str) -> Callable[[T], T]:
        """Register the decorated object under ``name``."""
        return lambda obj: self.register(name, obj)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.kind}={name}: unknown; choose from {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
