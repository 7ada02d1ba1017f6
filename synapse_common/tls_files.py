"""gRPC server TLS credentials read from a certificate and key file, and read again when
they change: the control plane's gRPC port and the agents' Node port serve certificates
that cert-manager (or an operator) renews in place, and a renewal must not need a restart.

Each new connection's handshake (:func:`server_credentials`) asks
:meth:`FollowedPair.changed`, which looks at both files' modification time and size (a
``stat`` each, no read) and, when either changed, loads the pair again. A pair that does not load as a certificate and its key
(a renewal caught half written) keeps the previous one, with a warning, and is tried
again at the next handshake; Kubernetes swaps a Secret volume's files at once.
"""

from __future__ import annotations

import logging
import os
import ssl

import grpc

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int], tuple[int, int]]


def _stamp(cert_file: str, key_file: str) -> Stamp:
    c, k = os.stat(cert_file), os.stat(key_file)
    return (c.st_mtime_ns, c.st_size), (k.st_mtime_ns, k.st_size)


def load_pair(cert_file: str, key_file: str, field: str) -> tuple[bytes, bytes]:
    """(key, certificate) as PEM bytes, checked to be a certificate and its key;
    :class:`OSError` naming ``field`` otherwise."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file,
                                                                            key_file)
        with open(key_file, "rb") as k, open(cert_file, "rb") as c:
            return k.read(), c.read()
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"{field}: cannot load {cert_file} and {key_file} as a certificate "
                      f"and its key ({exc.strerror or type(exc).__name__})") from None


Pair = tuple[bytes, bytes]      # (key, certificate), PEM


class FollowedPair:
    """A certificate and key file pair as it is now: :attr:`first` when made (or
    :class:`OSError` naming ``field``), then :meth:`changed` at each handshake."""

    def __init__(self, cert_file: str, key_file: str, field: str) -> None:
        self._cert, self._key, self._field = cert_file, key_file, field
        self.first: Pair = load_pair(cert_file, key_file, field)
        self._last = _stamp(cert_file, key_file)
        self._warned = ""       # each problem is said once, not at every handshake

    def changed(self) -> Pair | None:
        """The pair when the files changed since it was last loaded and load now; None
        otherwise (keep serving the one loaded before)."""
        try:
            now = _stamp(self._cert, self._key)
            if now == self._last:
                return None
            pair = load_pair(self._cert, self._key, self._field)
        except OSError as exc:
            if str(exc) != self._warned:
                self._warned = str(exc)
                log.warning("keeping the TLS certificate loaded before: %s", exc)
            return None
        self._last, self._warned = now, ""
        log.info("TLS certificate %s loaded again (it changed)", self._cert)
        return pair


def server_credentials(cert_file: str, key_file: str, field: str) -> grpc.ServerCredentials:
    """gRPC server credentials serving the pair as the files hold it at each handshake
    (the control plane's gRPC port, the agents' Node port); :class:`OSError` naming
    ``field`` when they do not load now."""
    pair = FollowedPair(cert_file, key_file, field)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        changed = pair.changed()
        return None if changed is None else grpc.ssl_server_certificate_configuration([changed])

    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([pair.first]), fetch)
