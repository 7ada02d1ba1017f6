"""Log lines said at most once per interval per key, for events a peer can repeat at will
(an agent's stream opening and closing in a loop, a Register refused again and again).

* The first line of each key is said; more of that key within ``every_s`` are held back
  and counted. The next line said for the key carries how many were (``N more held
  back``), so a flapping node still shows, once a minute, how often it flapped.
* A key's newest held line is not left waiting for the key's next event: once
  ``every_s`` has passed since the key's last line, :meth:`PerKey.catch_up` says it (with
  ``N more held back`` for the others held). Operators read the log as state: a node that
  reconnected within the interval and then stayed up must not show "disconnected" as its
  last line. ``log`` catches up first, and a caller with a steady event of its own (the
  gRPC server, at each node's report) calls ``catch_up`` too, so held lines are said soon
  after their interval ends even when no key has a new line. It is cheap when nothing is
  due: the due times sit in a heap.
* Keys can share a ``subject`` (a node's connected and disconnected lines): a line of the
  subject makes the held lines of its other keys out of date, and those are not said by
  ``catch_up`` (their counts wait for their key's next line, as before catch-up), so the
  subject's last line said is its newest, whichever key's interval ends first.
* Keys a peer invents (node names) would each be a first line: at most ``new_keys`` keys
  not seen in the current interval are said per interval; past that they are counted in
  one summary line said when the next interval's first line comes.
* At most ``max_keys`` keys are remembered, held lines included; the one said longest
  ago is forgotten first (its held count goes into the summary, its held line is not
  said), so inventing keys grows no memory.

The clock is injected (:mod:`synapse_common.clock`); nothing here sleeps or starts tasks.
The existing one-purpose limiters (``controlplane.core.cache_budget.ErrorLog``, the usage
flush's ``FlushFailures``) each have a fixed set of keys and format their own message.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
from collections.abc import Hashable, Mapping
from typing import Any

from synapse_common import clock as clocks

_NO_KEY = object()      # no key skipped (None may be a key)


@dataclasses.dataclass
class _Held:
    """A key's lines held back since its last said line: how many, and the newest."""

    count: int
    due: float                  # when it may be said: the key's last said time + every_s
    seq: int                    # tells this from an earlier held run of the key in the heap
    subject: Hashable
    level: int
    # Formatted when held: the arguments (an exception, with its traceback's frames) are
    # not kept alive for the interval. None: a newer line of the subject came (see
    # PerKey._newest), so this one is not said; its count waits for the key's next line.
    text: str | None
    extra: Mapping[str, Any] | None


class PerKey:
    """Say ``logger`` lines at most once per ``every_s`` per key (see the module docstring);
    ``what`` names the lines in the summary ("node stream lines")."""

    def __init__(self, logger: logging.Logger, clock: clocks.Clock, what: str, *,
                 every_s: float = 60.0, new_keys: int = 100, max_keys: int = 4096) -> None:
        self._logger = logger
        self._clock = clock
        self._what = what
        self._every = every_s
        self._new_keys = new_keys
        self._max_keys = max_keys
        self._said: dict[Hashable, float] = {}      # key -> when its last line was said
        self._held: dict[Hashable, _Held] = {}      # key -> lines held back since then
        # (due, seq, key) of each held run; an entry whose run was said or forgotten stays
        # until popped or compacted away, so the heap holds at most 2 * max_keys.
        self._due: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        # subject -> the key holding the subject's newest line, when that line is held
        self._newest: dict[Hashable, Hashable] = {}
        self._window = -float("inf")                # when the current interval began
        self._new_in_window = 0
        self._unsaid = 0                            # lines of keys over the budget

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            extra: Mapping[str, Any] | None = None, subject: Hashable = _NO_KEY) -> None:
        """Say ``msg % args`` now, or hold it back (for ``key``, or in the summary);
        first say the held lines of other keys that are due (:meth:`catch_up`).
        ``subject``: what the line tells the state of (default: ``key`` alone)."""
        now = self._clock()
        self._roll(now)
        self._catch_up(now, skip=key)
        subject = key if subject is _NO_KEY else subject
        if (older := self._newest.pop(subject, None)) is not None:
            self._held[older].text = None           # this line is newer: that one is stale
        last = self._said.get(key)
        if last is not None and now < last + self._every:   # as _Held.due, in _hold
            self._hold(key, subject, last, level, msg, args, extra)
            return
        if last is None:
            if self._new_in_window >= self._new_keys:
                self._unsaid += 1
                return
            self._new_in_window += 1
        held = self._held.pop(key, None)
        if held is not None:
            self._unmark(key, held)
        self._say(key, now, level, msg, args, extra, held.count if held else 0)

    def catch_up(self) -> None:
        """Say now the newest held line of each key whose interval has passed since its
        last said line (with how many more were held back). Cheap when none is due."""
        self._catch_up(self._clock())

    def _catch_up(self, now: float, skip: Hashable = _NO_KEY) -> None:
        """``skip``: the key ``log`` is about to say, with its own count."""
        while self._due and self._due[0][0] <= now:
            _, seq, key = heapq.heappop(self._due)
            held = self._held.get(key)
            if held is None or held.seq != seq or key == skip or held.text is None:
                continue
            del self._held[key]
            self._unmark(key, held)
            self._say(key, now, held.level, "%s", (held.text,), held.extra, held.count - 1)

    def _hold(self, key: Hashable, subject: Hashable, last: float, level: int, msg: str,
              args: tuple[object, ...], extra: Mapping[str, Any] | None) -> None:
        text = msg % args if args else msg          # as logging.LogRecord.getMessage
        held = self._held.get(key)
        if held is not None:
            self._unmark(key, held)
            held.count += 1
            held.subject, held.level, held.text, held.extra = subject, level, text, extra
            self._newest[subject] = key
            return
        held = _Held(1, last + self._every, next(self._seq), subject, level, text, extra)
        self._held[key] = held
        self._newest[subject] = key
        if len(self._due) >= 2 * self._max_keys:    # drop the entries of runs gone by
            self._due = [e for e in self._due
                         if (h := self._held.get(e[2])) is not None and h.seq == e[1]]
            heapq.heapify(self._due)
        heapq.heappush(self._due, (held.due, held.seq, key))

    def _say(self, key: Hashable, now: float, level: int, msg: str,
             args: tuple[object, ...], extra: Mapping[str, Any] | None,
             held: int) -> None:
        self._said.pop(key, None)
        self._said[key] = now                       # newest last: the oldest go first
        self._forget_oldest()
        if held:
            msg, args = msg + " (%d more held back)", (*args, held)
        self._logger.log(level, msg, *args, extra=extra)

    def _roll(self, now: float) -> None:
        if now - self._window < self._every:
            return
        if self._unsaid:
            self._logger.warning("%d %s of other names held back in the last %gs (the "
                                 "first %d names each are said)", self._unsaid, self._what,
                                 self._every, self._new_keys)
        self._window, self._new_in_window, self._unsaid = now, 0, 0

    def _forget_oldest(self) -> None:
        while len(self._said) > self._max_keys:
            key = next(iter(self._said))
            del self._said[key]
            held = self._held.pop(key, None)
            if held is not None:
                self._unsaid += held.count
                self._unmark(key, held)

    def _unmark(self, key: Hashable, held: _Held) -> None:
        """``key``'s run leaves, or changes subject: its subject's newest is no longer it."""
        if self._newest.get(held.subject, _NO_KEY) == key:
            del self._newest[held.subject]
