"""firmware layer: the emulated AMD Key Distribution Service (KDS): AMD's URL scheme over a ``Vendor``.

Routes (AMD pub. 57230, "KDS Interface"), identical in process (``Kds.handle``) and over HTTP
(``cvmotion.firmware.kds_http``, which only adapts this function to FastAPI):

```
GET /vcek/v1/{product}/{hwid_hex}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=[&fmcSPL=]   DER VCEK, application/pkix-cert
GET /vcek/v1/{product}/cert_chain                                            PEM ASK then ARK
GET /vlek/v1/{product}/cert_chain                                            PEM ASVK then ARK
```
``hwid_hex`` is the 64-byte CHIP_ID (Turin: its first 8 bytes) in hex; Turin requires ``fmcSPL``, the
other products refuse it.  Every answer carries ``X-Cvmotion-Platform: emulated``.  Errors are 4xx with
``{"error": {"kind", "message"}}`` naming the bad part of the request; nothing here raises to the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives import serialization

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import AbiError, CvmError
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.envelope import error_body

__all__ = ["EMULATED_HEADER", "Kds", "KdsError", "KdsResponse", "parse_product", "vcek_path"]

EMULATED_HEADER = ("X-Cvmotion-Platform", "emulated")
PKIX_CERT = "application/pkix-cert"
PEM_FILE = "application/x-pem-file"
_SPL_PARAMS = ("blSPL", "teeSPL", "snpSPL", "ucodeSPL")
_ALLOW = ("Allow", "GET, HEAD")  # RFC 9110 section 15.5.6: a 405 names the methods the resource has


class KdsError(CvmError):
    """A KDS request that cannot be answered; ``status`` is the HTTP status (4xx, or 502 for a bad upstream)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True, slots=True)
class KdsResponse:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = field(default=(EMULATED_HEADER,))


def parse_product(name: str) -> Product:
    """A KDS product path segment: exactly Milan, Genoa or Turin (case-insensitive)."""
    for product in Product:
        if name.lower() == product.value.lower():
            return product
    raise KdsError(404, "unknown_product", f"unknown product {name!r} (expected Milan, Genoa or Turin)")


def vcek_path(product: Product, hwid: bytes, tcb: TcbVersion) -> str:
    """The KDS path and query of one VCEK, as AMD's tools build it."""
    query = f"blSPL={tcb.boot_loader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product is Product.TURIN:
        query = f"fmcSPL={tcb.fmc}&" + query
    return f"/vcek/v1/{product.value}/{hwid.hex()}?{query}"


class Kds:
    """The KDS over a vendor directory. Also an ``EndorsementSource`` for an in-process ``SecureProcessor``."""

    def __init__(self, vendor: Vendor) -> None:
        self._vendor = vendor

    # -- EndorsementSource -------------------------------------------------------------------------

    def vcek_der(self, product: Product, hwid: bytes, tcb: TcbVersion) -> bytes:
        if len(hwid) != product.hwid_len:
            raise KdsError(400, "bad_hwid", f"{product.value} hwID is {product.hwid_len} bytes, got {len(hwid)}")
        try:
            tcb.to_u64(product.tcb_layout)
        except AbiError as exc:
            raise KdsError(400, "bad_tcb", str(exc)) from None
        cert = self._vendor.vcek_cert(product, hwid, tcb)
        if cert is None:
            raise KdsError(404, "unknown_chip", f"no {product.value} chip with hwID {hwid.hex()} was manufactured")
        return cert.public_bytes(serialization.Encoding.DER)

    def cert_chain_pem(self, product: Product) -> bytes:
        return self._vendor.cert_chain_pem(product)

    def vlek_chain_pem(self, product: Product) -> bytes:
        return self._vendor.vlek_chain_pem(product)

    # -- HTTP semantics, without HTTP ----------------------------------------------------------------

    def handle(self, method: str, target: str) -> KdsResponse:
        """Answer ``method target`` (e.g. ``GET /vcek/v1/Genoa/cert_chain``) exactly as the HTTP service does."""
        try:
            return self._route(method, target)
        except KdsError as exc:
            return _error(exc.status, exc.kind, str(exc))
        except (CvmError, OSError) as exc:  # a damaged vendor directory: a clean 500, never a traceback
            return _error(500, "vendor_store", f"the emulated vendor store failed: {exc}")

    def _route(self, method: str, target: str) -> KdsResponse:
        if method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", f"{method} is not supported; the KDS is read-only (GET)", _ALLOW)
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] not in ("vcek", "vlek") or parts[1] != "v1":
            raise KdsError(404, "not_found", f"no such KDS resource {url.path!r}")
        kind, _, product_name, leaf = parts
        product = parse_product(product_name)
        if leaf == "cert_chain":
            _no_query(url.query)
            body = self.cert_chain_pem(product) if kind == "vcek" else self.vlek_chain_pem(product)
            return KdsResponse(200, PEM_FILE, body)
        if kind == "vlek":
            raise KdsError(404, "not_found", "VLEKs are issued to cloud providers, not served by hwID")
        hwid = _parse_hwid(product, leaf)
        tcb = _parse_spls(product, url.query)
        return KdsResponse(200, PKIX_CERT, self.vcek_der(product, hwid, tcb))


def _error(status: int, kind: str, message: str, *headers: tuple[str, str]) -> KdsResponse:
    body = json.dumps(error_body(kind, message)).encode()
    return KdsResponse(status, "application/json", body, (EMULATED_HEADER, *headers))


def _no_query(query: str) -> None:
    if query:
        raise KdsError(400, "bad_query", "cert_chain takes no query parameters")


def _parse_hwid(product: Product, text: str) -> bytes:
    want = 2 * product.hwid_len
    if len(text) != want:
        raise KdsError(400, "bad_hwid", f"{product.value} hwID must be {want} hex digits, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KdsError(400, "bad_hwid", f"hwID {text[:16]}... is not hexadecimal") from None


def _parse_spls(product: Product, query: str) -> TcbVersion:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16)
    except ValueError as exc:
        raise KdsError(400, "bad_query", f"malformed query string: {exc}") from None
    expected = (*_SPL_PARAMS, "fmcSPL") if product is Product.TURIN else _SPL_PARAMS
    values: dict[str, int] = {}
    for name, text in pairs:
        if name not in expected:
            raise KdsError(400, "bad_query", f"unexpected parameter {name!r} for {product.value}")
        if name in values:
            raise KdsError(400, "bad_query", f"parameter {name!r} given twice")
        if not (text.isascii() and text.isdigit()) or len(text) > 3 or int(text) > 255:
            raise KdsError(400, "bad_spl", f"{name}={text!r}: an SPL is an integer 0..255")
        values[name] = int(text)
    missing = [name for name in expected if name not in values]
    if missing:
        raise KdsError(400, "missing_spl", f"missing parameter(s) {', '.join(missing)}")
    return TcbVersion(
        boot_loader=values["blSPL"],
        tee=values["teeSPL"],
        snp=values["snpSPL"],
        microcode=values["ucodeSPL"],
        fmc=values.get("fmcSPL", 0),
    )
