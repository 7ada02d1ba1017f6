"""Operations settings (issue 19): the access log and fleet-wide stats; tracing is
:mod:`synapse_common.tracing`'s."""

from __future__ import annotations

from pydantic import Field

from synapse_common.settings import Section


class AccessLogSettings(Section):
    enabled: bool = Field(True, description="one line per API request at info level "
                          "(logger synapse.access; JSON fields under --log-format json)")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of requests logged "
                                "(chosen by a hash of the request id)")
    sample_errors: bool = Field(False, description="sample errors (5xx, a cut stream) like "
                                "the rest; false = always log them")


class StatsSettings(Section):
    fleet_timeout_s: float = Field(
        1.0, gt=0, le=30, description="how long /api/v1/stats and synapsectl stats wait "
        "for the other replicas' figures (through redis.url; without it, this replica's)")
