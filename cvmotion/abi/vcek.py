"""abi layer: AMD's X.509 extensions on VCEK/VLEK certificates (OIDs 1.3.6.1.4.1.3704.1.x).

See ``../shared/specs/snp/vcek_extensions.csv`` and AMD's "Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification" (pub. 57230).  Values are DER INTEGER or IA5String inside
the extnValue OCTET STRING, except hwID, whose extnValue holds the raw chip id bytes.  This module
encodes and decodes those values; reading certificates is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import MalformedStructure

__all__ = [
    "OID_BL_SPL",
    "OID_CSP_ID",
    "OID_FMC_SPL",
    "OID_HWID",
    "OID_PRODUCT_NAME",
    "OID_SNP_SPL",
    "OID_STRUCT_VERSION",
    "OID_TEE_SPL",
    "OID_UCODE_SPL",
    "AmdExtensions",
    "der_ia5string",
    "der_integer",
    "parse_der_ia5string",
    "parse_der_integer",
]

_AMD = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{_AMD}.1"
OID_PRODUCT_NAME = f"{_AMD}.2"
OID_BL_SPL = f"{_AMD}.3.1"
OID_TEE_SPL = f"{_AMD}.3.2"
OID_SNP_SPL = f"{_AMD}.3.3"
OID_SPL_4 = f"{_AMD}.3.4"
OID_SPL_5 = f"{_AMD}.3.5"
OID_SPL_6 = f"{_AMD}.3.6"
OID_SPL_7 = f"{_AMD}.3.7"
OID_UCODE_SPL = f"{_AMD}.3.8"
OID_FMC_SPL = f"{_AMD}.3.9"
OID_HWID = f"{_AMD}.4"
OID_CSP_ID = f"{_AMD}.5"

_TAG_INTEGER = 0x02
_TAG_IA5STRING = 0x16


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_integer(value: int) -> bytes:
    """DER INTEGER; a leading 0x00 keeps values >= 0x80 positive (e.g. 020200d9 = 217)."""
    if value < 0:
        raise MalformedStructure("AMD extension integers are never negative")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return bytes([_TAG_INTEGER]) + _der_len(len(body)) + body


def der_ia5string(value: str) -> bytes:
    body = value.encode("ascii")
    return bytes([_TAG_IA5STRING]) + _der_len(len(body)) + body


def _parse_tlv(data: bytes, tag: int, what: str) -> bytes:
    if len(data) < 2 or data[0] != tag:
        raise MalformedStructure(f"{what}: expected DER tag {tag:#04x}")
    length = data[1]
    offset = 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            raise MalformedStructure(f"{what}: bad DER length")
        length = int.from_bytes(data[2 : 2 + n], "big")
        offset += n
    if len(data) != offset + length:
        raise MalformedStructure(f"{what}: DER length {length} does not match {len(data) - offset} bytes")
    return data[offset:]


def parse_der_integer(data: bytes, what: str = "INTEGER") -> int:
    body = _parse_tlv(data, _TAG_INTEGER, what)
    if not body:
        raise MalformedStructure(f"{what}: empty DER INTEGER")
    value = int.from_bytes(body, "big", signed=True)
    if value < 0:
        raise MalformedStructure(f"{what}: negative value")
    return value


def parse_der_ia5string(data: bytes, what: str = "IA5String") -> str:
    body = _parse_tlv(data, _TAG_IA5STRING, what)
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedStructure(f"{what}: not ASCII") from None


@dataclass(frozen=True, slots=True)
class AmdExtensions:
    """The decoded AMD extensions of a VCEK or VLEK certificate."""

    struct_version: int
    product_name: str
    tcb: TcbVersion
    hwid: bytes | None = None  # VCEK only
    csp_id: str | None = None  # VLEK only

    @property
    def product(self) -> Product:
        return Product.from_name(self.product_name)

    @classmethod
    def from_extension_values(cls, values: Mapping[str, bytes]) -> AmdExtensions:
        """Decode from ``{dotted OID: extnValue content bytes}``. Unknown OIDs are ignored."""

        def integer(oid: str, name: str, *, required: bool = True) -> int:
            raw = values.get(oid)
            if raw is None:
                if required:
                    raise MalformedStructure(f"certificate lacks the AMD {name} extension ({oid})")
                return 0
            return parse_der_integer(raw, name)

        if OID_PRODUCT_NAME not in values:
            raise MalformedStructure(f"certificate lacks the AMD productName extension ({OID_PRODUCT_NAME})")
        product_name = parse_der_ia5string(values[OID_PRODUCT_NAME], "productName")
        tcb = TcbVersion(
            boot_loader=integer(OID_BL_SPL, "blSPL"),
            tee=integer(OID_TEE_SPL, "teeSPL"),
            snp=integer(OID_SNP_SPL, "snpSPL"),
            microcode=integer(OID_UCODE_SPL, "ucodeSPL"),
            fmc=integer(OID_FMC_SPL, "fmcSPL", required=False),
        )
        for name, value in (("blSPL", tcb.boot_loader), ("teeSPL", tcb.tee), ("snpSPL", tcb.snp)):
            if value > 0xFF:
                raise MalformedStructure(f"{name} {value} does not fit in one byte")
        if tcb.microcode > 0xFF or tcb.fmc > 0xFF:
            raise MalformedStructure("ucodeSPL/fmcSPL does not fit in one byte")
        csp_id = values.get(OID_CSP_ID)
        return cls(
            struct_version=integer(OID_STRUCT_VERSION, "structVersion"),
            product_name=product_name,
            tcb=tcb,
            hwid=values.get(OID_HWID),
            csp_id=parse_der_ia5string(csp_id, "cspId") if csp_id is not None else None,
        )

    def to_extension_values(self, product: Product) -> dict[str, bytes]:
        """Encode as AMD does for ``product`` (Turin: structVersion 1, fmcSPL, no spl_4)."""
        values = {
            OID_STRUCT_VERSION: der_integer(self.struct_version),
            OID_PRODUCT_NAME: der_ia5string(self.product_name),
            OID_BL_SPL: der_integer(self.tcb.boot_loader),
            OID_TEE_SPL: der_integer(self.tcb.tee),
            OID_SNP_SPL: der_integer(self.tcb.snp),
        }
        if product is not Product.TURIN:
            values[OID_SPL_4] = der_integer(0)
        values[OID_SPL_5] = der_integer(0)
        values[OID_SPL_6] = der_integer(0)
        values[OID_SPL_7] = der_integer(0)
        values[OID_UCODE_SPL] = der_integer(self.tcb.microcode)
        if product is Product.TURIN:
            values[OID_FMC_SPL] = der_integer(self.tcb.fmc)
        if self.hwid is not None:
            values[OID_HWID] = self.hwid
        if self.csp_id is not None:
            values[OID_CSP_ID] = der_ia5string(self.csp_id)
        return values
