"""firmware layer: the emulated silicon vendor ("AMD"): key hierarchy, fuse database, VCEK/VLEK issuance.

Everything here is EMULATED and says so (certificate O="cvmotion emulated AMD-SP", a README in the
directory).  One vendor directory serves any number of hosts and KDS processes:

```
VENDOR/
  README.txt                       "emulated", what the files are
  <Product>/ark.pem  ark.key       ARK-<Product>  RSA-4096, self-signed          (keys 0600)
  <Product>/ask.pem  ask.key       SEV-<Product>  RSA-4096, signed by the ARK
  <Product>/cert_chain.pem         ASK then ARK (what KDS /vcek/v1/<Product>/cert_chain serves)
  <Product>/asvk.pem asvk.key      SEV-VLEK-<Product> RSA-4096, signed by the ARK (created on first VLEK)
  <Product>/vlek_cert_chain.pem    ASVK then ARK
  <Product>/vlek.seed              root of the per-CSP VLEKs                       (0600)
  fuses/<Product>/<hwid>.json      manufacturing database: chip id -> chip secret   (0600)
  kds-cache/<Product>/<hwid>/<tcb>.der   VCEKs already minted (the KDS answers the same cert again)
```
Key material is created lazily per product, under a directory lock, so concurrent first use from two
processes yields one hierarchy.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import UsageError
from cvmotion.files import PRIVATE, dir_lock, read_json, write_atomic, write_json
from cvmotion.firmware import certs
from cvmotion.firmware.keys import derive_p384_key, derive_vcek, tcb_bytes
from cvmotion.firmware.vlek import wrap_vlek

__all__ = ["Authority", "Clock", "ProductRoots", "Vendor", "VlekIssue", "utc_now"]

Clock = Callable[[], dt.datetime]
_RSA_BITS = 4096  # AMD's ARK, ASK and ASVK are RSA-4096
_README = """This directory is an EMULATED silicon vendor (cvmotion), not AMD.
Its ARK/ASK/ASVK certificates carry O="cvmotion emulated AMD-SP". Trust them only as emulated anchors
(cvmotion attest verify --trust-anchor <Product>/ark.pem). The fuses/ directory holds chip secrets.
"""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class Authority:
    """A signing CA of the vendor: certificate and (vendor-only) private key."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey = field(repr=False)


@dataclass(frozen=True, slots=True)
class ProductRoots:
    product: Product
    ark: Authority
    ask: Authority


@dataclass(frozen=True, slots=True)
class VlekIssue:
    """A VLEK for one chip: the wrapped key (for SNP_VLEK_LOAD) and its public certificate."""

    hashstick: bytes
    cert: x509.Certificate


