"""Model names: aliases → canonical model, fallback chains, and the list for /v1/models.

A name is known when it is a configured canonical model or alias, or a model some backend
serves (agents and static upstreams need no model entry in the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    aliases: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()


class Catalog:
    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries = {e.name: e for e in entries}
        self._canonical: dict[str, str] = {}
        for e in self._entries.values():
            self._canonical[e.name] = e.name
            for alias in e.aliases:
                self._canonical[alias] = e.name

    def canonical(self, name: str) -> str:
        """The canonical model for ``name`` (itself when it is no alias)."""
        return self._canonical.get(name, name)

    def is_configured(self, name: str) -> bool:
        return name in self._canonical

    def fallbacks(self, canonical: str) -> tuple[str, ...]:
        entry = self._entries.get(canonical)
        return tuple(self.canonical(f) for f in entry.fallbacks) if entry else ()

    def aliases(self, canonical: str) -> tuple[str, ...]:
        entry = self._entries.get(canonical)
        return entry.aliases if entry else ()

    def configured(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def listing(self, served: Iterable[str]) -> list[tuple[str, str | None]]:
        """(name, canonical-if-alias) for every configured and served model, sorted."""
        names: dict[str, str | None] = {}
        for canonical in [*self._entries, *served]:
            names.setdefault(canonical, None)
            for alias in self.aliases(canonical):
                names.setdefault(alias, canonical)
        return sorted(names.items())
