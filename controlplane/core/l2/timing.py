"""Time for the L2 parts: a wall clock, a monotonic clock and one sleep, injected together.

``wall`` stamps rows (``created_at`` leaves the process: it is compared across replicas
and restarts) and gives the TTL cut-offs; ``monotonic`` measures intervals (mirror
refresh, remembered answers, retry pauses); every background wait goes through ``sleep``
(by default :func:`synapse_common.clock.sleep`). Tests pass one hand-driven clock for all
three and move time without waiting for it.
"""

from __future__ import annotations

from synapse_common import clock

Sleep = clock.Sleep
Time = clock.Time
