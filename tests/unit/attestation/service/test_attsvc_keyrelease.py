"""Relying party and secure key release: the AKV release-policy grammar (table-driven), and a release end to end
over real HTTP — attestation service (OIDC discovery, JWKS) -> key-release service -> the guest unwraps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from attsvc_support import DEBUG_POLICY, FakeClock, Guest, emulated_trust, launch, make_service, new_sp

from cvmotion.attestation.client import AttestationClient
from cvmotion.attestation.http_common import ServerThread, listen_socket
from cvmotion.attestation.keyrelease import KeyStore, TransferKey
from cvmotion.attestation.keyrelease_http import KeyReleaseClient, KeyReleaseService
from cvmotion.attestation.keyrelease_http import create_app as create_release_app
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.release_policy import ReleasePolicy
from cvmotion.attestation.relying_party import RelyingParty
from cvmotion.attestation.service_http import create_app
from cvmotion.errors import PolicyViolation, UsageError
from cvmotion.firmware.vendor import Vendor

CLAIMS = {
    "x-ms-attestation-type": "sevsnpvm",
    "x-ms-sevsnpvm-is-debuggable": False,
    "x-ms-sevsnpvm-snpfw-svn": 25,
    "x-ms-sevsnpvm-launchmeasurement": "ABCD",
    "x-ms-runtime": {"client": {"nonce": "n1"}},
}


def _policy(*conditions: dict[str, Any], authority: str = "http://a", group: str = "allOf") -> ReleasePolicy:
    return ReleasePolicy.from_json({"version": "1.0.0", "anyOf": [{"authority": authority, group: list(conditions)}]})


@pytest.mark.parametrize(
    ("condition", "ok"),
    [
        ({"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}, True),
        ({"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": "abcd"}, True),  # case-insensitive, as Azure Policy
        ({"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False}, True),
        ({"claim": "x-ms-sevsnpvm-is-debuggable", "equals": 0}, False),  # booleans only equal booleans
        ({"claim": "x-ms-sevsnpvm-snpfw-svn", "greaterOrEquals": 25}, True),
        ({"claim": "x-ms-sevsnpvm-snpfw-svn", "greater": 25}, False),
        ({"claim": "x-ms-sevsnpvm-snpfw-svn", "less": "30"}, False),  # ordering needs numbers
        ({"claim": "x-ms-sevsnpvm-snpfw-svn", "notEquals": 24}, True),
        ({"claim": "x-ms-runtime.client.nonce", "equals": "n1"}, True),  # dotted path into JSON claims
        ({"claim": "x-ms-runtime.client.other", "exists": False}, True),
        ({"claim": "absent", "notEquals": "x"}, False),  # absent fails closed
        ({"claim": "absent", "exists": True}, False),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_release_policy_conditions(condition: dict[str, Any], ok: bool) -> None:
    assert (_policy(condition).failures("http://a", CLAIMS) == []) is ok


def test_release_policy_groups_and_authorities() -> None:
    yes = {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}
    no = {"claim": "x-ms-attestation-type", "equals": "sgx"}
    assert _policy(yes, no, group="anyOf").failures("http://a", CLAIMS) == []
    assert _policy(yes, {"allOf": [yes, no]}).failures("http://a", CLAIMS)
    assert "not an authority" in _policy(yes).failures("http://b", CLAIMS)[0]


@pytest.mark.parametrize(
    "doc",
    [
        {"anyOf": []},
        {"version": "2.0.0", "anyOf": [{"authority": "a", "allOf": [{"claim": "c", "equals": 1}]}]},
        {"version": "1.0.0", "anyOf": [{"authority": "a"}]},
        {"version": "1.0.0", "anyOf": [{"authority": "a", "allOf": []}]},
        {"version": "1.0.0", "anyOf": [{"authority": "a", "allOf": [{"claim": "c", "matches": "x"}]}]},
        {"version": "1.0.0", "anyOf": [{"authority": "a", "allOf": [{"claim": "c", "equals": [1]}]}]},
        {"version": "1.0.0", "anyOf": [{"authority": "a", "allOf": [{"claim": "c", "exists": "yes"}]}]},
    ],
)
def test_release_policy_rejects_bad_documents(doc: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        ReleasePolicy.from_json(doc)


@pytest.fixture(scope="module")
def stack(emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Attestation service and key-release service, each on a real loopback socket."""
    clock = FakeClock()
    base = tmp_path_factory.mktemp("skr")
    strict = AttestationPolicy.model_validate({"allow_debug": True})  # debug guests get tokens; the key policy decides
    service = make_service(base / "svc", emulated_trust(emulated_vendor), clock, policy=strict)
    att_sock, att_url = listen_socket("127.0.0.1", 0)
    service.issuer = att_url  # tokens name the URL relying parties discover
    guest = launch(new_sp(emulated_vendor, base / "host"))
    measurement = guest.sp.guest_info(guest.handle).measurement.hex()
    store = KeyStore(base / "kr")
    release_policy = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": att_url,
                "allOf": [
                    {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
                    {"claim": "x-ms-compliance-status", "equals": "cvmotion-compliant-cvm"},
                    {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False},
                    {"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": measurement},
                ],
            }
        ],
    }
    store.create("kvstore-data-key", release_policy, secret=b"\x11" * 32)
    release = KeyReleaseService(store, relying_party=lambda iss: RelyingParty.discover(iss, clock=clock))
    kr_sock, kr_url = listen_socket("127.0.0.1", 0)
    with (
        ServerThread(create_app(service), att_sock, att_url),
        ServerThread(create_release_app(release), kr_sock, kr_url),
    ):
        yield {"att": att_url, "kr": kr_url, "guest": guest, "clock": clock}


