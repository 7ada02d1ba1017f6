"""Counting the calls of a module's function in a test (tests count calls, never time)."""

from __future__ import annotations

import pytest


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """``module.name`` wrapped, for the test, to count its calls: ``[calls so far]``."""
    calls = [0]
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls
