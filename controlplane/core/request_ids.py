"""Request ids Synapse generates: the ``x-request-id`` of a request that brought none,
and the id every engine is sent.

Design decisions:

- **Unpredictable and unrelated.** 96 bits from the operating system's CSPRNG, hex.
  A prefix and a counter (the former form) let a tenant reading two of its own ids learn
  how many requests every tenant sent in between; random ids tell nothing about each
  other, and cannot be guessed to name another tenant's request.
- **Engines never get a client's id.** A client may choose its own ``x-request-id`` (it
  is echoed to it, and names its request to it: the access log, cache feedback), but
  vLLM takes the id it is sent as the request's own and aborts by it, and a client can
  send any other tenant's id just as well. So dispatch sends engines an id generated
  here for that request (:mod:`controlplane.core.dispatch`).
- ``os.urandom(n).hex()`` rather than ``uuid4`` or ``secrets.token_hex``: the same
  source, the least work per call (this runs once or twice per request).
"""

from __future__ import annotations

import os

BYTES = 12


def new() -> str:
    """A fresh id: 24 lowercase hex digits, unrelated to every other."""
    return os.urandom(BYTES).hex()