def _token_for(stack: dict[str, Any], guest: Guest, transfer: TransferKey) -> str:
    runtime = transfer.runtime_data()
    report = guest.report(hashlib.sha256(runtime).digest())
    with AttestationClient(stack["att"]) as client:
        return client.attest(report, guest.chain_pem(), runtime, data_type="JSON")


def test_key_release_end_to_end(stack: dict[str, Any]) -> None:
    transfer = TransferKey.generate()
    token = _token_for(stack, stack["guest"], transfer)
    with KeyReleaseClient(stack["kr"]) as kr:
        assert kr.release("kvstore-data-key", token, transfer) == b"\x11" * 32
        # The token alone is worth nothing: the secret is wrapped to the attested transfer key.
        with pytest.raises(UsageError, match="does not decrypt"):
            kr.release("kvstore-data-key", token, TransferKey.generate())


def test_key_release_refusals(stack: dict[str, Any], emulated_vendor: Vendor, tmp_path: Path) -> None:
    transfer = TransferKey.generate()
    debug_guest = launch(stack["guest"].sp, policy=DEBUG_POLICY)
    with KeyReleaseClient(stack["kr"]) as kr:
        with pytest.raises(PolicyViolation, match="is-debuggable"):
            kr.release("kvstore-data-key", _token_for(stack, debug_guest, transfer), transfer)
        other_image = launch(stack["guest"].sp, image=b"another image")
        with pytest.raises(PolicyViolation, match="launchmeasurement"):
            kr.release("kvstore-data-key", _token_for(stack, other_image, transfer), transfer)
        token = _token_for(stack, stack["guest"], transfer)
        with pytest.raises(UsageError, match="unknown_key"):
            kr.release("no-such-key", token, transfer)
        with pytest.raises(UsageError, match="token_invalid"):
            kr.release("kvstore-data-key", token[:-4] + "AAAA", transfer)
    raw = httpx.post(
        f"{stack['kr']}/keys/kvstore-data-key/release", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert (raw.status_code, raw.json()["error"]["kind"]) == (400, "invalid_request")
    stack["clock"].advance(hours=2)  # past the token's 1 h lifetime
    try:
        with KeyReleaseClient(stack["kr"]) as kr, pytest.raises(UsageError, match="expired"):
            kr.release("kvstore-data-key", token, transfer)
    finally:
        stack["clock"].advance(hours=-2)
