"""host layer: authenticated host-to-host calls — requests signed with a host credential the pool CA issued.

A destination host answers ``POST /v1/migrations/incoming`` (create a VM and a migration listener) and
``GET /v1/migrations/{id}/outcome`` (a verdict) only to another host of the operator's pools: anyone else who
can reach the port gets ``401``. The equivalent of mutual TLS, kept at the request level so the host API's
other clients (operators, the demo, the controller) are unchanged:

- the operator's pool CA issues each host daemon a *host credential*: an ECDSA P-384 key (``host-key.pem``,
  0600) and a certificate ``CN=<host name>, OU=<pool>, O="cvmotion host"`` with extended key usage clientAuth
  (``host-cert.pem``); the daemon trusts the pool CAs in ``peer-cas.pem``;
- a caller sends ``X-Cvmotion-Host-Cert`` (its certificate, base64 DER), ``X-Cvmotion-Date`` (Unix seconds),
  ``X-Cvmotion-Nonce`` (16 random bytes, hex) and ``X-Cvmotion-Signature``: ECDSA-SHA384 over
  ``"cvmotion-host-request/1" \\n METHOD \\n PATH \\n DATE \\n NONCE \\n SHA-256(BODY) hex``;
- the receiver checks the certificate against a trusted pool CA (signature, validity, clientAuth), the
  signature, the date (within ``SKEW`` of its clock) and that the nonce is new (a replay cache over the skew
  window). Every failure is one ``Unauthorized`` with the same message.

This protects the daemons from outsiders; it is not a trust root for the guest (the migration agents attest
each other inside the TEE whatever the daemons say).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cvmotion.agent.pool import PoolAuthority
from cvmotion.errors import Unauthorized, UsageError
from cvmotion.files import write_atomic

__all__ = ["HOST_CERT_FILE", "HOST_KEY_FILE", "PEER_CAS_FILE", "PeerAuth", "issue_host_credential"]

HOST_CERT_FILE = "host-cert.pem"
HOST_KEY_FILE = "host-key.pem"
PEER_CAS_FILE = "peer-cas.pem"
SKEW = 300.0  # seconds a signed request stays acceptable (and its nonce remembered)
_CONTEXT = b"cvmotion-host-request/1"
_REFUSED = "host-to-host request refused: no valid host credential"
_H_CERT = "x-cvmotion-host-cert"
_H_DATE = "x-cvmotion-date"
_H_NONCE = "x-cvmotion-nonce"
_H_SIG = "x-cvmotion-signature"
_MAX_CERT = 8 * 1024


def issue_host_credential(
    authority: PoolAuthority, directory: Path, *, host: str, pool: str, now: dt.datetime, days: int = 365
) -> None:
    """The pool CA issues ``host`` its credential into ``directory`` (key 0600, certificate, the CA to trust)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cvmotion host"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pool),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomic(directory / HOST_KEY_FILE, key_pem, mode=0o600)
    write_atomic(directory / HOST_CERT_FILE, cert.public_bytes(pem))
    write_atomic(directory / PEER_CAS_FILE, authority.cert.public_bytes(pem))


@dataclass
class PeerAuth:
    """This host's credential (to sign its calls) and the pool CAs it accepts callers from."""

    cas: tuple[x509.Certificate, ...]
    cert: x509.Certificate | None = None
    key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    clock: Callable[[], float] = time.time
    _seen: dict[bytes, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, directory: Path) -> PeerAuth:
        """The credential in ``directory``; without one the host can neither call nor accept peers."""
        try:
            cas = tuple(x509.load_pem_x509_certificates((directory / PEER_CAS_FILE).read_bytes()))
            cert = x509.load_pem_x509_certificate((directory / HOST_CERT_FILE).read_bytes())
            key = serialization.load_pem_private_key((directory / HOST_KEY_FILE).read_bytes(), password=None)
        except FileNotFoundError:
            return cls(cas=())
        except (OSError, ValueError) as exc:
            raise UsageError(f"host credential in {directory} is unreadable or damaged: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise UsageError(f"host credential in {directory}: {HOST_KEY_FILE} is not the key of {HOST_CERT_FILE}")
        return cls(cas=cas, cert=cert, key=key)

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """Headers that authenticate one request of this host."""
        if self.cert is None or self.key is None:
            raise UsageError("this host has no host credential (host serve --pool-ca-dir issues one)")
        date = str(int(self.clock()))
        nonce = os.urandom(16).hex()
        signature = self.key.sign(_message(method, path, date, nonce, body), ec.ECDSA(hashes.SHA384()))
        return {
            _H_CERT: base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode(),
            _H_DATE: date,
            _H_NONCE: nonce,
            _H_SIG: base64.b64encode(signature).decode(),
        }

    def verify(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> str:
        """The calling host's name, or ``Unauthorized`` (one message for every failure)."""
        try:
            cert_der = base64.b64decode(headers.get(_H_CERT, ""), validate=True)
            signature = base64.b64decode(headers.get(_H_SIG, ""), validate=True)
            date, nonce = headers.get(_H_DATE, ""), headers.get(_H_NONCE, "")
            if not cert_der or len(cert_der) > _MAX_CERT or not date.isdigit() or len(nonce) != 32:
                raise Unauthorized(_REFUSED)
            now = self.clock()
            if abs(now - int(date)) > SKEW:
                raise Unauthorized(_REFUSED)
            cert = x509.load_der_x509_certificate(cert_der)
            self._check_certificate(cert, now)
            public = cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise Unauthorized(_REFUSED)
            public.verify(signature, _message(method, path, date, nonce, body), ec.ECDSA(hashes.SHA384()))
        except (ValueError, InvalidSignature, TypeError) as exc:
            raise Unauthorized(_REFUSED) from exc
        self._fresh(bytes.fromhex(nonce), now)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def _check_certificate(self, cert: x509.Certificate, now: float) -> None:
        at = dt.datetime.fromtimestamp(now, dt.UTC)
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise Unauthorized(_REFUSED)
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise Unauthorized(_REFUSED) from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise Unauthorized(_REFUSED)
        for ca in self.cas:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
        raise Unauthorized(_REFUSED)

    def _fresh(self, nonce: bytes, now: float) -> None:
        """A nonce is accepted once within the skew window (older requests fail the date check anyway)."""
        with self._lock:
            for old in [n for n, at in self._seen.items() if now - at > 2 * SKEW]:
                del self._seen[old]
            if nonce in self._seen:
                raise Unauthorized(_REFUSED)
            self._seen[nonce] = now


def _message(method: str, path: str, date: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    fields = (method.upper(), path, date, nonce, digest)
    return b"\n".join([_CONTEXT, *(f.encode() for f in fields)])
