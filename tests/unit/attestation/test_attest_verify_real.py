"""attestation.verify on genuine AMD evidence (Milan v2, Genoa v5): accept, and reject every tampering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from attest_pki import Pki, make_cert, rogue_key
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_vectors import RealEvidence

from cvmotion.abi.snp import SIGNED_LEN, AttestationReport, Product, SigningKey, TcbVersion
from cvmotion.attestation.evidence import load_certificate, load_certificates
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.attestation.verify import ChainCache, VerifyOptions, verify_report
from cvmotion.errors import AbiError, MalformedStructure, ReservedNotZero, UnsupportedVersion, VerificationError

AMD = TrustStore.amd()


def _verify(ev: RealEvidence, raw: bytes | None = None, **kw: object):
    kw.setdefault("at", ev.at)
    return verify_report(raw if raw is not None else ev.raw, ev.vcek, ev.chain, kw.pop("trust", AMD), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["milan", "genoa"])
def test_real_evidence_verifies(real: dict[str, RealEvidence], name: str) -> None:
    ev = real[name]
    v = _verify(ev, options=VerifyOptions(cache=None))
    assert v.product is ev.product
    assert v.platform is PlatformKind.AMD_SEV_SNP
    assert v.signing_key is SigningKey.VCEK
    assert v.anchor.name == f"ARK-{ev.product.value}"
    assert v.reported_tcb == v.extensions.tcb
    assert v.raw == ev.raw
    assert v.extensions.hwid == v.report.chip_id


def test_real_decoded_values(real: dict[str, RealEvidence]) -> None:
    milan = _verify(real["milan"])
    assert milan.reported_tcb == TcbVersion(boot_loader=2, tee=0, snp=5, microcode=68)
    assert milan.report.policy.debug  # the upstream guest allows DEBUG: policy, not verification, rejects it
    assert milan.extensions.product_name == "Milan-B0"
    genoa = _verify(real["genoa"])
    assert genoa.reported_tcb == TcbVersion(boot_loader=10, tee=0, snp=25, microcode=84)
    assert genoa.launch_tcb == genoa.current_tcb == genoa.committed_tcb == genoa.reported_tcb


def test_parsed_report_object_is_accepted(real: dict[str, RealEvidence]) -> None:
    ev = real["genoa"]
    assert _verify(ev, AttestationReport.from_bytes(ev.raw)).raw == ev.raw  # type: ignore[arg-type]


def test_chain_order_and_extras_do_not_matter(real: dict[str, RealEvidence]) -> None:
    ev = real["genoa"]
    mixed = [*reversed(ev.chain), *real["milan"].chain, ev.vcek]
    assert verify_report(ev.raw, ev.vcek, mixed, AMD, at=ev.at).product is Product.GENOA


@pytest.mark.parametrize(
    ("at", "match"),
    [
        (datetime(2025, 8, 7, 17, 21, 40, tzinfo=UTC), "VCEK is not yet valid"),  # one second early
        (datetime(2032, 8, 7, 17, 21, 42, tzinfo=UTC), "VCEK expired"),
        (datetime(2048, 1, 1, tzinfo=UTC), "expired"),
    ],
    ids=["before-vcek", "after-vcek", "after-ark"],
)
def test_genoa_outside_validity(real: dict[str, RealEvidence], at: datetime, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        _verify(real["genoa"], at=at)


def test_validity_bounds_are_inclusive(real: dict[str, RealEvidence]) -> None:
    ev = real["genoa"]
    _verify(ev, at=ev.vcek.not_valid_before_utc)
    _verify(ev, at=ev.vcek.not_valid_after_utc)


def test_naive_time_is_refused(real: dict[str, RealEvidence]) -> None:
    with pytest.raises(Exception, match="timezone-aware"):
        _verify(real["genoa"], at=datetime(2025, 9, 12))


@pytest.mark.parametrize("name", ["milan", "genoa"])
def test_every_bit_flip_in_the_signed_area_is_rejected(real: dict[str, RealEvidence], name: str) -> None:
    """Flip one bit in every byte of report[0x000:0x2A0]: parse error or signature failure, never success."""
    ev = real[name]
    outcomes = {"abi": 0, "verify": 0}
    for offset in range(SIGNED_LEN):
        raw = bytearray(ev.raw)
        raw[offset] ^= 1 << (offset % 8)
        try:
            _verify(ev, bytes(raw))
        except AbiError:
            outcomes["abi"] += 1
        except VerificationError:
            outcomes["verify"] += 1
        else:
            pytest.fail(f"bit flip at {offset:#x} verified")
    assert outcomes["verify"] > 400  # most of the area is plain data: the signature catches it


@pytest.mark.parametrize("offset", [0x2A0, 0x2A0 + 47, 0x2E8, 0x2E8 + 20])
def test_signature_bit_flip_is_rejected(real: dict[str, RealEvidence], offset: int) -> None:
    raw = bytearray(real["genoa"].raw)
    raw[offset] ^= 0x10
    with pytest.raises(VerificationError, match="report signature does not verify"):
        _verify(real["genoa"], bytes(raw))


def test_wrong_signature_algorithm(real: dict[str, RealEvidence]) -> None:
    raw = bytearray(real["milan"].raw)
    raw[0x34] = 2
    with pytest.raises(VerificationError, match="unsupported signature algorithm 2"):
        _verify(real["milan"], bytes(raw))


def test_signing_key_none_is_rejected(real: dict[str, RealEvidence]) -> None:
    raw = bytearray(real["milan"].raw)
    raw[0x48] = 7 << 2
    with pytest.raises(VerificationError, match="SIGNING_KEY is NONE"):
        _verify(real["milan"], bytes(raw))


def test_vlek_selector_with_a_vcek_certificate(real: dict[str, RealEvidence]) -> None:
    raw = bytearray(real["milan"].raw)
    raw[0x48] = 1 << 2
    with pytest.raises(VerificationError, match="SIGNING_KEY is VLEK but the endorsement certificate is CN='SEV-VCEK'"):
        _verify(real["milan"], bytes(raw))


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b.__setitem__(0x04C, 1), ReservedNotZero),
        (lambda b: b.__setitem__(0x1EB, 1), ReservedNotZero),
        (lambda b: b.__setitem__(0x400, 1), ReservedNotZero),
        (lambda b: b.__setitem__(slice(0, 4), (9).to_bytes(4, "little")), UnsupportedVersion),
        (lambda b: b.extend(b"\0"), AbiError),
        (lambda b: b.__delitem__(slice(-1, None)), AbiError),
    ],
    ids=["reserved-0x4c", "reserved-0x1eb", "reserved-sig", "version-9", "oversized", "truncated"],
)
def test_malformed_reports_raise_abi_errors(real: dict[str, RealEvidence], mutate: object, error: type) -> None:
    raw = bytearray(real["genoa"].raw)
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(error):
        _verify(real["genoa"], bytes(raw))


def test_vcek_of_another_product(real: dict[str, RealEvidence]) -> None:
    milan, genoa = real["milan"], real["genoa"]
    with pytest.raises(VerificationError):
        verify_report(milan.raw, genoa.vcek, genoa.chain, AMD, at=genoa.at)


def test_swapped_ask_cannot_chain(real: dict[str, RealEvidence]) -> None:
    """The Milan ASK in the Genoa chain: nothing issued the Genoa VCEK."""
    genoa, milan = real["genoa"], real["milan"]
    milan_ask = next(c for c in milan.chain if "SEV-Milan" in c.subject.rfc4514_string())
    genoa_ark = next(c for c in genoa.chain if c.subject == c.issuer)
    with pytest.raises(VerificationError, match="no ASK SEV-Genoa"):
        verify_report(genoa.raw, genoa.vcek, [milan_ask, genoa_ark], AMD, at=genoa.at)


def test_forged_ask_with_amd_name_does_not_verify(real: dict[str, RealEvidence]) -> None:
    """An ASK named SEV-Genoa but with another key: the VCEK's signature does not verify."""
    genoa = real["genoa"]
    ark = next(c for c in genoa.chain if c.subject == c.issuer)
    forged = make_cert(
        subject=genoa.vcek.issuer, issuer=ark.subject, public_key=rogue_key().public_key(), signer=rogue_key(), ca=True
    )
    with pytest.raises(VerificationError, match="VCEK is not signed by ASK SEV-Genoa"):
        verify_report(genoa.raw, genoa.vcek, [forged, ark], AMD, at=genoa.at)


