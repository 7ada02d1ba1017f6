"""Bounded numbers on a command line: argparse ``type=`` factories, one home for the rule.

Each factory returns a parser that takes the option's text and gives back an ``int`` or a
finite ``float`` within the bounds, or raises :class:`argparse.ArgumentTypeError`, which
argparse turns into a usage error naming the option (exit 2). Every refusal quotes the
text as typed (the start of a long one) and, for a value out of range, says the range
allowed: the operator learns what to type from one line, and never sees a traceback from a
conversion further on.

A non-finite float (``nan``, ``inf``, or ``1e400``, which Python reads as ``inf``) is
never taken: ``nan`` passes every ``<`` comparison as false and would slip through a range
check. Whole numbers are compared as Python ints, never through ``float``, so a
hundreds-of-digits value is refused as out of range rather than overflowing. The parsers
are named ``int`` and ``float``, the names argparse's own messages give a type.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

PORT_MAX = 65535
# A protobuf uint32 field's and a numpy seed's range: the ceiling of most counts a tool takes.
UINT32_MAX = 2**32 - 1
QUOTE_CHARS = 40    # of the text a refusal quotes: a longer one is cut, its length said


def integer(low: int, high: int | None = None, *, noun: str = "whole number",
            note: str = "") -> Callable[[str], int]:
    """A whole number in ``low``..``high`` (``high`` None: no upper bound). ``noun`` names
    what a non-number is not; ``note`` is appended to the out-of-range refusal (what a
    value means, e.g. ``0 = any free``)."""
    span = _span(low, high, low_open=False, high_open=False, note=note)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {_quoted(text)}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{_quoted(text)} is out of range: must be {span}")
        return value

    parse.__name__ = "int"
    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, note: str = "") -> Callable[[str], float]:
    """A finite number in ``low``..``high``; ``low_open``/``high_open`` exclude the bound
    itself (a share in (0, 1] is ``number(0, 1, low_open=True)``)."""
    span = _span(low, None if math.isinf(high) else high, low_open=low_open,
                 high_open=high_open, note=note)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {_quoted(text)}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {_quoted(text)}")
        if (value < low or value > high or (low_open and value == low)
                or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"{_quoted(text)} is out of range: must be {span}")
        return value

    parse.__name__ = "float"
    return parse


def port(low: int = 0, *, note: str = "") -> Callable[[str], int]:
    """A TCP port, ``low``..65535 (``port(0, note="0 = any free")`` where 0 asks the
    system for one)."""
    return integer(low, PORT_MAX, noun="port number", note=note)


def count(low: int = 0) -> Callable[[str], int]:
    """A count (epochs, a batch, replicas): ``low``..2**32-1, as a protobuf uint32 holds."""
    return integer(low, UINT32_MAX)


def seed() -> Callable[[str], int]:
    """A random seed, as numpy and torch both take it: 0..2**32-1."""
    return count(0)


def _span(low: float, high: float | None, *, low_open: bool, high_open: bool,
          note: str) -> str:
    """``at least 0 and at most 65535 (0 = any free)``: the range as the refusal says it."""
    span = f"{'more than' if low_open else 'at least'} {_figure(low)}"
    if high is not None:
        span += f" and {'less than' if high_open else 'at most'} {_figure(high)}"
    return f"{span} ({note})" if note else span


def _quoted(text: str) -> str:
    """The text as typed, quoted; cut short when long (a number of hundreds of digits)."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}… ({len(text)} characters)"


def _figure(bound: float) -> str:
    """A bound as typed: ``4294967295``, ``0.5``."""
    if isinstance(bound, int):
        return str(bound)
    return str(int(bound)) if bound.is_integer() else f"{bound:g}"
