"""A worker process's routing state joined to its siblings' (``http.workers`` > 1).

:func:`attach_mesh` wires one worker's router, ledger, prefix index, sessions,
Responses pins, the cache's served log, its stream forms and the fair queue's order
(:class:`services.Services`) to
the in-pod mesh
(:mod:`controlplane.adapters.worker_mesh`), so each worker routes with every worker's
dispatches in view, as a single process would. It only builds: the caller starts the mesh
when the worker's event loop runs and closes it when the worker stops. With one worker
there is nothing to share and this is not called (the hooks stay ``None``).
"""

from __future__ import annotations

import os
import pathlib
import uuid

from controlplane.adapters import worker_mesh
from controlplane.api import services as services_mod
from controlplane.core import cache_feedback, response_pins, shared_routing


def attach_mesh(services: services_mod.Services, directory: pathlib.Path | str, index: int,
                count: int) -> worker_mesh.Mesh:
    """The mesh of worker ``index`` of ``count``, over unix sockets in ``directory`` (the
    pod's private directory, the same for every worker). Call ``await mesh.start()`` in
    the worker's event loop before it serves, ``await mesh.close()`` when it stops."""
    if services.response_pins is None:      # passthrough would make it on first use
        services.response_pins = response_pins.Pins()
    incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    feedback = services.cache if isinstance(services.cache, cache_feedback.FeedbackCache) else None
    served = feedback.served if feedback is not None else None
    gate = services.fairness.gate if services.fairness is not None else None
    sharing = shared_routing.Sharing(services.router, services.response_pins, index,
                                     incarnation, served, services_mod.tiered_cache(services.cache),
                                     gate)
    return worker_mesh.Mesh(sharing, directory, index, count)
