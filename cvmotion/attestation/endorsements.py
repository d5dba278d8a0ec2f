"""attestation layer: fetch a report's VCEK and cert chain from a KDS (AMD's or the emulated one), with caches.

Used when evidence arrives without ``vcek_cert_chain``.  AMD's URL scheme (pub. 57230, "KDS Interface")::

    GET {kds}/vcek/v1/{product}/{hwid hex}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=[&fmcSPL= on Turin]  -> DER VCEK
    GET {kds}/vcek/v1/{product}/cert_chain                                                        -> PEM ASK, ARK

The VCEK is addressed by (product, hwID, REPORTED_TCB), all read from the *unverified* report: that is
safe because the fetched certificate is then verified like any other (chain to a trusted ARK, signature,
TCB and hwID bindings) — a lying report only gets a certificate that fails.  Caches: the chain per
product, the VCEK per (product, hwID, TCB) (LRU); failures are never cached.  Fetches are async (httpx) so
a slow KDS does not stall other requests.  VLEK-signed reports and masked CHIP_IDs cannot be fetched by
hwID: such evidence must carry its chain.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import httpx
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from cvmotion.abi.snp import AttestationReport, Product, SigningKey, TcbVersion
from cvmotion.attestation.service_error import ServiceError
from cvmotion.errors import AbiError

__all__ = ["KdsFetcher", "vcek_url_path"]

_MAX_CERT = 64 * 1024


def vcek_url_path(product: Product, hwid: bytes, tcb: TcbVersion) -> str:
    query = f"blSPL={tcb.boot_loader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product is Product.TURIN:
        query = f"fmcSPL={tcb.fmc}&{query}"
    return f"/vcek/v1/{product.value}/{hwid.hex()}?{query}"


def _unavailable(message: str) -> ServiceError:
    return ServiceError(502, "kds_unavailable", message)


class KdsFetcher:
    """Fetch and cache endorsements from one KDS base URL."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, max_vceks: int = 4096) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_vceks = max_vceks
        self.fetches = 0
        self._chains: dict[Product, tuple[x509.Certificate, ...]] = {}
        self._vceks: OrderedDict[tuple[Product, bytes, TcbVersion], x509.Certificate] = OrderedDict()

    async def _get(self, path: str) -> bytes:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as client:
                response = await client.get(path)
        except httpx.HTTPError as exc:
            raise _unavailable(f"KDS {self.base_url}{path} unreachable: {type(exc).__name__}") from None
        if response.status_code in (400, 404):
            raise ServiceError(
                400,
                "endorsement_not_found",
                f"KDS has no endorsement for this report ({path} -> {response.status_code})",
            )
        if response.status_code != 200:
            raise _unavailable(f"KDS {path} answered HTTP {response.status_code}")
        if len(response.content) > _MAX_CERT:
            raise _unavailable(f"KDS {path} answered more than {_MAX_CERT} bytes")
        return response.content

    async def endorsements(
        self, report: AttestationReport, product: Product | None
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """(VCEK, (ASK, ARK)) for ``report``; ``product`` is needed for v2 reports, which carry no CPUID."""
        if report.key_info.signing_key is not SigningKey.VCEK:
            raise ServiceError(
                400, "endorsement_required", "a VLEK-signed report must carry its vcek_cert_chain (no KDS lookup)"
            )
        if report.key_info.mask_chip_key:
            raise ServiceError(
                400, "endorsement_required", "CHIP_ID is masked (MASK_CHIP_KEY): send vcek_cert_chain with the report"
            )
        chosen = product or report.cpuid_product
        if chosen is None:
            raise ServiceError(
                400,
                "endorsement_required",
                f"report v{report.version} does not name its product (no CPUID): send 'product' or vcek_cert_chain",
            )
        try:
            tcb = report.tcb(report.reported_tcb, chosen)
        except AbiError as exc:  # reserved TCB bytes for this product's layout
            raise ServiceError(400, "malformed_report", f"REPORTED_TCB: {exc}") from None
        hwid = report.chip_id[: chosen.hwid_len]
        key = (chosen, hwid, tcb)
        chain = self._chains.get(chosen)
        vcek = self._vceks.get(key)
        if chain is None:
            pem = await self._get(f"/vcek/v1/{chosen.value}/cert_chain")
            try:
                chain = tuple(x509.load_pem_x509_certificates(pem))
            except ValueError:
                raise _unavailable(f"KDS cert_chain for {chosen.value} is not PEM") from None
            self._chains[chosen] = chain
        if vcek is None:
            der = await self._get(vcek_url_path(chosen, hwid, tcb))
            try:
                with warnings.catch_warnings():  # AMD's VCEKs have serial 0; the verifier checks what matters
                    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                    vcek = x509.load_der_x509_certificate(der)
            except ValueError:
                raise _unavailable("KDS answered a VCEK that is not DER X.509") from None
            self._vceks[key] = vcek
            while len(self._vceks) > self.max_vceks:
                self._vceks.popitem(last=False)
        else:
            self._vceks.move_to_end(key)
        return vcek, chain
