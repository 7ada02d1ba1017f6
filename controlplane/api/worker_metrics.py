"""The pod's ``/metrics``: this process's metrics merged with the rest of its pod's.

With ``http.workers`` above one every process of the pod counts in a registry of its
own, but agents, the Admin API and Prometheus see one control plane per pod. Each
process serves its own figures on a private unix socket
(``observability.serve_worker_metrics``); the process that answers ``/metrics`` (any of
them on the shared API port, the primary alone on ``metrics.port``) fetches the others'
(``Services.worker_metrics_sockets``) at once, each within a timeout, parses them and
merges them with its own (:class:`PodMetrics`). The rule, per family (:func:`merge`,
its one home; "own" is the answering process's):

* **counters, histograms, summaries**: samples of the same name and labels are summed
  across the processes (each request, token or observation happens in exactly one).
  ``_created`` samples are the own ones; the others' are dropped. A summary's quantiles
  are not additive and are treated as gauges.
* **gauges: the own value**. Most describe the fleet, which every process of the pod
  sees alike, and a sum would count them once per process: ``synapse_backends``,
  ``synapse_nodes``, ``synapse_node_report_age_seconds``, ``synapse_ready``,
  ``synapse_agent_streams`` (the primary relays each agent's stream to every worker, so
  each counts it), ``synapse_backend_inflight_requests`` (the ledger's in-flight, which
  the mesh shares), the router's learned costs and its TTFT bias (a mean, not additive),
  ``synapse_queue_backend_seats`` (an engine's limit, whoever learned it) and
  ``synapse_workers`` (set by the answering process). A gauge series the own registry
  lacks is the first other process's that has it.
* **gauges summed** (:data:`SUMMED_GAUGES`): per-process quantities, whose pod value is
  the sum: ``synapse_queue_depth`` (each process has its own fair queue).
* **gauges recomputed** from the merged counters: ``synapse_cache_live_precision``, the
  interval (``core.cache_feedback.live_interval``, the same function each process uses)
  of the summed semantic verdicts of each tenant in ``synapse_cache_feedback_total``,
  since each process judges only the hits it was told about.
* a family or series only another process has is included.

The pod's counters must not go back, or Prometheus' ``rate()`` reads a reset and shows
a spike: a process that misses a scrape (no answer in time, a refused connection, an
answer that is not the text format) counts as its last answer, and one that restarted
(a count below its last, or a series gone) keeps its last count as an offset for that
series from then on (:class:`_Memory`). Its gauges are absent while it is missing.
``synapse_workers{state}`` says how many processes answered (the answering one
included) and how many are missing; each miss is logged. A miss never fails the scrape.
That memory is the answering process's: scraped on ``metrics.port`` (always the
primary) it holds across workers' restarts; on the shared API port, answers from two
processes that remember differently can disagree after a restart.

A scrape opens a fresh connection to each process rather than keeping a pool: scrapes
are seconds apart, a unix connect costs little, and a pooled connection to a restarted
worker would be stale. Parsing, merging and rendering run in a thread (the answering
process serves requests too); one scrape at a time, since the memory is updated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import parser as prom_parser
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from controlplane import metrics as metrics_mod
from controlplane.core import cache_feedback

log = logging.getLogger("synapse.controlplane")

TIMEOUT_S = 2.0   # per worker; well under Prometheus' default scrape timeout
SUMMED_GAUGES = frozenset({"synapse_queue_depth"})
_ADDITIVE = frozenset({"counter", "histogram", "summary"})
_PRECISION = "synapse_cache_live_precision"
_FEEDBACK = "synapse_cache_feedback"          # the counter's family name (no _total)

Labels = tuple[tuple[str, str], ...]          # sorted (name, value) pairs
Key = tuple[str, Labels]                      # (sample name, labels)


@dataclasses.dataclass
class Family:
    """One metric family as plain data: what the merge works on."""

    name: str
    type: str
    documentation: str
    unit: str = ""
    samples: dict[Key, float] = dataclasses.field(default_factory=dict)

    def copy(self) -> Family:
        return dataclasses.replace(self, samples=dict(self.samples))


Families = dict[str, Family]


def _key(name: str, labels: Mapping[str, str]) -> Key:
    return name, tuple(sorted(labels.items()))


def _families(metrics: Iterable[Metric], *, created: bool) -> Families:
    out: Families = {}
    for m in metrics:
        fam = out.setdefault(m.name, Family(m.name, m.type, m.documentation, m.unit))
        for s in m.samples:
            if created or not s.name.endswith("_created"):
                fam.samples[_key(s.name, s.labels)] = s.value
    return out


def own_families(registry: CollectorRegistry) -> Families:
    """This process's families, ``_created`` samples included."""
    return _families(registry.collect(), created=True)