class Vendor:
    """The emulated vendor rooted at a directory. Thread- and process-safe for lazy creation."""

    def __init__(self, root: Path, *, clock: Clock = utc_now) -> None:
        self._root = Path(root)
        self._clock = clock
        self._roots: dict[Product, ProductRoots] = {}
        self._asvk: dict[Product, Authority] = {}

    @classmethod
    def open(cls, root: Path, *, clock: Clock = utc_now) -> Vendor:
        """Open (creating if needed) the vendor directory ``root``."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UsageError(f"vendor directory {root} is not a directory")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        readme = root / "README.txt"
        if not readme.exists():
            write_atomic(readme, _README.encode())
        return cls(root, clock=clock)

    @property
    def root(self) -> Path:
        return self._root

    def ark_path(self, product: Product) -> Path:
        """Where the ARK certificate lives (the emulated trust anchor a verifier adds)."""
        self.roots(product)
        return self._root / product.value / "ark.pem"

    # -- key hierarchy ---------------------------------------------------------------------------

    def roots(self, product: Product) -> ProductRoots:
        """ARK and ASK of ``product``, created on first use."""
        cached = self._roots.get(product)
        if cached is not None:
            return cached
        pdir = self._root / product.value
        with dir_lock(pdir):
            if not (pdir / "cert_chain.pem").exists():
                now = self._clock()
                ark_key = _new_rsa()
                ark_cert = certs.build_ark(ark_key, product, now)
                ask_key = _new_rsa()
                name = f"SEV-{product.value}"
                ask_cert = certs.build_intermediate(ark_key, ark_cert, ask_key.public_key(), name, now)
                _save_authority(pdir, "ark", ark_cert, ark_key)
                _save_authority(pdir, "ask", ask_cert, ask_key)
                write_atomic(pdir / "cert_chain.pem", _pem(ask_cert) + _pem(ark_cert))
            roots = ProductRoots(product, _load_authority(pdir, "ark"), _load_authority(pdir, "ask"))
        self._roots[product] = roots
        return roots

    def asvk(self, product: Product) -> Authority:
        """The AMD SEV VLEK Key of ``product`` (signs VLEK certificates), created on first use."""
        cached = self._asvk.get(product)
        if cached is not None:
            return cached
        roots = self.roots(product)
        pdir = self._root / product.value
        with dir_lock(pdir):
            if not (pdir / "vlek_cert_chain.pem").exists():
                key = _new_rsa()
                name = f"SEV-VLEK-{product.value}"
                cert = certs.build_intermediate(roots.ark.key, roots.ark.cert, key.public_key(), name, self._clock())
                _save_authority(pdir, "asvk", cert, key)
                write_atomic(pdir / "vlek.seed", os.urandom(32), mode=PRIVATE)
                write_atomic(pdir / "vlek_cert_chain.pem", _pem(cert) + _pem(roots.ark.cert))
            authority = _load_authority(pdir, "asvk")
        self._asvk[product] = authority
        return authority

    def cert_chain_pem(self, product: Product) -> bytes:
        """ASK then ARK, PEM: the body of KDS ``/vcek/v1/{product}/cert_chain``."""
        self.roots(product)
        return (self._root / product.value / "cert_chain.pem").read_bytes()

    def vlek_chain_pem(self, product: Product) -> bytes:
        """ASVK then ARK, PEM: the body of KDS ``/vlek/v1/{product}/cert_chain``."""
        self.asvk(product)
        return (self._root / product.value / "vlek_cert_chain.pem").read_bytes()

    # -- manufacturing database ------------------------------------------------------------------

    def register_chip(self, product: Product, chip_id: bytes, chip_secret: bytes) -> None:
        """Record a newly manufactured chip's secret (the emulated fuse programming step)."""
        if len(chip_id) != 64 or len(chip_secret) != 32:
            raise UsageError("a chip has a 64-byte CHIP_ID and a 32-byte secret")
        hwid = chip_id[: product.hwid_len]
        path = self._fuse_path(product, hwid)
        with dir_lock(path.parent):
            if path.exists():
                existing = read_json(path, "fuse database entry")
                if existing.get("chip_secret") != chip_secret.hex():
                    raise UsageError(f"{product.value} chip {hwid.hex()} is already registered with another secret")
                return
            write_json(path, {"chip_id": chip_id.hex(), "chip_secret": chip_secret.hex()}, mode=PRIVATE)

    def chip_secret(self, product: Product, hwid: bytes) -> bytes | None:
        """The fused secret of the chip whose hwID is ``hwid``; None for a chip we never made."""
        if len(hwid) != product.hwid_len:
            return None
        path = self._fuse_path(product, hwid)
        if not path.exists():
            return None
        entry = read_json(path, "fuse database entry")
        try:
            return bytes.fromhex(str(entry["chip_secret"]))
        except (KeyError, ValueError) as exc:
            raise UsageError(f"fuse database entry {path} is corrupt") from exc

    def _fuse_path(self, product: Product, hwid: bytes) -> Path:
        return self._root / "fuses" / product.value / f"{hwid.hex()}.json"

    # -- endorsement keys ------------------------------------------------------------------------

    def vcek_cert(self, product: Product, hwid: bytes, tcb: TcbVersion) -> x509.Certificate | None:
        """The VCEK certificate of a known chip at ``tcb`` (minted once, then served from the cache)."""
        secret = self.chip_secret(product, hwid)
        if secret is None:
            return None
        cache = self._root / "kds-cache" / product.value / hwid.hex() / f"{tcb_bytes(tcb, product).hex()}.der"
        if cache.exists():
            return x509.load_der_x509_certificate(cache.read_bytes())
        ask = self.roots(product).ask
        vcek = derive_vcek(secret, product, tcb)
        cert = certs.build_vcek_cert(ask.key, ask.cert, vcek.public_key(), product, hwid, tcb, self._clock())
        with dir_lock(cache.parent):
            if cache.exists():  # another process minted it first: serve theirs, so every client agrees
                return x509.load_der_x509_certificate(cache.read_bytes())
            write_atomic(cache, cert.public_bytes(serialization.Encoding.DER))
        return cert

    def issue_vlek(self, product: Product, csp_id: str, tcb: TcbVersion, chip_id: bytes) -> VlekIssue:
        """Issue the VLEK of ``csp_id`` at ``tcb``, wrapped for one chip (AMD's VLEK hashstick flow).

        The VLEK is per (product, CSP, TCB) like AMD's, so every chip of a CSP signs with the same key.
        """
        secret = self.chip_secret(product, chip_id[: product.hwid_len])
        if secret is None:
            raise UsageError(f"{product.value} chip {chip_id[: product.hwid_len].hex()} is not in the fuse database")
        asvk = self.asvk(product)
        seed = (self._root / product.value / "vlek.seed").read_bytes()
        key = derive_p384_key(seed, b"VLEK\0" + csp_id.encode() + b"\0" + tcb_bytes(tcb, product))
        hashstick = wrap_vlek(secret, product, tcb, csp_id, key, os.urandom(12))
        cert = certs.build_vlek_cert(asvk.key, asvk.cert, key.public_key(), product, csp_id, tcb, self._clock())
        return VlekIssue(hashstick=hashstick, cert=cert)


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _save_authority(pdir: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(pdir / f"{name}.key", key_pem, mode=PRIVATE)
    write_atomic(pdir / f"{name}.pem", _pem(cert))


def _load_authority(pdir: Path, name: str) -> Authority:
    try:
        cert = x509.load_pem_x509_certificate((pdir / f"{name}.pem").read_bytes())
        # Our own 0600 key written by _save_authority: skip OpenSSL's RSA consistency check, which costs
        # ~0.4 s per RSA-4096 key on every open (every CLI call, every KDS start) and guards only against
        # a corrupt file, which then fails loudly at the first signature instead.
        key = serialization.load_pem_private_key(
            (pdir / f"{name}.key").read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"vendor key {pdir / name}: cannot load: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != _RSA_BITS:
        raise UsageError(f"vendor key {pdir / name}.key is not an RSA-{_RSA_BITS} key")
    return Authority(cert=cert, key=key)
