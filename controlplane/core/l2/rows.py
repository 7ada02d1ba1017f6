"""Value objects of the L2 index: what is written, what is stored, what a search returns."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

TEXT_MAX = 8192     # characters of semantic text kept per row (the verifier's guards read it)


@dataclasses.dataclass(frozen=True)
class Row:
    """One entry to write: the vector of a semantic text and the L1 key of its response."""

    scope: str
    tenant: str
    model: str
    vector: np.ndarray
    ref: str
    text: str


@dataclasses.dataclass(frozen=True)
class Record(Row):
    """A row as stored: normalised vector, bounded text and its creation time (wall clock,
    seconds; searches and expiry compare it with the TTL)."""

    created_at: float

    @classmethod
    def of(cls, row: Row, created_at: float) -> Record:
        return cls(row.scope, row.tenant, row.model, np.asarray(row.vector, dtype=np.float32),
                   row.ref, row.text[:TEXT_MAX], created_at)


class Stored(Protocol):
    """What the index reads of a stored row (a :class:`Record`, or a row the store read)."""

    @property
    def ref(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def vector(self) -> np.ndarray: ...
    @property
    def created_at(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A row that a search returned, with its similarity to the query."""

    ref: str
    text: str
    vector: np.ndarray
    similarity: float
    created_at: float
