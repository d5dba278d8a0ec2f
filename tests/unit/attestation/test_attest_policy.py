"""attestation.policy + validate: the JSON policy file and table-driven validation (go-sev-guest style)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from attest_pki import AT, TCB, Pki, chip_id_for, make_report, p384
from real_vectors import RealEvidence

from cvmotion.abi.snp import KeyInfo, PolicyFlag, Product, SigningKey
from cvmotion.attestation.policy import AttestationPolicy, MigrateMa, load_policy, policy_json_schema
from cvmotion.attestation.trust import TrustStore
from cvmotion.attestation.validate import require_valid, validate
from cvmotion.attestation.verify import VerifiedReport, verify_report
from cvmotion.errors import PolicyViolation, UsageError

MILAN_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
MILAN_CHIP_ID = (
    "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea4"
    "64cdce40c05f63c9b610c5068b006b5d"
)
MILAN_REPORT_DATA = "0102030405" + "00" * 59
ID_KEY, AUTHOR_KEY = bytes([0x11]) * 48, bytes([0x22]) * 48


@pytest.fixture(scope="module")
def verified(
    real: dict[str, RealEvidence], pki: dict[Product, Pki], test_trust: TrustStore
) -> dict[str, VerifiedReport]:
    out = {name: verify_report(ev.raw, ev.vcek, ev.chain, TrustStore.amd(), at=ev.at) for name, ev in real.items()}
    key = p384(1)

    def synth(name: str, product: Product, *, vlek: bool = False, **kw: Any) -> None:
        p = pki[product]
        cert = p.vlek(key, TCB[product]) if vlek else p.vcek(key, TCB[product], chip_id_for(product))
        signing = SigningKey.VLEK if vlek else SigningKey.VCEK
        raw = make_report(product, key, TCB[product], signing_key=signing, **kw)
        out[name] = verify_report(raw, cert, p.chain(vlek=vlek), test_trust, at=AT)

    synth("turin", Product.TURIN)
    synth(
        "genoa-id-block",
        Product.GENOA,
        key_info=KeyInfo(author_key_en=True),
        id_key_digest=ID_KEY,
        author_key_digest=AUTHOR_KEY,
        policy=int(PolicyFlag.RESERVED_MBO | PolicyFlag.MIGRATE_MA),
        vmpl=2,
    )
    synth("genoa-masked", Product.GENOA, mask_chip_key=True)
    synth("milan-vlek", Product.MILAN, vlek=True)
    return out


# (id, evidence, policy JSON object, substrings of the expected violations; [] = compliant)
CASES: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("milan-default-policy-forbids-debug", "milan", {}, ["POLICY.DEBUG is set (guest policy 0xb0000)"]),
    ("milan-allow-debug", "milan", {"allow_debug": True}, []),
    ("genoa-default", "genoa", {}, []),
    ("report-data-match", "milan", {"allow_debug": True, "report_data": MILAN_REPORT_DATA}, []),
    ("report-data-mismatch", "milan", {"allow_debug": True, "report_data": "00" * 64}, ["REPORT_DATA 0102030405"]),
    ("measurement-allowed", "milan", {"allow_debug": True, "measurements": ["00" * 48, MILAN_MEASUREMENT]}, []),
    ("measurement-not-allowed", "milan", {"allow_debug": True, "measurements": ["00" * 48]}, ["MEASUREMENT b07af962"]),
    ("chip-id-allowed", "milan", {"allow_debug": True, "chip_ids": [MILAN_CHIP_ID]}, []),
    ("chip-id-other", "milan", {"allow_debug": True, "chip_ids": [MILAN_CHIP_ID[:-1] + "e"]}, ["CHIP_ID 3ac3fe21"]),
    ("chip-id-masked", "genoa-masked", {"chip_ids": [MILAN_CHIP_ID]}, ["CHIP_ID is masked"]),
    ("min-tcb-equal", "milan", {"allow_debug": True, "minimum_tcb": {"boot_loader": 2, "snp": 5, "microcode": 68}}, []),
    (
        "min-tcb-above",
        "milan",
        {"allow_debug": True, "minimum_tcb": {"snp": 6, "microcode": 69}},
        [
            "CURRENT_TCB is below minimum_tcb: snp=5 < 6, microcode=68 < 69",
            "COMMITTED_TCB is below",
            "REPORTED_TCB is below",
        ],
    ),
    (
        "min-launch-tcb",
        "genoa",
        {"minimum_launch_tcb": {"boot_loader": 11}},
        ["LAUNCH_TCB is below minimum_launch_tcb"],
    ),
    ("min-tcb-per-product", "genoa", {"minimum_tcb": {"Genoa": {"snp": 25}, "Milan": {"snp": 99}}}, []),
    (
        "min-tcb-product-missing",
        "milan",
        {"allow_debug": True, "minimum_tcb": {"Genoa": {"snp": 1}}},
        ["no minimum for Milan"],
    ),
    ("turin-fmc-minimum", "turin", {"minimum_tcb": {"fmc": 2}}, ["fmc=1 < 2", "fmc=1 < 2", "fmc=1 < 2"]),
    ("fmc-ignored-before-turin", "genoa", {"minimum_tcb": {"fmc": 2}}, []),
    ("firmware-equal", "milan", {"allow_debug": True, "minimum_firmware": "1.49"}, []),
    ("firmware-build-equal", "milan", {"allow_debug": True, "minimum_firmware": "1.49.3"}, []),
    ("firmware-minor-above", "milan", {"allow_debug": True, "minimum_firmware": "1.50"}, ["firmware 1.49 build 3"]),
    (
        "firmware-build-above",
        "milan",
        {"allow_debug": True, "minimum_firmware": "1.49.4"},
        ["below the minimum 1.49 build 4"],
    ),
    ("vmpl-exact", "genoa", {"vmpl": 0, "max_vmpl": 0}, []),
    ("vmpl-exact-mismatch", "genoa-id-block", {"vmpl": 0}, ["VMPL 2 is not the required 0"]),
    ("vmpl-above-max", "genoa-id-block", {"max_vmpl": 1}, ["VMPL 2 is above the maximum 1"]),
    ("require-id-block-missing", "milan", {"allow_debug": True, "require_id_block": True}, ["no ID block"]),
    (
        "require-author-key-missing",
        "milan",
        {"allow_debug": True, "require_author_key": True},
        ["AUTHOR_KEY_EN is clear"],
    ),
    (
        "id-block-and-author-present",
        "genoa-id-block",
        {
            "require_id_block": True,
            "require_author_key": True,
            "id_key_digests": [ID_KEY.hex()],
            "author_key_digests": [AUTHOR_KEY.hex()],
        },
        [],
    ),
    ("id-key-not-allowed", "genoa-id-block", {"id_key_digests": ["33" * 48]}, ["ID_KEY_DIGEST 1111"]),
    ("author-key-not-allowed", "genoa-id-block", {"author_key_digests": ["33" * 48]}, ["AUTHOR_KEY_DIGEST 2222"]),
    ("author-key-absent", "genoa", {"author_key_digests": ["33" * 48]}, ["AUTHOR_KEY_DIGEST is absent"]),
    ("migrate-ma-required", "genoa", {"migrate_ma": "require"}, ["POLICY.MIGRATE_MA is clear"]),
    ("migrate-ma-required-ok", "genoa-id-block", {"migrate_ma": "require"}, []),
    ("migrate-ma-forbidden", "genoa-id-block", {"migrate_ma": "forbid"}, ["POLICY.MIGRATE_MA is set"]),
    ("guest-svn", "genoa", {"minimum_guest_svn": 1}, ["GUEST_SVN 0 is below the minimum 1"]),
    ("host-data", "genoa", {"host_data": "00" * 32}, []),
    ("host-data-mismatch", "genoa", {"host_data": "01" * 32}, ["HOST_DATA 0000"]),
    ("family-image-id", "genoa", {"family_id": "00" * 16, "image_id": "0x" + "01" * 16}, ["IMAGE_ID 0000"]),
    ("platform-amd", "genoa", {"platforms": ["amd-sev-snp"]}, []),
    (
        "platform-emulated-only",
        "genoa",
        {"platforms": ["emulated"]},
        ["platform amd-sev-snp is not allowed (emulated)"],
    ),
    ("emulated-rejected", "turin", {"platforms": ["amd-sev-snp"]}, ["platform emulated is not allowed"]),
    ("products", "genoa", {"products": ["genoa", "Turin"]}, []),
    (
        "product-not-allowed",
        "milan",
        {"allow_debug": True, "products": ["Genoa"]},
        ["product Milan is not allowed (Genoa)"],
    ),
    ("signing-key-vlek-ok", "milan-vlek", {"signing_keys": ["VLEK"]}, []),
    ("signing-key-vlek-refused", "milan-vlek", {"signing_keys": ["VCEK"]}, ["signing key VLEK is not allowed"]),
    (
        "everything-wrong-reports-everything",
        "milan",
        {
            "report_data": "00" * 64,
            "measurements": ["00" * 48],
            "minimum_guest_svn": 3,
            "minimum_firmware": "2.0",
            "products": ["Turin"],
            "vmpl": 3,
        },
        ["POLICY.DEBUG", "VMPL", "MEASUREMENT", "REPORT_DATA", "GUEST_SVN", "firmware", "product"],
    ),
]


@pytest.mark.parametrize(("evidence", "policy", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate(
    verified: dict[str, VerifiedReport], evidence: str, policy: dict[str, Any], expected: list[str]
) -> None:
    parsed = AttestationPolicy.from_json(json.dumps(policy))
    violations = validate(verified[evidence], parsed)
    assert len(violations) == len(expected), violations
    for want in expected:
        assert any(want in v for v in violations), (want, violations)


def test_require_valid_raises_with_every_violation(verified: dict[str, VerifiedReport]) -> None:
    policy = AttestationPolicy(products=(Product.GENOA,), minimum_guest_svn=1)
    with pytest.raises(PolicyViolation) as info:
        require_valid(verified["milan"], policy)
    assert len(info.value.violations) == 3  # debug, product, guest svn
    require_valid(verified["genoa"], AttestationPolicy())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"measurment": []}', "measurment: Extra inputs are not permitted"),
        ('{"report_data": "0102"}', "report_data: Value error, expected 64 bytes"),
        ('{"measurements": ["zz"]}', "measurements.0: Value error, not a hex string"),
        ('{"measurements": []}', "measurements: .*at least 1"),
        ('{"vmpl": 4}', "vmpl: .*less than or equal to 3"),
        ('{"products": ["Bergamo"]}', "unknown SEV-SNP product name"),
        ('{"platforms": ["sgx"]}', "platforms.0"),
        ('{"minimum_firmware": "1"}', "minimum_firmware: String should match pattern"),
        ('{"minimum_tcb": {"snp": 256}}', "minimum_tcb"),
        ('{"migrate_ma": "maybe"}', "migrate_ma"),
    ],
)
def test_bad_policies_name_the_field(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        AttestationPolicy.from_json(text)


def test_policy_round_trips_and_loads_from_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = AttestationPolicy.from_json(
        json.dumps(
            {
                "minimum_tcb": {"Milan": {"snp": 5}},
                "measurements": ["0x" + "AB" * 48],
                "migrate_ma": "forbid",
                "platforms": ["emulated", "amd-sev-snp"],
                "minimum_firmware": "1.55.43",
            }
        )
    )
    assert policy.measurements == (bytes([0xAB]) * 48,)
    assert policy.migrate_ma is MigrateMa.FORBID
    assert policy.minimum_firmware_tuple == (1, 55, 43)
    path = tmp_path / "policy.json"
    path.write_text(policy.to_json())
    assert load_policy(path) == policy
    assert json.loads(policy.to_json())["measurements"] == ["ab" * 48]


def test_json_schema_documents_hex_fields() -> None:
    schema = policy_json_schema()
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert {"minimum_tcb", "allow_debug", "measurements", "report_data", "chip_ids", "platforms"} <= set(props)
    assert "[0-9a-fA-F]{128}" in json.dumps(props["report_data"])
