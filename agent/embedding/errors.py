"""The error tree of every Embed failure (mapped to gRPC codes in one table in
:mod:`agent.node_service`)::

    EmbedError
    ├── InvalidInput         empty request or text, a text or call over its limit
    │   └── TooLarge         over a size limit (the control plane answers 413)
    ├── UnknownModel         a model this agent does not serve
    ├── EmbedderUnavailable  model not loaded / TEI unreachable or failing
    └── Overloaded           the micro-batch queue is full: load is shed, retry later

``str()`` of each goes back to the caller (the control plane) as the gRPC details; it
never carries a secret.
"""

from __future__ import annotations


class EmbedError(Exception):
    """Base of every Embed failure."""


class InvalidInput(EmbedError):
    pass


class TooLarge(InvalidInput):
    """More texts, or more characters, than one call may carry."""


class UnknownModel(EmbedError):
    pass


class EmbedderUnavailable(EmbedError):
    pass


class Overloaded(EmbedError):
    """The queue in front of the model is full; nothing was queued."""