def test_untrusted_ark_with_amd_names(real: dict[str, RealEvidence]) -> None:
    """A self-made ARK-Genoa that signs a re-issued ASK: the chain verifies, the root is not trusted."""
    genoa = real["genoa"]
    rogue = Pki(Product.GENOA, ark_key=rogue_key())
    vcek = make_cert(
        subject=genoa.vcek.subject,
        issuer=rogue.ask.subject,
        public_key=genoa.vcek.public_key(),  # type: ignore[arg-type]
        signer=rogue.ask_key,
        ca=None,
        amd={e.oid.dotted_string: e.value.value for e in genoa.vcek.extensions},  # type: ignore[attr-defined]
        not_before=datetime(2025, 8, 7, tzinfo=UTC),
    )
    with pytest.raises(
        VerificationError, match=r"ARK CN='ARK-Genoa' \(SPKI SHA-256 [0-9a-f]{64}\) is not a trusted root"
    ):
        verify_report(genoa.raw, vcek, rogue.chain(), AMD, at=genoa.at)
    # The same chain is accepted, as emulated, once its ARK is an anchor: one call.
    v = verify_report(genoa.raw, vcek, rogue.chain(), AMD.with_anchor(rogue.ark), at=genoa.at)
    assert v.platform is PlatformKind.EMULATED


