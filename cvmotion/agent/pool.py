"""agent layer: host pool credentials — an operator's pool CA binds a chip (CHIP_ID) to a pool name.

A VM's migration policy names the pools it may live in; an MA proves its host's pool with a credential the
operator issued, and the peer binds that credential to the attested chip (the report's CHIP_ID), so a
credential copied to another host is useless.  The credential is an attribute statement in X.509 form:
its subject key is generated at issue time and discarded (nothing ever signs with it; the binding is the
CHIP_ID the secure processor attests, not possession of a key).

Pool CA (``DIR/pool-ca.pem``, ``DIR/pool-ca.key`` 0600): ECDSA P-384, self-signed, ecdsa-with-SHA384,
CN=<name>, O="cvmotion operator pool CA", basicConstraints CA (pathLen 0), keyUsage keyCertSign|cRLSign.

Credential (signed by the pool CA, ecdsa-with-SHA384)::

    subject        CN=<first 8 bytes of CHIP_ID, hex>, OU=<pool>, O="cvmotion host pool credential"
    basicConstraints CA:FALSE (critical) · keyUsage digitalSignature (critical)
    extendedKeyUsage  arc.12 "cvmotion host pool membership" (only)
    arc.10 CHIP_ID    64 bytes (authoritative; the CN is for humans: X.520 caps a CN at 64 characters)
    arc.11 pool name  UTF-8, 1..64 of [A-Za-z0-9._-], starting with a letter or digit

(``arc`` = ``2.25.332055626685111853197874369884463830576``, see ``cvmotion.agent.oids``.)
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cvmotion.agent.oids import OID_POOL_CHIP_ID, OID_POOL_MEMBERSHIP, OID_POOL_NAME, decode_octets, encode_octets
from cvmotion.attestation.evidence import check_validity, common_name
from cvmotion.errors import UsageError, VerificationError
from cvmotion.files import dir_lock

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "POOL_NAME_PATTERN",
    "PoolAuthority",
    "PoolCredential",
    "check_pool_name",
    "create_pool_ca",
    "issue_pool_credential",
    "load_pool_ca",
    "open_pool_ca",
    "verify_pool_credential",
]

CA_CERT_FILE = "pool-ca.pem"
CA_KEY_FILE = "pool-ca.key"
POOL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHIP_ID_SIZE = 64
BACKDATE = dt.timedelta(hours=1)
MAX_CREDENTIAL = 8 * 1024
_CREDENTIAL_O = "cvmotion host pool credential"


def check_pool_name(name: str) -> str:
    if not POOL_NAME_PATTERN.fullmatch(name):
        raise UsageError(f"pool name {name!r}: 1..64 of [A-Za-z0-9._-], starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class PoolAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def create_pool_ca(
    directory: Path, *, name: str = "cvmotion pool CA", now: dt.datetime, days: int = 3650
) -> PoolAuthority:
    """Make a pool CA in ``directory`` (refuses to overwrite one)."""
    directory = Path(directory)
    if (directory / CA_CERT_FILE).exists() or (directory / CA_KEY_FILE).exists():
        raise UsageError(f"{directory} already holds a pool CA ({CA_CERT_FILE}); use it or pick another directory")
    if not 1 <= len(name) <= 64:
        raise UsageError("the pool CA name is 1..64 characters")
    if days < 1:
        raise UsageError("--days must be at least 1")
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cvmotion operator pool CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(directory / CA_KEY_FILE, key_pem, 0o600)
    _write_new(directory / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return PoolAuthority(cert, key)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def open_pool_ca(directory: Path, *, now: dt.datetime) -> PoolAuthority:
    """The pool CA in ``directory``, made there first if it has none (under a lock: hosts starting together
    share one CA)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with dir_lock(directory):
        return load_pool_ca(directory) if (directory / CA_CERT_FILE).exists() else create_pool_ca(directory, now=now)


