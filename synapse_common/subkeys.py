"""Keys derived from a configured secret, one per use, so that no use's key gives away the
secret or another use's key: HMAC-SHA256(secret, context), where ``context`` names the
use and its version (``b"synapse/engine-key/v1"``). The one home of that rule: the engine
key and the engines' cache salts derive theirs here (the Responses ids' key, which
tenants see samples of, is stretched instead: ``controlplane.core.response_ids``).
"""

from __future__ import annotations

import hashlib
import hmac


def derive(secret: str, context: bytes) -> bytes:
    """The 32-byte key of ``context`` under ``secret``."""
    return hmac.new(secret.encode("utf-8"), context, hashlib.sha256).digest()
