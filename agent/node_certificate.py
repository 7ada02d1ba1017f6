"""The Node service's own TLS identity, new at every start (``grpc.tls_self_signed``).

Why: with one certificate for the whole DaemonSet (``grpc.tls_cert_file``), every GPU node
holds the key that answers as any other agent's Node service, so one compromised node
could read the tenants' texts the control plane meant for another, wherever the control
plane is misdirected to it. Kubernetes cannot issue a per-pod certificate naming a pod's
IP or node in advance, so the agent makes its own: an EC P-256 key and a certificate it
signs itself, and sends the certificate (never the key) in ``Register`` over its
authenticated stream, as it sends its node key (:mod:`agent.node_keys`). The control
plane trusts that certificate alone for that node's address (pinned: the certificate is
the only root of the channel), so only the process holding this key can answer there.

Design decisions:

- The key lives in memory only, in this process, and is never written to disk: a new
  start makes a new pair and registers the new certificate, which replaces the old pin.
- The certificate carries the fixed DNS name :data:`NAME` (the control plane dials pod
  IPs and checks the name the pinned certificate carries, not the address) and is valid
  for :data:`VALIDITY` (a pin lasts as long as the process that made it, which may run
  for years; expiry would only cut a live agent off). Its start is backdated by
  :data:`BACKDATE` so a control plane whose clock is a little behind accepts it.
- It is not a CA (``basicConstraints CA:FALSE``) and is good for server authentication
  only, so the key cannot sign anything another verifier would take.
"""

from __future__ import annotations

import dataclasses
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME = "synapse-agent"
VALIDITY = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class NodeCertificate:
    """A certificate and its private key, both PEM; the key never leaves the process."""

    certificate: bytes
    key: bytes = dataclasses.field(repr=False)
    fingerprint: str = ""       # SHA-256 of the certificate (DER), hex: for logs

    def server_pair(self) -> tuple[bytes, bytes]:
        """(key, certificate): what ``grpc.ssl_server_credentials`` takes."""
        return self.key, self.certificate


def generate(now: datetime.datetime | None = None) -> NodeCertificate:
    """A new EC P-256 key and a self-signed certificate for :data:`NAME`."""
    start = (now or datetime.datetime.now(datetime.UTC)) - BACKDATE
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return NodeCertificate(
        certificate=cert.public_bytes(serialization.Encoding.PEM),
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        key=key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