@pytest.mark.parametrize("missing", ["ask", "ark", "all"])
def test_missing_chain(real: dict[str, RealEvidence], missing: str) -> None:
    genoa = real["genoa"]
    ark = [c for c in genoa.chain if c.subject == c.issuer]
    ask = [c for c in genoa.chain if c.subject != c.issuer]
    chain = {"ask": ark, "ark": ask, "all": []}[missing]
    with pytest.raises(VerificationError, match="certificate chain: no"):
        verify_report(genoa.raw, genoa.vcek, chain, AMD, at=genoa.at)


def test_empty_trust_store(real: dict[str, RealEvidence]) -> None:
    with pytest.raises(VerificationError, match="not a trusted root"):
        _verify(real["milan"], trust=TrustStore.empty())


@pytest.mark.parametrize(("name", "pin"), [("genoa", Product.MILAN), ("milan", Product.TURIN)])
def test_wrong_product_pin(real: dict[str, RealEvidence], name: str, pin: Product) -> None:
    with pytest.raises(VerificationError, match="product mismatch"):
        _verify(real[name], options=VerifyOptions(product=pin))


def test_right_product_pin(real: dict[str, RealEvidence]) -> None:
    assert _verify(real["genoa"], options=VerifyOptions(product=Product.GENOA)).product is Product.GENOA


def test_cache_skips_rsa_but_not_trust_time_or_signature(real: dict[str, RealEvidence]) -> None:
    ev = real["genoa"]
    cache = ChainCache(maxsize=4)
    opts = VerifyOptions(cache=cache)
    _verify(ev, options=opts)
    _verify(ev, options=opts)
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(VerificationError, match="not a trusted root"):
        _verify(ev, options=opts, trust=TrustStore.empty())
    with pytest.raises(VerificationError, match="not yet valid"):
        _verify(ev, options=opts, at=ev.vcek.not_valid_before_utc - timedelta(seconds=1))
    raw = bytearray(ev.raw)
    raw[0x90] ^= 1
    with pytest.raises(VerificationError, match="report signature"):
        _verify(ev, bytes(raw), options=opts)
    # Freshly loaded but equal certificates (new objects) hit by content, not identity.
    vcek = load_certificate(ev.vcek.public_bytes(Encoding.DER))
    chain = load_certificates(b"".join(c.public_bytes(Encoding.PEM) for c in ev.chain))
    verify_report(ev.raw, vcek, chain, AMD, at=ev.at, options=opts)
    assert cache.misses == 1
    assert cache.hits == 5


def test_cache_is_bounded(real: dict[str, RealEvidence]) -> None:
    cache = ChainCache(maxsize=1)
    for ev in real.values():
        _verify(ev, options=VerifyOptions(cache=cache))
    assert len(cache) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 0x4A0 - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_edits_raise_only_abi_or_verification_errors(
    real: dict[str, RealEvidence], edits: list[tuple[int, int]]
) -> None:
    ev = real["genoa"]
    raw = bytearray(ev.raw)
    for offset, value in edits:
        raw[offset] = value
    try:
        _verify(ev, bytes(raw))
    except (AbiError, VerificationError):
        return
    assert bytes(raw) == ev.raw  # only an edit that changed nothing may verify


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=600))
def test_certificate_loading_raises_only_malformed(data: bytes) -> None:
    for blob in (data, b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n"):
        with pytest.raises(MalformedStructure):
            load_certificates(blob)
