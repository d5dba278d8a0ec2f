"""attestation layer: verify an SEV-SNP attestation report — signatures, chain, trust and bindings only.

``verify_report`` answers "did a genuine (or a trusted emulated) AMD secure processor sign exactly these
bytes?"; whether the guest is one you want is ``validate``'s job.  The rules, in order (each failure is a
``VerificationError`` naming the rule; malformed bytes raise ``AbiError`` unchanged)::

    parse report (abi) ─► SIGNATURE_ALGO = 1 ─► KEY_INFO.SIGNING_KEY ∈ {VCEK, VLEK}
      ─► chain: VCEK←ASK←ARK or VLEK←ASVK←ARK, RSASSA-PSS SHA-384 salt 48 (cached, see ChainCache)
      ─► ARK matches a trust anchor ─► every certificate valid at ``at``
      ─► ECDSA P-384/SHA-384 over report[0x000:0x2A0] with the VCEK/VLEK key
      ─► product: productName, ASK/ARK names, trust anchor, CPUID_FAM_ID/MOD_ID (v3+) and the pin all agree
      ─► TCB binding: blSPL/teeSPL/snpSPL/ucodeSPL(/fmcSPL) = REPORTED_TCB (product layout)
      ─► hwID binding (VCEK): hwID = CHIP_ID (Turin: CHIP_ID[0:8], rest zero); skipped when
         KEY_INFO.MASK_CHIP_KEY zeroes CHIP_ID — then the VCEK is still chip-bound, the report just
         does not say which chip.

The report's contents are used only after its signature verified (the CPUID product check comes last).
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cvmotion.abi.snp import ECDSA_P384_SHA384, SIGNED_LEN, AttestationReport, Product, SigningKey, TcbVersion
from cvmotion.abi.vcek import AmdExtensions
from cvmotion.attestation.evidence import (
    EndorsementChain,
    build_chain,
    check_validity,
    load_certificate,
    load_certificates,
)
from cvmotion.attestation.trust import PlatformKind, TrustAnchor, TrustStore
from cvmotion.errors import UsageError, VerificationError

__all__ = [
    "ChainCache",
    "VerifiedReport",
    "VerifyOptions",
    "default_chain_cache",
    "load_certificate",
    "load_certificates",
    "verify_report",
]

_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())
_ChainKey = tuple[SigningKey, x509.Certificate, tuple[x509.Certificate, ...]]


class ChainCache:
    """LRU of chains whose RSA signatures already verified, keyed by the certificates' contents.

    Only trust-independent, clock-independent facts are cached (``build_chain``'s result): every
    verification still matches the ARK against *its* trust store, checks validity at *its* ``at`` and
    verifies the report's own ECDSA signature.  Failed chains are never cached.  Thread-safe.

    A second, identity-keyed map makes the common case (a service re-using the same certificate objects)
    cost a few dictionary operations instead of hashing every certificate's DER on each call; it holds
    the objects it is keyed by, so their ids cannot be recycled while it does.
    """

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise UsageError("ChainCache maxsize must be at least 1")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_ChainKey, EndorsementChain] = OrderedDict()
        self._by_identity: OrderedDict[tuple[int, ...], tuple[_ChainKey, EndorsementChain]] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(
        self, signing_key: SigningKey, endorsement: x509.Certificate, certs: tuple[x509.Certificate, ...]
    ) -> EndorsementChain:
        key: _ChainKey = (signing_key, endorsement, certs)
        ident = (int(signing_key), id(endorsement), *map(id, certs))
        with self._lock:
            found = self._by_identity.get(ident)
            if found is not None and found[0][1] is endorsement and all(map(operator.is_, found[0][2], certs)):
                self.hits += 1
                return found[1]
            chain = self._entries.get(key)
            if chain is not None:
                self._entries.move_to_end(key)
                self._remember(ident, key, chain)
                self.hits += 1
                return chain
            self.misses += 1
        chain = build_chain(endorsement, certs, signing_key)  # outside the lock: RSA takes milliseconds
        with self._lock:
            self._entries[key] = chain
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            self._remember(ident, key, chain)
        return chain

    def _remember(self, ident: tuple[int, ...], key: _ChainKey, chain: EndorsementChain) -> None:
        self._by_identity[ident] = (key, chain)
        while len(self._by_identity) > self.maxsize:
            self._by_identity.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_identity.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


_DEFAULT_CACHE = ChainCache()


def default_chain_cache() -> ChainCache:
    """The process-wide cache ``VerifyOptions`` uses unless told otherwise."""
    return _DEFAULT_CACHE


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    """Knobs for ``verify_report``. ``product`` pins the expected product; ``cache=None`` disables caching."""

    product: Product | None = None
    cache: ChainCache | None = field(default_factory=default_chain_cache)

    @classmethod
    def default(cls) -> VerifyOptions:
        return cls()


@dataclass(frozen=True, slots=True)
class VerifiedReport:
    """A report whose signature, endorsement chain, trust anchor and TCB/chip bindings all verified."""

    report: AttestationReport
    raw: bytes
    product: Product
    signing_key: SigningKey
    platform: PlatformKind
    anchor: TrustAnchor
    endorsement: x509.Certificate
    intermediate: x509.Certificate
    ark: x509.Certificate
    extensions: AmdExtensions
    reported_tcb: TcbVersion
    current_tcb: TcbVersion
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    verified_at: datetime

    @property
    def chip_id_masked(self) -> bool:
        return self.report.key_info.mask_chip_key


def _verify_signature(chain: EndorsementChain, raw: bytes, report: AttestationReport) -> None:
    key = chain.endorsement.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # build_chain checked; keeps the type checker honest
        raise VerificationError(f"{chain.signing_key.name} key is not an ECDSA P-384 key")
    # R and S are little-endian in the report (SNP ABI "Signature Format"); cryptography wants DER.
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, raw[:SIGNED_LEN], _ECDSA_SHA384)
    except InvalidSignature:
        raise VerificationError(
            f"report signature does not verify with the {chain.signing_key.name} key (ECDSA P-384 SHA-384)"
        ) from None


def _resolve_product(
    chain: EndorsementChain, anchor: TrustAnchor, report: AttestationReport, pin: Product | None
) -> Product:
    sources = [
        (f"{chain.signing_key.name} productName {chain.extensions.product_name!r}", chain.product),
        (f"trust anchor {anchor.name}", anchor.product),
    ]
    cpuid = report.cpuid_product
    if cpuid is not None:
        sources.append((f"CPUID_FAM_ID/MOD_ID {report.cpuid_fam_id:#x}/{report.cpuid_mod_id:#x}", cpuid))
    if pin is not None:
        sources.append(("the expected product", pin))
    for what, product in sources[1:]:
        if product is not chain.product:
            raise VerificationError(
                f"product mismatch: {sources[0][0]} is {chain.product.value}, {what} is {product.value}"
            )
    return chain.product


def _check_hwid(chain: EndorsementChain, report: AttestationReport, product: Product) -> None:
    chip_id = report.chip_id
    if report.key_info.mask_chip_key:
        # MASK_CHIP_KEY: the firmware zeroes CHIP_ID (SNP ABI, KEY_INFO), so there is nothing to bind to.
        if any(chip_id):
            raise VerificationError("KEY_INFO.MASK_CHIP_KEY is set but CHIP_ID is not zero")
        return
    hwid = chain.extensions.hwid
    if hwid is None:
        raise VerificationError("VCEK certificate lacks hwID")
    n = product.hwid_len
    if len(hwid) != n:
        raise VerificationError(f"hwID binding: {product.value} VCEK hwID is {len(hwid)} bytes, expected {n}")
    if any(chip_id[n:]):
        raise VerificationError(f"hwID binding: CHIP_ID bytes {n:#x}..0x3f must be zero on {product.value}")
    if hwid != chip_id[:n]:
        raise VerificationError("hwID binding: the VCEK hwID is not the report's CHIP_ID (VCEK of another chip)")


def verify_report(
    report: bytes | AttestationReport,
    vcek: x509.Certificate,
    chain: Sequence[x509.Certificate],
    trust: TrustStore,
    *,
    at: datetime,
    options: VerifyOptions | None = None,
) -> VerifiedReport:
    """Verify ``report`` against its endorsement certificate (VCEK or VLEK) and chain at time ``at``.

    Args:
        report: the 0x4A0 report bytes, or an already parsed ``AttestationReport``.
        vcek: the VCEK or VLEK certificate (KEY_INFO.SIGNING_KEY says which).
        chain: the intermediate (ASK or ASVK) and ARK, any order; extra certificates are ignored. Emulated
            anchors' certificates in ``trust`` complete a chain that lacks its ARK.
        trust: trust anchors; the ARK must match one.
        at: the time at which every certificate must be valid (timezone-aware).

    Raises:
        AbiError: the report bytes do not parse.
        VerificationError: any rule above failed; the message names it.
    """
    opts = options if options is not None else VerifyOptions()
    if at.tzinfo is None:
        raise UsageError("verify_report: 'at' must be timezone-aware")
    if isinstance(report, AttestationReport):
        parsed, raw = report, report.to_bytes()
    else:
        raw = bytes(report)
        parsed = AttestationReport.from_bytes(raw)
    if parsed.signature_algo != ECDSA_P384_SHA384:
        raise VerificationError(f"unsupported signature algorithm {parsed.signature_algo} (SIGNATURE_ALGO)")
    signing_key = parsed.key_info.signing_key
    certs = (*chain, *trust.certificates())
    if opts.cache is not None:
        endorsed = opts.cache.get_or_build(signing_key, vcek, certs)
    else:
        endorsed = build_chain(vcek, certs, signing_key)
    anchor = trust.anchor_for(endorsed.ark, endorsed.ark_spki_sha256)
    for label, cert in endorsed.labelled:
        check_validity(cert, label, at)
    _verify_signature(endorsed, raw, parsed)
    product = _resolve_product(endorsed, anchor, parsed, opts.product)
    reported = parsed.tcb(parsed.reported_tcb, product)
    if reported != endorsed.extensions.tcb:
        raise VerificationError(
            f"TCB binding: REPORTED_TCB ({reported.describe()}) does not match the "
            f"{signing_key.name} certificate SPLs ({endorsed.extensions.tcb.describe()})"
        )
    if signing_key is SigningKey.VCEK:
        _check_hwid(endorsed, parsed, product)
    return VerifiedReport(
        report=parsed,
        raw=raw,
        product=product,
        signing_key=signing_key,
        platform=anchor.kind,
        anchor=anchor,
        endorsement=endorsed.endorsement,
        intermediate=endorsed.intermediate,
        ark=endorsed.ark,
        extensions=endorsed.extensions,
        reported_tcb=reported,
        current_tcb=parsed.tcb(parsed.current_tcb, product),
        committed_tcb=parsed.tcb(parsed.committed_tcb, product),
        launch_tcb=parsed.tcb(parsed.launch_tcb, product),
        verified_at=at,
    )
