"""What ``synapse up`` checks before it starts anything, and what it watches while its
children run (:mod:`controlplane.embedded`).

Before: its flags' values (a port in 0..65535, a finite non-negative ``--time-scale``, an
http(s) ``--upstream`` with a host) are refused with the flag's name, not found late as a
traceback or a child's config error naming a generated file. ``--config`` is refused:
``synapse up`` writes its own configs in the data dir at every start, and a file it would
ignore silently looks like a file that was used. ``SYNAPSE_*`` variables of the shell reach
the children and override their settings, so one that overrides a setting ``synapse up``
writes itself (a port it then polls, a key file, the data dir) is refused naming it; the
others are named in one notice line (never their values: they may be secrets).

While: a child's ERROR and CRITICAL lines are echoed to ``synapse up``'s own stderr
(:class:`ErrorEcho`, at most a few a minute per child), since its log file sits in the data
dir, which a full disk may keep from growing; and the engine's log is read for a config
error or a crash loop (:class:`EngineLogWatch`), so a start that cannot succeed says so
at once instead of at the end of the start time-out.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

import yaml

from synapse_common import cli_numbers, engines, settings

# Sections of the generated configs owned whole: any variable inside them is refused,
# not only those naming a value written (a key file added beside the generated keys).
OWNED_SECTIONS = frozenset({("auth",)})
NOT_OVERRIDES = settings.RESERVED_ENV | {engines.ENV_DIR}
ECHO_PER_MINUTE = 10
ECHO_LINE_CHARS = 500
PARTIAL_LINE_BYTES = 65536
ENGINE_LOG_READ_BYTES = 1024 * 1024
# What an engine's log shows when its start cannot succeed: the simulator's one-line
# refusal of a bad config (synapse_common.cli), and the line the agent writes there when
# the engine's restarts became a crash loop (agent.runner, process.LogSink.note).
CONFIG_ERROR = b"config error"
AGENT_NOTE, CRASHLOOP = b"[synapse-agent]", b"crashloop:"


# argparse types of ``synapse up``'s flags: a TCP port, and the simulator's clock.
port_number = cli_numbers.port(0, note="0 = any free")
time_scale = cli_numbers.number(0, note="1 = real GPU timings, 0 = instant")


def upstream_url_problem(url: str) -> str | None:
    """Why ``url`` is no ``--upstream`` (an http or https URL with a host), or None. The
    URL itself is not quoted: it may carry credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port      # raises ValueError for a port out of range or not a number
    except ValueError:
        return "--upstream is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ("--upstream must be an http:// or https:// URL with a host (e.g. "
                "http://127.0.0.1:11434)")
    return None


CONFIG_REFUSED = ("synapse up: --config is not used: synapse up writes its own "
                  "controlplane.yaml and agent.yaml in --data-dir at every start; change "
                  "settings with its flags (synapse up --help), or SYNAPSE_<SECTION>__<FIELD> "
                  "variables for the settings it does not write itself")
CONFIG_HELP = ("not accepted by synapse up: it writes its own configs in --data-dir; use "
               "its flags, or SYNAPSE_<SECTION>__<FIELD> variables for the settings it does "
               "not write itself")


def written(doc: Mapping[str, Any], at: tuple[str, ...] = ()
            ) -> Iterable[tuple[tuple[str, ...], Any]]:
    """The settings a generated config writes, by path: each value that is not a mapping
    (a list is one value)."""
    for key, value in doc.items():
        if isinstance(value, Mapping):
            yield from written(value, (*at, key))
        else:
            yield (*at, key), value


def _same(raw: str, value: Any) -> bool:
    """Whether a variable's ``raw`` text sets ``value`` again (the test harness gives
    every process ``SYNAPSE_HTTP__DRAIN_DELAY_S=0``, which ``synapse up`` writes too). A
    text is the same only as written: a string setting takes the variable verbatim
    (:mod:`synapse_common.settings`), so ``'127.0.0.1'`` in quotes is another host."""
    if isinstance(value, str):
        return raw == value
    try:
        loaded = yaml.safe_load(raw)
    except yaml.YAMLError:
        return False
    if isinstance(value, bool) or isinstance(loaded, bool):
        return loaded is value
    return isinstance(value, int | float) and isinstance(loaded, int | float) and loaded == value


