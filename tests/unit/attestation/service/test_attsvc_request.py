"""Request decoding (arbitrary bodies raise only ServiceError 400), the runtime-data binding, and tenant files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.request import CertificateCache, check_runtime_binding, parse_evidence
from cvmotion.attestation.service_error import ServiceError
from cvmotion.attestation.tenants import load_tenants
from cvmotion.errors import UsageError

_CACHE = CertificateCache()
_FIELDS = st.sampled_from(["report", "vcek_cert_chain", "runtime_data", "runtimeData", "nonce", "product", "at", "x"])
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=40), st.binary(max_size=40).map(bytes.hex)
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.dictionaries(_FIELDS, _VALUES).map(lambda d: json.dumps(d).encode())))
def test_arbitrary_bodies_raise_only_service_errors(data: bytes) -> None:
    with pytest.raises(ServiceError) as info:
        parse_evidence(data, _CACHE)
    assert info.value.status == 400
    assert info.value.kind in {
        "malformed_json",
        "invalid_request",
        "invalid_base64",
        "malformed_report",
        "malformed_certificate",
        "invalid_runtime_data",
    }


def test_runtime_binding_is_maa_convention() -> None:
    data = b'{"nonce":"1"}'
    check_runtime_binding(hashlib.sha256(data).digest() + bytes(32), data)
    for report_data in (
        hashlib.sha256(data + b" ").digest() + bytes(32),  # other runtime data
        hashlib.sha256(data).digest() + b"\x01" + bytes(31),  # the upper half must be zero
        hashlib.sha384(data).digest() + bytes(16),  # SHA-384 is not the convention
    ):
        with pytest.raises(ServiceError, match="runtime_data|REPORT_DATA"):
            check_runtime_binding(report_data, data)


def test_tenant_files(tmp_path: Path) -> None:
    tenants_dir = tmp_path / "tenants"
    tenants_dir.mkdir()
    (tenants_dir / "kvstore.json").write_text(
        json.dumps({"policy": {"allow_debug": False, "platforms": ["emulated"]}, "audience": "kv", "mode": "report"})
    )
    tenants = load_tenants(tmp_path, AttestationPolicy.model_validate({"allow_debug": True}))
    assert sorted(tenants) == ["default", "kvstore"]
    assert tenants["default"].config.policy.allow_debug
    assert tenants["kvstore"].config.audience == "kv"
    assert tenants["kvstore"].policy_hash != tenants["default"].policy_hash
    (tenants_dir / "Bad_Name.json").write_text("{}")
    with pytest.raises(UsageError, match="Bad_Name"):
        load_tenants(tmp_path)
    (tenants_dir / "Bad_Name.json").unlink()
    (tenants_dir / "typo.json").write_text(json.dumps({"polcy": {}}))
    with pytest.raises(UsageError, match="polcy"):
        load_tenants(tmp_path)
    (tenants_dir / "typo.json").write_text(json.dumps({"token_lifetime_s": 5}))
    with pytest.raises(UsageError, match="token_lifetime_s"):
        load_tenants(tmp_path)
