"""agent layer: TLS 1.3 between two MAs over memory BIOs, pinned to the peer's already-verified RA-TLS certificate.

Python's ``ssl`` has no certificate-verify callback, so the evidence in the peer's certificate is verified
first (``ratls.verify_ratls_certificate``, on the copy that came in HELLO) and then OpenSSL is told to trust
exactly that certificate (``cadata=`` its DER, ``CERT_REQUIRED``, no hostname check).  The handshake then
proves the peer holds the attested key (TLS 1.3 CertificateVerify); after it, the certificate OpenSSL saw is
compared byte for byte with the pinned one.  Both sides authenticate (the server requests a client
certificate).  The source MA is the client, the destination MA the server.

* Time: OpenSSL would check the certificate's validity against the wall clock; the MA checks it against its
  injected clock during evidence verification instead (one time source), so OpenSSL's time check is
  switched off (``X509_V_FLAG_NO_CHECK_TIME``, OpenSSL >= 1.1.0).
* Key loading: ``SSLContext.load_cert_chain`` reads only files; the ephemeral key goes through an anonymous
  ``memfd`` that is closed right after loading, so it never touches a file system.
* Framing: each TLS frame must hold whole TLS records (``check_records``), so a truncated frame is detected
  instead of leaving OpenSSL waiting for the rest of a record.  No session tickets (single use).
"""

from __future__ import annotations

import os
import ssl
import struct

from cvmotion.agent.ratls import RatlsCredential
from cvmotion.errors import IntegrityError, ProtocolError, UsageError, VerificationError

__all__ = ["MAX_RECORD", "TlsEndpoint", "check_records", "chunk_records"]

_X509_V_FLAG_NO_CHECK_TIME = 0x200000  # openssl/x509_vfy.h
_RECORD_HEADER = struct.Struct(">BHH")
MAX_RECORD = (1 << 14) + 256  # TLSCiphertext.length limit (RFC 8446 section 5.2)
_CONTENT_TYPES = {20, 21, 22, 23}  # change_cipher_spec, alert, handshake, application_data
_LEGACY_VERSIONS = {0x0301, 0x0303}  # a ClientHello's record may say TLS 1.0 (RFC 8446 section 5.1)


def _records(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(data):
        if off + _RECORD_HEADER.size > len(data):
            raise ProtocolError(f"TLS frame: truncated record header at offset {off:#x}")
        kind, version, length = _RECORD_HEADER.unpack_from(data, off)
        if kind not in _CONTENT_TYPES or version not in _LEGACY_VERSIONS or length > MAX_RECORD:
            raise ProtocolError(f"TLS frame: bad record header at offset {off:#x} (type {kind}, {version:#06x})")
        end = off + _RECORD_HEADER.size + length
        if end > len(data):
            raise ProtocolError(f"TLS frame: record at offset {off:#x} is truncated ({length:#x} bytes announced)")
        out.append(data[off:end])
        off = end
    return out


def check_records(data: bytes) -> None:
    """Raise ``ProtocolError`` unless ``data`` is one or more whole TLS records."""
    if not data:
        raise ProtocolError("TLS frame is empty")
    _records(data)


def chunk_records(data: bytes, limit: int) -> list[bytes]:
    """Split whole records into bodies of at most ``limit`` bytes, never cutting a record."""
    out: list[bytes] = []
    current = b""
    for record in _records(data):
        if current and len(current) + len(record) > limit:
            out.append(current)
            current = b""
        current += record
    if current:
        out.append(current)
    return out


def _load_own(ctx: ssl.SSLContext, own: RatlsCredential) -> None:
    if not hasattr(os, "memfd_create"):
        raise UsageError("the migration agent needs Linux (memfd_create) to hand its TLS key to OpenSSL")
    fd = os.memfd_create("cvmotion-ma-ratls", os.MFD_CLOEXEC)
    try:
        os.write(fd, own.pem_bundle())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class TlsEndpoint:
    """One side of the MA-to-MA TLS 1.3 connection, sans I/O: feed records in, take records out."""

    def __init__(self, own: RatlsCredential, peer_der: bytes, *, server: bool) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags = ssl.VerifyFlags(ctx.verify_flags | _X509_V_FLAG_NO_CHECK_TIME)
        ctx.load_verify_locations(cadata=peer_der)
        _load_own(ctx, own)
        if server:
            ctx.num_tickets = 0  # single-use sessions: nothing to resume
        self._peer_der = peer_der
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server)
        self.established = False
        self.broken = False  # an SSL error happened: nothing more may be sent on this connection

    @property
    def usable(self) -> bool:
        """Whether an inner message (e.g. ERROR) can still be sent to the peer."""
        return self.established and not self.broken

    def feed(self, records: bytes) -> None:
        check_records(records)
        self._incoming.write(records)

    def handshake(self) -> bool:
        """Advance the handshake; True once it completed and the peer's certificate is the pinned one."""
        if self.established:
            return True
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:
            self.broken = True
            raise VerificationError(
                f"TLS: the peer's certificate is not the attested one ({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            self.broken = True
            raise VerificationError(f"TLS handshake failed ({exc.reason or exc})") from None
        if self._tls.getpeercert(binary_form=True) != self._peer_der or self._tls.version() != "TLSv1.3":
            self.broken = True
            raise VerificationError("TLS: the peer's certificate is not the attested one, or not TLS 1.3")
        self.established = True
        return True

    def write(self, data: bytes) -> None:
        if not self.established:
            raise ProtocolError("TLS: application data before the handshake completed")
        self._tls.write(data)

    def read(self) -> bytes:
        """All application data available now."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.broken = True
                raise ProtocolError("TLS: the peer closed the connection") from None
            except ssl.SSLError:
                self.broken = True
                raise IntegrityError() from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def take_output(self, limit: int) -> list[bytes]:
        """Pending TLS records, as frame bodies of at most ``limit`` bytes."""
        data = self._outgoing.read()
        return chunk_records(data, limit) if data else []