def env_overrides(docs: Iterable[Mapping[str, Any]], environ: Mapping[str, str]
                  ) -> tuple[list[str], list[str]]:
    """The ``SYNAPSE_*`` variables of ``environ`` that override what ``docs`` (the
    generated configs) write — a value, a section holding one, a value inside one, or
    anything in :data:`OWNED_SECTIONS` — and the others the children will read (one
    that sets a number, a flag or a text outside :data:`OWNED_SECTIONS` to the value
    written is among those: it changes nothing)."""
    values: dict[tuple[str, ...], list[Any]] = {}
    for doc in docs:        # both configs write grpc.port, each its own
        for path, value in written(doc):
            values.setdefault(path, []).append(value)
    owned = set(values) | OWNED_SECTIONS
    refused: list[str] = []
    others: list[str] = []
    for name in sorted(environ):
        if not name.startswith(settings.ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        path = tuple(p.lower() for p in name[len(settings.ENV_PREFIX):].split("__"))
        clash = any(path[:len(p)] == p or p[:len(path)] == path for p in owned) and not (
            path in values and path[:1] not in OWNED_SECTIONS
            and all(_same(environ[name], value) for value in values[path]))
        (refused if clash else others).append(name)
    return refused, others


def env_refused_message(names: list[str]) -> str:
    return (f"synapse up: {', '.join(names)} (set in this shell) would override "
            f"{'a setting' if len(names) == 1 else 'settings'} synapse up writes itself "
            "(ports, hosts, data dir, keys, models, cache, backends): unset "
            f"{'it' if len(names) == 1 else 'them'}, and use synapse up's flags instead "
            "(synapse up --help)")


def env_notice(names: list[str], environ: Mapping[str, str]) -> str | None:
    """The notice line naming the inherited variables that will apply (None: none)."""
    parts = []
    if environ.get("SYNAPSE_CONFIG_PATH"):
        parts.append("SYNAPSE_CONFIG_PATH is not used (synapse up writes its own configs)")
    if names:
        parts.append(f"the control plane and the agent inherit {', '.join(names)} from "
                     "this shell (each overrides the setting it names there; the engines "
                     "get none)")
    return f"synapse up: {'; '.join(parts)}" if parts else None


class ErrorEcho:
    """A child's ERROR and CRITICAL log lines copied to ``stream``: at most ``per_minute``
    a minute, then one line saying where the rest are, until the next minute."""

    def __init__(self, name: str, log_path: pathlib.Path, stream: IO[str] | None = None,
                 per_minute: int = ECHO_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.log_path = log_path
        self._stream = stream
        self._per_minute = per_minute
        self._clock = clock
        self._partial = b""
        self._window = -math.inf
        self._shown = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the child's output (lines may span pieces)."""
        *lines, partial = (self._partial + chunk).split(b"\n")
        self._partial = partial[-PARTIAL_LINE_BYTES:]
        for line in lines:
            if is_error_line(line):
                self._echo(line[:ECHO_LINE_CHARS].decode("utf-8", "replace").rstrip("\r"))

    def _echo(self, line: str) -> None:
        now = self._clock()
        if now - self._window >= 60:
            self._window, self._shown = now, 0
        self._shown += 1
        if self._shown <= self._per_minute:
            self._print(f"synapse up: {self.name}: {line}")
        elif self._shown == self._per_minute + 1:
            self._print(f"synapse up: {self.name}: more errors in {self.log_path} (at most "
                        f"{self._per_minute} a minute are shown here)")

    def _print(self, text: str) -> None:
        try:
            print(text, file=self._stream or sys.stderr, flush=True)
        except (OSError, ValueError):   # a closed or broken terminal: the log keeps it
            pass


def is_error_line(line: bytes) -> bool:
    """Whether ``line`` is an ERROR or CRITICAL record in the human or the JSON format of
    :mod:`synapse_common.logs`."""
    head = line[:200]
    if head.startswith(b"{"):
        if b'"error"' not in head and b'"critical"' not in head:
            return False
        try:
            return json.loads(line).get("level") in ("error", "critical")
        except (ValueError, AttributeError):
            return False
    fields = head.split(None, 2)
    return len(fields) > 1 and fields[1] in (b"ERROR", b"CRITICAL")


class EngineLogWatch:
    """Reads what the agent's engine logs in ``directory`` gained since it was made, for
    a line that says the engine's start cannot succeed (:func:`gives_up`)."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._offsets = {p: p.stat().st_size for p in self._logs()}

    def _logs(self) -> list[pathlib.Path]:
        try:
            return sorted(self.directory.glob("*.log"))
        except OSError:
            return []

    def failing(self) -> pathlib.Path | None:
        """The log of an engine whose start failed for good, else None."""
        for path in self._logs():
            try:
                size = path.stat().st_size
                start = self._offsets.get(path, 0)
                start = 0 if size < start else max(start, size - ENGINE_LOG_READ_BYTES)
                with path.open("rb") as f:
                    f.seek(start)
                    new = f.read(size - start)
            except OSError:
                continue
            self._offsets[path] = size
            if any(gives_up(line) for line in new.splitlines()):
                return path
        return None


def gives_up(line: bytes) -> bool:
    """Whether an engine log's ``line`` says its start cannot succeed."""
    return line.startswith(CONFIG_ERROR) or (line.startswith(AGENT_NOTE) and CRASHLOOP in line)


def tail(path: pathlib.Path, lines: int = 15) -> str:
    """The last ``lines`` of ``path``, indented, as the start-up failures print them."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"    (cannot read it: {exc.strerror or exc})"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])
