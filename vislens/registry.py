"""One small name -> object registry, shared by methods, datasets, figures and model adapters.

Each registry owns its names: there is no second list to keep in step by hand. Lookups of an
unknown name raise a one-line :class:`~vislens.errors.VislensError` that lists the valid names.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import VislensError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in error messages, e.g. ``"method"``).

    Entries keep their registration order, so ``names()`` is a stable listing for help texts.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a name can be registered once."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        """The entry called ``name``; unknown names are a one-line error listing the valid ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise VislensError(f"unknown {self.kind} {name!r} (valid: {', '.join(self._entries)})"
                               ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