def load_pool_ca(directory: Path) -> PoolAuthority:
    """The pool CA persisted in ``directory`` (``UsageError`` if absent or damaged)."""
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"pool CA in {directory}: {exc.strerror or exc}: {exc.filename}") from None
    except ValueError as exc:
        raise UsageError(f"pool CA in {directory} is damaged: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UsageError(f"pool CA in {directory}: {CA_KEY_FILE} is not the key of {CA_CERT_FILE}")
    return PoolAuthority(cert, key)


def issue_pool_credential(
    ca: PoolAuthority, chip_id: bytes, pool: str, *, now: dt.datetime, days: int = 365
) -> x509.Certificate:
    """A credential binding ``chip_id`` (64 bytes) to ``pool``, valid ``days`` days from ``now``."""
    if len(chip_id) != CHIP_ID_SIZE:
        raise UsageError(f"CHIP_ID is {CHIP_ID_SIZE} bytes, not {len(chip_id)}")
    check_pool_name(pool)
    if days < 1:
        raise UsageError("--days must be at least 1")
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    subject_key = ec.generate_private_key(ec.SECP384R1())  # discarded: see the module docstring
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _CREDENTIAL_O),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pool),
            x509.NameAttribute(NameOID.COMMON_NAME, chip_id[:8].hex()),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([OID_POOL_MEMBERSHIP]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_POOL_CHIP_ID, encode_octets(chip_id)), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_POOL_NAME, encode_octets(pool.encode())), critical=False)
        .sign(ca.key, hashes.SHA384())
    )


@dataclass(frozen=True, slots=True)
class PoolCredential:
    """A verified pool credential."""

    chip_id: bytes
    pool: str
    serial: int
    issuer: str
    not_after: dt.datetime


def _opaque(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise VerificationError(f"pool credential lacks the {what} extension") from None
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise VerificationError(f"pool credential {what} extension is not opaque")
    try:
        return decode_octets(ext.value.value, f"pool credential {what}")
    except ValueError as exc:
        raise VerificationError(str(exc)) from None


def verify_pool_credential(der: bytes, cas: tuple[x509.Certificate, ...], *, at: dt.datetime) -> PoolCredential:
    """Check that a pool CA in ``cas`` issued ``der``, both valid at ``at``; return its CHIP_ID and pool.

    Raises:
        VerificationError: unparseable, not issued by a trusted pool CA, expired, wrong purpose, bad fields.
    """
    if not 0 < len(der) <= MAX_CREDENTIAL:
        raise VerificationError(f"pool credential of {len(der):#x} bytes is outside 1..{MAX_CREDENTIAL:#x}")
    try:
        cert = x509.load_der_x509_certificate(der)
        issuers = [ca for ca in cas if ca.subject == cert.issuer]
        for ca in issuers:
            try:
                cert.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):
                continue
            break
        else:
            raise VerificationError(
                f"pool credential issued by {cert.issuer.rfc4514_string()!r} is not signed by a trusted pool CA"
            )
        check_validity(ca, f"pool CA {common_name(ca.subject)!r}", at)
        check_validity(cert, "pool credential", at)
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or list(eku) != [OID_POOL_MEMBERSHIP]:
            raise VerificationError("pool credential lacks the pool-membership extendedKeyUsage")
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise VerificationError("a pool credential may not be a CA certificate")
        chip_id = _opaque(cert, OID_POOL_CHIP_ID, "CHIP_ID")
        raw_pool = _opaque(cert, OID_POOL_NAME, "pool name")
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise VerificationError(f"pool credential does not parse: {exc}") from None
    if len(chip_id) != CHIP_ID_SIZE:
        raise VerificationError(f"pool credential CHIP_ID is {len(chip_id)} bytes, not {CHIP_ID_SIZE}")
    pool = raw_pool.decode("ascii", "replace")
    if not POOL_NAME_PATTERN.fullmatch(pool):
        raise VerificationError("pool credential pool name is not a valid pool name")
    return PoolCredential(chip_id, pool, cert.serial_number, common_name(ca.subject), cert.not_valid_after_utc)
