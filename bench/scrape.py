"""Counters read from /metrics pages during a bench run: vLLM's prefix cache, and a Synapse
control plane's route accuracy and learned costs (``bench/routing_real.py``).

A control plane with tenant keys serves its /metrics on the API port to its admin key only
(the page lists every tenant's traffic), so a control plane's page is read with the admin
key of the bench's config; an engine's page needs none."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence


def metrics_page(url: str, admin_key: str | None = None, timeout: float = 10) -> str:
    """The text of ``url``'s /metrics page, read with ``admin_key`` when given."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    req = urllib.request.Request(f"{url}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def scrape(url: str, names: Sequence[str], admin_key: str | None = None) -> dict[str, float]:
    """Sums of the samples of ``names`` (label sets ``{…}`` kept apart by their text)."""
    out: dict[str, float] = {}
    for line in metrics_page(url, admin_key).splitlines():
        for name in names:
            if line.startswith(name) and not line.startswith("#"):
                key = line.rsplit(" ", 1)[0]
                key = name + key[len(name):] if "{" in key else name
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


ENGINE_COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
ROUTE_COUNTERS = ("synapse_route_cached_tokens_total",)


def engine_totals(engine_urls: Sequence[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in engine_urls:
        s = scrape(u, ENGINE_COUNTERS)
        hits += sum(v for k, v in s.items() if k.startswith(ENGINE_COUNTERS[0]))
        queries += sum(v for k, v in s.items() if k.startswith(ENGINE_COUNTERS[1]))
    return hits, queries


def engine_requests(engine_urls: Sequence[str]) -> list[float]:
    """Requests each engine has finished so far (``vllm:request_success_total``, every
    finish reason): which engine served what, whoever routed it."""
    return [sum(scrape(u, ("vllm:request_success_total",)).values()) for u in engine_urls]


def route_totals(cp_url: str | None, admin_key: str) -> tuple[float, float]:
    """(predicted, reported) cached tokens so far on a control plane."""
    if cp_url is None:
        return 0.0, 0.0
    s = scrape(cp_url, ROUTE_COUNTERS, admin_key)
    predicted = sum(v for k, v in s.items() if 'source="predicted"' in k)
    reported = sum(v for k, v in s.items() if 'source="reported"' in k)
    return predicted, reported


LEARNED = ("synapse_route_learned_prefill_seconds_per_token",
           "synapse_route_learned_decode_seconds_per_step",
           "synapse_route_learned_overhead_seconds",
           "synapse_route_prediction_error_ttft_seconds_sum",
           "synapse_route_prediction_error_ttft_seconds_count")


def learned(cp_url: str, before: dict[str, float], admin_key: str,
            ) -> tuple[str, dict[str, float]]:
    """The costs a control plane uses per backend now, and its mean |TTFT error| since
    ``before`` (a previous return value's second part)."""
    now = scrape(cp_url, LEARNED, admin_key)
    parts = []
    for key, value in sorted(now.items()):
        if key.startswith(LEARNED[0]):
            backend = key.split('backend="', 1)[1].split('"', 1)[0]
            decode = now.get(key.replace(LEARNED[0], LEARNED[1]), 0.0)
            overhead = now.get(key.replace(LEARNED[0], LEARNED[2]), 0.0)
            parts.append(f"{backend} {value * 1e6:.0f}us/tok {decode * 1e3:.0f}ms/step "
                         f"+{overhead * 1e3:.0f}ms")
    total = {k: sum(v for n, v in now.items() if n.startswith(k)) for k in LEARNED[3:]}
    n = total[LEARNED[4]] - before.get(LEARNED[4], 0.0)
    error = (total[LEARNED[3]] - before.get(LEARNED[3], 0.0)) / n if n else float("nan")
    return f"learned: {'; '.join(parts)}; mean |TTFT error| {error:.2f} s", total