def parse(text: str) -> Families:
    """A worker's exposition as families, its ``_created`` series dropped (ValueError
    when the text is not the Prometheus text format)."""
    fams = _families(prom_parser.text_string_to_metric_families(text), created=False)
    # The text format carries a counter's or histogram's _created as a gauge family.
    for name in [n for n in fams if n.endswith("_created")]:
        base = fams.get(name.removesuffix("_created"))
        if base is not None and base.type in _ADDITIVE:
            del fams[name]
    return fams


def _summed(fam: Family, key: Key) -> bool:
    """The rule: is this sample summed across the processes (else the primary's)?"""
    if fam.type in _ADDITIVE:
        return not any(label == "quantile" for label, _ in key[1])
    return fam.name in SUMMED_GAUGES


def merge(own: Families, workers: Sequence[Families]) -> Families:
    """The pod's families: ``own`` (the primary's) merged with the workers' by the rule
    of the module docstring. The inputs are left as they are."""
    out = {name: fam.copy() for name, fam in own.items()}
    for families in workers:
        for fam in families.values():
            mine = out.get(fam.name)
            if mine is None:
                out[fam.name] = fam.copy()
                continue
            if mine.type != fam.type:   # a worker of another version: the primary's
                continue
            for key, value in fam.samples.items():
                if _summed(mine, key):
                    mine.samples[key] = mine.samples.get(key, 0.0) + value
                else:
                    mine.samples.setdefault(key, value)
    _recompute_precision(out)
    return out


def _recompute_precision(fams: Families) -> None:
    feedback, precision = fams.get(_FEEDBACK), fams.get(_PRECISION)
    if feedback is None or precision is None:
        return
    tallies: dict[str, dict[str, list[int]]] = {}     # model -> tenant -> [right, wrong]
    for (name, labels), value in feedback.samples.items():
        lab = dict(labels)
        if name == f"{_FEEDBACK}_total" and lab.get("layer") == "semantic" \
                and lab.get("verdict") in ("right", "wrong"):
            tally = tallies.setdefault(lab.get("model", ""), {}).setdefault(
                lab.get("tenant", ""), [0, 0])
            tally[lab["verdict"] == "wrong"] += int(value)
    for model, by_tenant in tallies.items():
        *bounds, total = cache_feedback.live_interval(
            {tenant: (right, wrong) for tenant, (right, wrong) in by_tenant.items()})
        if total > 0:
            for bound, value in zip(("estimate", "lower", "upper"), bounds, strict=True):
                precision.samples[_key(_PRECISION, {"model": model, "bound": bound})] = value


class _Collector(Collector):
    def __init__(self, fams: Families) -> None:
        self._fams = fams

    def collect(self) -> Iterator[Metric]:
        for fam in self._fams.values():
            m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for (name, labels), value in fam.samples.items():
                m.add_sample(name, dict(labels), value)
            yield m


def render(fams: Families) -> bytes:
    """The Prometheus text format of ``fams`` (HELP and TYPE kept)."""
    return generate_latest(_Collector(fams))


