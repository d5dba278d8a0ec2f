"""attestation layer: the trust store — which AMD Root Keys (ARKs) end a chain we believe.

Two kinds of anchor, one mechanism (the SHA-256 of the ARK's DER SubjectPublicKeyInfo):

* **amd-sev-snp** — AMD's real ARKs for Milan, Genoa and Turin, *pinned*.  We ship no AMD certificate
  files: the evidence's chain carries the ARK certificate, the verifier checks its RSASSA-PSS
  self-signature and that its key is one of these pins.  The pins were computed from the ARKs in
  ``tests/vectors/snp`` (Milan, Genoa) and from AMD's ARK-Turin as published in several public verifiers.
* **emulated** — ARKs minted by an emulated AMD secure processor (``cvmotion.firmware``).  They carry AMD's
  names and extensions, so only the key tells them apart; the caller adds them explicitly
  (``TrustStore.amd().with_anchor(ark)``) and every result says ``platform = emulated``.

A ``TrustStore`` is immutable; ``with_*`` methods return a new one, so one store can be shared by threads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509

from cvmotion.abi.snp import Product
from cvmotion.attestation.evidence import common_name, load_certificates, spki_sha256, verify_pss_signature
from cvmotion.errors import AbiError, UsageError, VerificationError

__all__ = ["AMD_ARK_PINS", "PlatformKind", "TrustAnchor", "TrustStore"]


class PlatformKind(enum.StrEnum):
    """Which kind of platform a trust anchor (and so a verified report) belongs to."""

    EMULATED = "emulated"
    AMD_SEV_SNP = "amd-sev-snp"


# SHA-256 of the DER SubjectPublicKeyInfo of AMD's ARKs.
AMD_ARK_PINS: dict[Product, bytes] = {
    Product.MILAN: bytes.fromhex("9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9"),
    Product.GENOA: bytes.fromhex("429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831"),
    Product.TURIN: bytes.fromhex("4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08"),
}


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """One trusted ARK: its product, platform kind, SPKI pin and (for emulated anchors) its certificate."""

    name: str
    product: Product
    kind: PlatformKind
    spki_sha256: bytes
    certificate: x509.Certificate | None = None


@dataclass(frozen=True, slots=True)
class TrustStore:
    """An immutable set of trust anchors indexed by SPKI SHA-256."""

    anchors: tuple[TrustAnchor, ...] = ()
    _index: dict[bytes, TrustAnchor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[bytes, TrustAnchor] = {}
        for anchor in self.anchors:
            other = index.get(anchor.spki_sha256)
            if other is not None and (other.kind, other.product) != (anchor.kind, anchor.product):
                raise UsageError(
                    f"trust anchor {anchor.name} ({anchor.kind}) has the same key as {other.name} ({other.kind})"
                )
            index.setdefault(anchor.spki_sha256, anchor)
        object.__setattr__(self, "_index", index)

    @classmethod
    def empty(cls) -> TrustStore:
        return cls()

    @classmethod
    def amd(cls) -> TrustStore:
        """AMD's ARK-Milan, ARK-Genoa and ARK-Turin, pinned by SPKI SHA-256."""
        return cls(
            tuple(
                TrustAnchor(f"ARK-{product.value}", product, PlatformKind.AMD_SEV_SNP, pin)
                for product, pin in AMD_ARK_PINS.items()
            )
        )

    def with_anchor(
        self, cert: x509.Certificate, kind: PlatformKind = PlatformKind.EMULATED, product: Product | None = None
    ) -> TrustStore:
        """A new store that also trusts ``cert``, an ARK (CN ``ARK-{product}``, RSASSA-PSS self-signed).

        Raises:
            UsageError: ``cert`` is not a self-signed ARK, or its key is already trusted as another kind.
        """
        cn = common_name(cert.subject)
        if product is None:
            try:
                product = Product.from_name(cn.removeprefix("ARK-")) if cn.startswith("ARK-") else None
            except AbiError:
                product = None
            if product is None:
                raise UsageError(f"trust anchor CN={cn!r} is not an ARK (expected ARK-Milan, ARK-Genoa or ARK-Turin)")
        try:
            verify_pss_signature(cert, cert, f"trust anchor {cn}", f"its own key ({cn})")
        except VerificationError as exc:
            raise UsageError(f"trust anchor is not a self-signed ARK: {exc}") from None
        anchor = TrustAnchor(cn, product, kind, spki_sha256(cert), cert)
        return TrustStore((*self.anchors, anchor))

    def with_anchors_from_pem(self, data: bytes, kind: PlatformKind = PlatformKind.EMULATED) -> TrustStore:
        """A new store that also trusts every ARK certificate in ``data`` (PEM with one or more, or DER)."""
        store = self
        for cert in load_certificates(data, what="trust anchor"):
            store = store.with_anchor(cert, kind)
        return store

    def anchor_for(self, ark: x509.Certificate, spki_digest: bytes | None = None) -> TrustAnchor:
        """The anchor whose key is ``ark``'s key.

        Raises:
            VerificationError: "ARK ... is not a trusted root".
        """
        digest = spki_digest if spki_digest is not None else spki_sha256(ark)
        anchor = self._index.get(digest)
        if anchor is None:
            raise VerificationError(
                f"ARK CN={common_name(ark.subject)!r} (SPKI SHA-256 {digest.hex()}) is not a trusted root"
            )
        return anchor

    def certificates(self) -> tuple[x509.Certificate, ...]:
        """Certificates of the anchors that have one (emulated ARKs), usable to complete a chain."""
        return tuple(a.certificate for a in self.anchors if a.certificate is not None)

    def __iter__(self) -> Iterator[TrustAnchor]:
        return iter(self.anchors)

    def __len__(self) -> int:
        return len(self.anchors)
