"""Token signing keys (persistence, rotation with overlap, pruning, several processes) and token verification
(every way a token can be wrong fails closed)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from attsvc_support import FakeClock, Guest, body, emulated_trust, launch, make_service, new_sp
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cvmotion.attestation.jwks import b64url_decode, jwk_thumbprint, rsa_public_jwk
from cvmotion.attestation.keys import SigningKeyStore
from cvmotion.attestation.token import StaticJwks, issue_token_at, verify_token_at
from cvmotion.errors import MalformedStructure, TokenError, UsageError
from cvmotion.firmware.vendor import Vendor

ISS = "http://attest.test"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyStore:
    return SigningKeyStore.open(tmp_path_factory.mktemp("keys"), overlap=timedelta(hours=1))


def _token(store: SigningKeyStore, clock: FakeClock, **claims: Any) -> str:
    return issue_token_at(claims or {"x": 1}, store.active, clock(), timedelta(minutes=10), issuer=ISS).token


def _jwks(store: SigningKeyStore, clock: FakeClock) -> StaticJwks:
    from cvmotion.attestation.jwks import jwks_document

    return StaticJwks(jwks_document((k.kid, k.public_key) for k in store.published(clock())))


def test_key_store_persists_and_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1), clock=clock)
    kid = store.active.kid
    assert kid == jwk_thumbprint(rsa_public_jwk(store.active.public_key))
    assert (tmp_path / f"{kid}.pem").stat().st_mode & 0o777 == 0o600
    again = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1), clock=clock)
    assert again.active.kid == kid


def test_rotation_overlap_and_prune(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1), clock=clock)
    other_process = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1), clock=clock)
    old = store.active
    old_token = _token(store, clock)
    new = store.rotate()
    assert new.kid != old.kid
    assert store.active.kid == new.kid
    assert [k.kid for k in store.published()] == [new.kid, old.kid]
    assert other_process.refresh()  # another worker sees the rotation through the state file
    assert other_process.active.kid == new.kid
    new_token = _token(other_process, clock)
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    jwks = _jwks(store, clock)
    for token in (old_token, new_token):
        verify_token_at(token, jwks, issuer=ISS, now=clock())
    clock.advance(minutes=59)
    assert store.prune() == []
    clock.advance(minutes=2)
    assert [k.kid for k in store.published()] == [new.kid]
    assert store.prune() == [old.kid]
    assert not (tmp_path / f"{old.kid}.pem").exists()
    with pytest.raises(TokenError, match="no key with kid"):
        verify_token_at(old_token, _jwks(store, clock), issuer=ISS, now=clock(), leeway=timedelta(hours=1))


def test_rotate_if_older_than(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1), clock=clock)
    first = store.active.kid
    assert store.rotate_if_older_than(timedelta(days=1)) is None
    clock.advance(days=1)
    rotated = store.rotate_if_older_than(timedelta(days=1))
    assert rotated is not None
    assert rotated.kid != first


def test_key_store_rejects_corruption(tmp_path: Path) -> None:
    store = SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1))
    (tmp_path / f"{store.active.kid}.pem").write_bytes(b"junk")
    with pytest.raises(UsageError, match="cannot load"):
        SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1))
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(UsageError, match="not format 1"):
        SigningKeyStore.open(tmp_path, overlap=timedelta(hours=1))
    with pytest.raises(UsageError, match="key size"):
        SigningKeyStore(tmp_path, bits=1024, overlap=timedelta(hours=1))


def _forge(token: str, **changes: Any) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(b64url_decode(payload, what="payload"))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{encoded}.{sig}"


def test_token_verification_fails_closed(shared_store: SigningKeyStore) -> None:
    clock = FakeClock()
    jwks = _jwks(shared_store, clock)
    good = _token(shared_store, clock)
    assert verify_token_at(good, jwks, issuer=ISS, now=clock()).claims["x"] == 1
    public_pem = shared_store.active.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    cases = {
        "alg none": jwt.encode({"iss": ISS}, None, algorithm="none", headers={"kid": shared_store.active.kid}),
        "tampered payload": _forge(good, x=2),
        "wrong issuer": issue_token_at(
            {}, shared_store.active, clock(), timedelta(minutes=5), issuer="http://evil"
        ).token,
        "unexpected aud": issue_token_at(
            {}, shared_store.active, clock(), timedelta(minutes=5), issuer=ISS, audience="kv"
        ).token,
        "junk": "a.b",
        "unknown kid": jwt.encode(
            {"iss": ISS}, shared_store.active.private_key, algorithm="RS256", headers={"kid": "zz"}
        ),
    }
    # HS256 keyed with the public key (the classic algorithm-confusion forgery); PyJWT refuses to even
    # make it with a PEM key, so sign it by hand.
    head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": shared_store.active.kid}).encode()).rstrip(b"=")
    body_ = base64.urlsafe_b64encode(
        json.dumps({"iss": ISS, "iat": 1, "nbf": 1, "exp": 2**40, "jti": "x"}).encode()
    ).rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.new(public_pem, head + b"." + body_, hashlib.sha256).digest()).rstrip(b"=")
    cases["hs256 confusion"] = (head + b"." + body_ + b"." + mac).decode()
    for name, token in cases.items():
        with pytest.raises(TokenError) as info:
            verify_token_at(token, jwks, issuer=ISS, now=clock())
        assert str(info.value), name


def test_token_times_use_the_injected_clock(shared_store: SigningKeyStore) -> None:
    clock = FakeClock()
    jwks = _jwks(shared_store, clock)
    token = _token(shared_store, clock)  # valid 10 minutes
    early = clock() - timedelta(minutes=1)
    with pytest.raises(TokenError, match="not valid before"):
        verify_token_at(token, jwks, issuer=ISS, now=early, leeway=timedelta(0))
    verify_token_at(token, jwks, issuer=ISS, now=clock() + timedelta(minutes=9, seconds=59), leeway=timedelta(0))
    with pytest.raises(TokenError, match="expired"):
        verify_token_at(token, jwks, issuer=ISS, now=clock() + timedelta(minutes=10), leeway=timedelta(0))
    audience_token = issue_token_at({}, shared_store.active, clock(), timedelta(minutes=5), issuer=ISS, audience="kv")
    verify_token_at(audience_token.token, jwks, issuer=ISS, audience="kv", now=clock())
    with pytest.raises(TokenError):
        verify_token_at(audience_token.token, jwks, issuer=ISS, audience="other", now=clock())


def test_b64url_decoding_is_strict() -> None:
    assert b64url_decode("AQID", what="x") == b"\x01\x02\x03"
    assert b64url_decode("AQ", what="x") == b"\x01"
    for bad in ("A", "AQ+/", "AQ ID", "é"):
        with pytest.raises(MalformedStructure):
            b64url_decode(bad, what="x")


def test_service_rotation_keeps_old_tokens_verifiable(emulated_vendor: Vendor, tmp_path: Path) -> None:
    """Automatic rotation in the service: the next token is signed by the new key; the old token still
    verifies against the JWKS until its expiry, after which the old key leaves the JWKS."""
    clock = FakeClock()
    guest: Guest = launch(new_sp(emulated_vendor, tmp_path / "host"))
    service = make_service(
        tmp_path / "svc", emulated_trust(emulated_vendor), clock, rotate_after=timedelta(hours=6), lifetime_s=3600
    )

    def attest() -> str:
        return asyncio.run(service.attest(body(guest.report(b"r"), guest.chain_pem()))).token

    first = attest()
    clock.advance(hours=6)
    second = attest()
    kid1, kid2 = (jwt.get_unverified_header(t)["kid"] for t in (first, second))
    assert kid1 != kid2
    jwks = StaticJwks(service.jwks())
    assert {k["kid"] for k in service.jwks()["keys"]} == {kid1, kid2}
    verify_token_at(second, jwks, issuer=ISS, now=clock())
    with pytest.raises(TokenError, match="expired"):  # issued 6 h ago with a 1 h lifetime
        verify_token_at(first, jwks, issuer=ISS, now=clock())
    verify_token_at(first, jwks, issuer=ISS, now=clock() - timedelta(hours=5, minutes=30))
    clock.advance(hours=1, minutes=6)  # past the overlap (1 h lifetime + 5 min skew)
    assert {k["kid"] for k in service.jwks()["keys"]} == {kid2}