class _Memory:
    """One worker's additive series as last merged, so that the pod's counts never go
    back when the worker misses a scrape or restarts (see the module docstring)."""

    def __init__(self) -> None:
        self.meta: dict[str, Family] = {}               # family name -> empty Family
        self.last: dict[tuple[str, Key], float] = {}    # the worker's last raw value
        self.offset: dict[tuple[str, Key], float] = {}  # counts of its earlier lives

    def answered(self, fams: Families) -> Families:
        """The worker's families with its additive samples made monotone."""
        seen = set()
        for fam in fams.values():
            if fam.type not in _ADDITIVE:
                continue
            self.meta.setdefault(fam.name, dataclasses.replace(fam, samples={}))
            for key, value in fam.samples.items():
                if not _summed(fam, key):
                    continue
                series = (fam.name, key)
                seen.add(series)
                self._observe(series, value)
                fam.samples[key] = value + self.offset.get(series, 0.0)
        for series in self.last.keys() - seen:    # gone: the worker restarted
            self._observe(series, 0.0)
            fams.setdefault(series[0], self.meta[series[0]].copy()).samples[series[1]] = (
                self.offset.get(series, 0.0))
        return fams

    def _observe(self, series: tuple[str, Key], value: float) -> None:
        last = self.last.get(series)
        if last is not None and value < last:
            self.offset[series] = self.offset.get(series, 0.0) + last
        self.last[series] = value

    def missing(self) -> Families:
        """What the worker counted until its last answer (its additive series only)."""
        out: Families = {}
        for (name, key), value in self.last.items():
            fam = out.setdefault(name, self.meta[name].copy())
            fam.samples[key] = value + self.offset.get((name, key), 0.0)
        return out


async def fetch(path: pathlib.Path, timeout_s: float, route: str = "/metrics",
                ) -> str | None:
    """What a worker serves at ``route`` on its socket ``path`` (its exposition, or its
    ``/stats``: ``api.fleet_stats``); None (logged) when it does not answer 200 within
    ``timeout_s``."""
    why = ""
    try:
        async with asyncio.timeout(timeout_s):
            connector = aiohttp.UnixConnector(path=str(path))
            async with aiohttp.ClientSession(connector=connector) as session, \
                    session.get(f"http://worker{route}") as resp:
                if resp.status == 200:
                    return await resp.text()
                why = f"HTTP {resp.status}"
    except TimeoutError:
        why = "no answer in time"
    except (OSError, aiohttp.ClientError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    log.warning("worker %s on %s left out of this answer: %s", route, path, why)
    return None


class PodMetrics:
    """What a process remembers of the others' metrics between scrapes of its /metrics."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._memory: dict[pathlib.Path, _Memory] = {}
        self._lock = asyncio.Lock()

    async def exposition(self, m: metrics_mod.Metrics,
                         sockets: Sequence[pathlib.Path]) -> bytes:
        """The pod's exposition: ``m`` (this process's metrics) merged with those served
        on ``sockets`` that answer; ``synapse_workers`` set first."""
        async with self._lock:
            texts = await asyncio.gather(*(fetch(p, self.timeout_s) for p in sockets))
            return await asyncio.to_thread(self._render, m, sockets, texts)

    def _render(self, m: metrics_mod.Metrics, sockets: Sequence[pathlib.Path],
                texts: Sequence[str | None]) -> bytes:
        workers, missing = [], 0
        for path, text in zip(sockets, texts, strict=True):
            fams = None
            if text is not None:
                try:
                    fams = parse(text)
                except Exception as exc:   # the parser's errors are not one class
                    log.warning("worker metrics on %s left out of this scrape: not the "
                                "Prometheus text format (%s)", path, exc)
            memory = self._memory.setdefault(path, _Memory())
            missing += fams is None
            workers.append(memory.missing() if fams is None else memory.answered(fams))
        m.workers.labels("answered").set(len(sockets) + 1 - missing)
        m.workers.labels("missing").set(missing)
        return render(merge(own_families(m.registry), workers))
