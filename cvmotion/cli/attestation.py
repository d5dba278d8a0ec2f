"""cli layer: ``cvmotion attestation`` — the attestation service (MAA look-alike), tokens, and key release.

```
cvmotion attestation serve --data-dir DIR [--listen 127.0.0.1:8790] [--policy FILE] [--issuer URL] [--kds URL]
                           [--trust-anchor FILE ...] [--emulated-vendor-dir DIR] [--allow-evaluation-time]
                           [--token-lifetime S] [--key-size 2048|3072] [--rotate-after S] [--workers N]
cvmotion attestation rotate-key --data-dir DIR
cvmotion attestation verify-token TOKEN --jwks URL [--issuer URL] [--audience AUD] [--json] [--allow-evaluation-time]
cvmotion attestation key-release serve --data-dir DIR [--listen 127.0.0.1:8791] [--audience AUD]
                                       [--allow-evaluation-time] [--workers N]
cvmotion attestation key-release create-key --data-dir DIR --name NAME --policy FILE [--secret-hex HEX]
```
``verify-token`` exits 0 valid, 2 the token does not verify, 1 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from cvmotion.errors import TokenError, UsageError

__all__ = ["register"]

_PRODUCTS = ("Milan", "Genoa", "Turin")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("attestation", help="attestation service, tokens and key release")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=type(parser))
    parser.set_defaults(handler=lambda _args: _usage(parser))

    serve = verbs.add_parser("serve", help="run the attestation service (POST /attest/SevSnpVm, /certs)")
    serve.add_argument("--data-dir", type=Path, required=True, help="signing keys and tenants/*.json")
    serve.add_argument("--listen", default="127.0.0.1:8790", help="HOST:PORT (port 0: any free port)")
    serve.add_argument("--policy", type=Path, help="attestation policy JSON of the default tenant")
    serve.add_argument("--issuer", help="token issuer URL (default: the listening URL)")
    serve.add_argument("--kds", help="KDS base URL to fetch VCEKs and chains for evidence without a chain")
    serve.add_argument("--trust-anchor", action="append", default=[], type=Path, help="emulated ARK PEM (repeatable)")
    serve.add_argument("--emulated-vendor-dir", type=Path, help="trust every <Product>/ark.pem of this vendor")
    serve.add_argument(
        "--allow-evaluation-time",
        action="store_true",
        help="honour a request's 'at' (evaluate old evidence at a past time; marked in the token)",
    )
    serve.add_argument("--token-lifetime", type=int, help="default tenant's token lifetime in seconds")
    serve.add_argument("--key-size", type=int, default=2048, choices=(2048, 3072), help="RSA signing key size")
    serve.add_argument("--rotate-after", type=int, help="rotate the signing key when it is this many seconds old")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (CPU-bound: one per core)")
    serve.set_defaults(handler=_serve)

    rotate = verbs.add_parser("rotate-key", help="make a new signing key active (old one stays in the JWKS)")
    rotate.add_argument("--data-dir", type=Path, required=True)
    rotate.set_defaults(handler=_rotate)

    verify = verbs.add_parser("verify-token", help="verify an attestation token against a JWKS URL")
    verify.add_argument("token", help="the JWT (or @FILE)")
    verify.add_argument("--jwks", required=True, help="JWKS URL, e.g. http://127.0.0.1:8790/certs")
    verify.add_argument("--issuer", help="expected iss (default: the JWKS URL without /certs)")
    verify.add_argument("--audience", help="expected aud (default: the token must carry none)")
    verify.add_argument("--allow-evaluation-time", action="store_true", help="accept x-cvmotion-evaluation-time")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(handler=_verify_token)

    kr = verbs.add_parser("key-release", help="relying party: release secrets to attested guests")
    kr_verbs = kr.add_subparsers(dest="kr_verb", metavar="VERB", parser_class=type(parser))
    kr.set_defaults(handler=lambda _args: _usage(kr))
    kr_serve = kr_verbs.add_parser("serve", help="run the key-release service (POST /keys/NAME/release)")
    kr_serve.add_argument("--data-dir", type=Path, required=True, help="keys/*.json")
    kr_serve.add_argument("--listen", default="127.0.0.1:8791", help="HOST:PORT (port 0: any free port)")
    kr_serve.add_argument("--audience", help="required aud of tokens (default: tokens must carry none)")
    kr_serve.add_argument("--allow-evaluation-time", action="store_true", help="accept evaluation-time tokens")
    kr_serve.add_argument("--workers", type=int, default=1)
    kr_serve.set_defaults(handler=_kr_serve)
    kr_create = kr_verbs.add_parser("create-key", help="add a secret with its release policy")
    kr_create.add_argument("--data-dir", type=Path, required=True)
    kr_create.add_argument("--name", required=True)
    kr_create.add_argument("--policy", type=Path, required=True, help="release policy JSON (AKV grammar)")
    kr_create.add_argument("--secret-hex", help="the secret (default: 32 random bytes)")
    kr_create.set_defaults(handler=_kr_create)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _read(path: Path, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path}: larger than {limit} bytes")
    return data


def _trust(args: argparse.Namespace) -> Any:
    from cvmotion.attestation.trust import TrustStore

    trust = TrustStore.amd()
    for path in args.trust_anchor:
        trust = trust.with_anchors_from_pem(_read(path, "--trust-anchor"))
    if args.emulated_vendor_dir is not None:
        found = [args.emulated_vendor_dir / p / "ark.pem" for p in _PRODUCTS]
        found = [p for p in found if p.is_file()]
        if not found:
            raise UsageError(f"--emulated-vendor-dir {args.emulated_vendor_dir}: no <Product>/ark.pem in it")
        for path in found:
            trust = trust.with_anchors_from_pem(_read(path, "emulated ARK"))
    return trust


def _serve(args: argparse.Namespace) -> int:
    from cvmotion.attestation.endorsements import KdsFetcher
    from cvmotion.attestation.http_common import listen_socket, parse_listen, serve
    from cvmotion.attestation.keys import SigningKeyStore
    from cvmotion.attestation.policy import load_policy
    from cvmotion.attestation.service import CLOCK_SKEW, AttestationService
    from cvmotion.attestation.service_http import create_app
    from cvmotion.attestation.tenants import DEFAULT_TENANT, Tenant, load_tenants

    host, port = parse_listen(args.listen)
    trust = _trust(args)
    tenants = load_tenants(args.data_dir, load_policy(args.policy) if args.policy is not None else None)
    if args.token_lifetime is not None:
        default = tenants[DEFAULT_TENANT].config
        try:
            config = type(default).model_validate({**default.model_dump(), "token_lifetime_s": args.token_lifetime})
        except ValueError as exc:
            raise UsageError(f"--token-lifetime: {exc}") from None
        tenants[DEFAULT_TENANT] = Tenant.of(DEFAULT_TENANT, config)
    longest = max(t.config.token_lifetime_s for t in tenants.values())
    overlap = timedelta(seconds=longest) + CLOCK_SKEW
    keys_dir = args.data_dir / "signing-keys"
    SigningKeyStore.open(keys_dir, bits=args.key_size, overlap=overlap)  # create the first key before forking
    sock, url = listen_socket(host, port, reuse_port=args.workers > 1)
    issuer = (args.issuer or url).rstrip("/")
    rotate_after = timedelta(seconds=args.rotate_after) if args.rotate_after is not None else None

    def app_factory() -> Any:
        keys = SigningKeyStore.open(keys_dir, bits=args.key_size, overlap=overlap)
        kds = KdsFetcher(args.kds) if args.kds else None
        service = AttestationService(
            trust=trust,
            keys=keys,
            tenants=tenants,
            issuer=issuer,
            kds=kds,
            allow_evaluation_time=args.allow_evaluation_time,
            rotate_after=rotate_after,
        )
        return create_app(service)

    emulated = [a.name for a in trust if a.kind.value == "emulated"]
    print(f"attestation service listening on {url}", flush=True)
    print(
        f"  issuer {issuer}; tenants {', '.join(sorted(tenants))}; trust AMD ARK-Milan/Genoa/Turin"
        + (f" + EMULATED {', '.join(emulated)}" if emulated else "")
        + ("; evaluation time ALLOWED" if args.allow_evaluation_time else ""),
        flush=True,
    )
    with sock:
        return serve(app_factory, sock, workers=args.workers)


def _rotate(args: argparse.Namespace) -> int:
    from cvmotion.attestation.keys import SigningKeyStore

    state = args.data_dir / "signing-keys" / "state.json"
    if not state.is_file():
        raise UsageError(f"no signing keys under {args.data_dir}: start the service once first")
    try:
        overlap_s = int(json.loads(_read(state, "signing key state"))["overlap_s"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{state}: no overlap_s ({exc!r}); start the service once first") from None
    store = SigningKeyStore.open(state.parent, overlap=timedelta(seconds=overlap_s))
    old = store.active.kid
    new = store.rotate()
    print(f"active signing key is now {new.kid}; {old} stays in the JWKS for {overlap_s} s")
    return 0


def _verify_token(args: argparse.Namespace) -> int:
    from cvmotion.attestation.relying_party import RelyingParty
    from cvmotion.attestation.token import JwksUrlResolver

    token = args.token
    if token.startswith("@"):
        token = _read(Path(token[1:]), "token").decode("ascii", "replace")
    token = token.strip()
    issuer = args.issuer
    if issuer is None:
        if not args.jwks.rstrip("/").endswith("/certs"):
            raise UsageError("--issuer is required when the --jwks URL does not end in /certs")
        issuer = args.jwks.rstrip("/").removesuffix("/certs")
    party = RelyingParty(
        JwksUrlResolver(args.jwks),
        issuer=issuer,
        audience=args.audience,
        allow_evaluation_time=args.allow_evaluation_time,
    )
    try:
        verified = party.verify(token)
    except TokenError as exc:
        if args.json:
            print(json.dumps({"valid": False, "error": str(exc)}, indent=2))
        else:
            print(f"cvmotion: token INVALID: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"valid": True, "header": verified.header, "claims": verified.claims}, indent=2))
    else:
        platform = verified.claims.get("x-cvmotion-platform")
        print(f"VALID token from {issuer} (kid {verified.kid}, platform {platform})")
        print(json.dumps(verified.claims, indent=2, sort_keys=True))
    return 0


def _kr_serve(args: argparse.Namespace) -> int:
    from cvmotion.attestation.http_common import listen_socket, parse_listen, serve
    from cvmotion.attestation.keyrelease import KeyStore
    from cvmotion.attestation.keyrelease_http import KeyReleaseService, create_app
    from cvmotion.attestation.relying_party import RelyingParty

    host, port = parse_listen(args.listen)
    store = KeyStore(args.data_dir)
    sock, url = listen_socket(host, port, reuse_port=args.workers > 1)

    def factory(issuer: str) -> RelyingParty:
        return RelyingParty.discover(issuer, audience=args.audience, allow_evaluation_time=args.allow_evaluation_time)

    def app_factory() -> Any:
        return create_app(KeyReleaseService(KeyStore(args.data_dir), relying_party=factory))

    print(f"key-release service listening on {url}", flush=True)
    print(f"  keys: {', '.join(store.names()) or '(none yet)'}", flush=True)
    with sock:
        return serve(app_factory, sock, workers=args.workers)


def _kr_create(args: argparse.Namespace) -> int:
    from cvmotion.attestation.keyrelease import KeyStore

    try:
        policy = json.loads(_read(args.policy, "--policy"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--policy {args.policy}: not JSON ({exc})") from None
    secret = None
    if args.secret_hex is not None:
        try:
            secret = bytes.fromhex(args.secret_hex)
        except ValueError:
            raise UsageError("--secret-hex is not hex") from None
    key = KeyStore(args.data_dir).create(args.name, policy, secret)
    print(f"created key {key.name!r} ({len(key.secret)} bytes) releasable to {', '.join(key.policy.authorities)}")
    return 0
