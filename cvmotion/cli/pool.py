"""cli layer: ``cvmotion pool``: the operator's host-pool CA, pool credentials, and VM migration policies.

```
cvmotion pool init-ca --dir DIR [--name NAME] [--days N]
cvmotion pool issue   --ca-dir DIR (--chip-id HEX | --host-data-dir DIR) --pool NAME --out FILE [--days N]
cvmotion pool show    --cred FILE [--ca-dir DIR] [--json]
cvmotion pool policy  --allow-pool NAME [--allow-pool NAME ...] [--min-bl N --min-tee N --min-snp N --min-ucode N
                      --min-fmc N] [--product P] [--allow-debug] [--ma-measurement HEX ...] [--out FILE]
```
A pool credential binds a chip (the 64-byte CHIP_ID every attestation report carries) to a pool name; the
migration agents accept a destination only if its credential chains to a pool CA they trust, names the
attested chip, and names one of the VM's allowed pools.  ``policy`` writes a VM's canonical migration policy
and prints the HOST_DATA to launch the VM with.  Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmotion.errors import UsageError
from cvmotion.ipc.validation import describe_problems

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pool", help="host pools: operator pool CA, pool credentials, migration policies")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=type(parser))
    parser.set_defaults(handler=lambda _args: _usage(parser))

    init = verbs.add_parser("init-ca", help="create an operator pool CA (ECDSA P-384) in a directory")
    init.add_argument("--dir", type=Path, required=True, help="directory for pool-ca.pem and pool-ca.key (0600)")
    init.add_argument("--name", default="cvmotion pool CA", help="CA common name")
    init.add_argument("--days", type=int, default=3650, help="validity in days (3650)")
    init.set_defaults(handler=_init_ca)

    issue = verbs.add_parser("issue", help="issue a credential binding a host's chip to a pool")
    issue.add_argument("--ca-dir", type=Path, required=True, help="the pool CA directory")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--chip-id", help="CHIP_ID in hex: 64 bytes (Turin: 8 bytes, zero-padded)")
    who.add_argument("--host-data-dir", type=Path, help="read the CHIP_ID from a host's chip.json")
    issue.add_argument("--pool", required=True, help="pool name: 1..64 of [A-Za-z0-9._-]")
    issue.add_argument("--out", type=Path, required=True, help="credential file (PEM)")
    issue.add_argument("--days", type=int, default=365, help="validity in days (365, capped by the CA's)")
    issue.set_defaults(handler=_issue)

    show = verbs.add_parser("show", help="print (and with --ca-dir verify) a pool credential")
    show.add_argument("--cred", type=Path, required=True, help="credential file (PEM or DER)")
    show.add_argument("--ca-dir", type=Path, help="verify against this pool CA (exit 2 if it does not verify)")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(handler=_show)

    policy = verbs.add_parser("policy", help="write a VM's canonical migration policy and print its HOST_DATA")
    policy.add_argument("--allow-pool", action="append", required=True, metavar="NAME", help="an allowed pool")
    for flag, name in (("--min-bl", "boot loader"), ("--min-tee", "TEE"), ("--min-snp", "SNP")):
        policy.add_argument(flag, type=int, help=f"minimum {name} SPL of the destination")
    policy.add_argument("--min-ucode", type=int, help="minimum microcode SPL of the destination")
    policy.add_argument("--min-fmc", type=int, help="minimum FMC SPL (Turin)")
    policy.add_argument("--product", help="require this product family (Milan, Genoa, Turin)")
    policy.add_argument("--allow-debug", action="store_true", help="allow migrating a guest with DEBUG set")
    policy.add_argument(
        "--ma-measurement", action="append", metavar="HEX", help="allowed MA launch digest (default: this build's)"
    )
    policy.add_argument("--out", type=Path, help="write the document here (default: stdout)")
    policy.set_defaults(handler=_policy)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _init_ca(args: argparse.Namespace) -> int:
    from cvmotion.agent.pool import CA_CERT_FILE, create_pool_ca

    ca = create_pool_ca(args.dir, name=args.name, now=_now(), days=args.days)
    print(f"created pool CA {args.name!r} in {args.dir} (valid until {ca.cert.not_valid_after_utc:%Y-%m-%d})")
    print(f"trust it on every host: {(args.dir / CA_CERT_FILE).resolve()}")
    return 0


def _chip_id(args: argparse.Namespace) -> bytes:
    if args.host_data_dir is not None:
        from cvmotion.firmware.chip import CHIP_FILE

        path = args.host_data_dir / CHIP_FILE
        try:
            doc = json.loads(path.read_text())
            text = str(doc["chip_id"])
        except OSError as exc:
            raise UsageError(f"--host-data-dir: cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--host-data-dir: {path} is not a chip description (no chip_id)") from None
        what = str(path)
    else:
        text, what = args.chip_id, "--chip-id"
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"{what}: CHIP_ID is not hex") from None
    if len(raw) == 8:
        raw += bytes(56)  # Turin: 8 significant bytes, the rest of CHIP_ID is zero
    if len(raw) != 64:
        raise UsageError(f"{what}: CHIP_ID is 64 bytes (128 hex digits; Turin 8 bytes), not {len(raw)}")
    return raw


def _issue(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from cvmotion.agent.pool import issue_pool_credential, load_pool_ca

    chip_id = _chip_id(args)
    ca = load_pool_ca(args.ca_dir)
    cert = issue_pool_credential(ca, chip_id, args.pool, now=_now(), days=args.days)
    args.out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    print(f"issued pool credential: chip {chip_id[:8].hex()}… -> pool {args.pool!r}, serial {cert.serial_number:#x}")
    print(f"written to {args.out} (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cvmotion.agent.pool import load_pool_ca, verify_pool_credential

    data = args.cred.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise UsageError(f"--cred: {args.cred} is not a PEM or DER certificate ({exc})") from None
    if args.ca_dir is not None:
        ca = load_pool_ca(args.ca_dir).cert
        cred = verify_pool_credential(cert.public_bytes(serialization.Encoding.DER), (ca,), at=_now())
        fields = {"verified": True, "chip_id": cred.chip_id.hex(), "pool": cred.pool}
    else:
        fields = {"verified": False, **_fields(cert)}  # without --ca-dir: a display of unverified fields
    out = {
        **fields,
        "serial": f"{cert.serial_number:#x}",
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:10} {value}")
    return 0


def _fields(cert: x509.Certificate) -> dict[str, str]:
    from cryptography import x509

    from cvmotion.agent.oids import OID_POOL_CHIP_ID, OID_POOL_NAME, decode_octets

    out: dict[str, str] = {}
    for key, oid in (("chip_id", OID_POOL_CHIP_ID), ("pool", OID_POOL_NAME)):
        try:
            ext = cert.extensions.get_extension_for_oid(oid).value
            if not isinstance(ext, x509.UnrecognizedExtension):
                raise ValueError("not an opaque extension")
            raw = decode_octets(ext.value, key)
        except (ValueError, x509.ExtensionNotFound) as exc:
            out[key] = f"<unreadable: {exc}>"
            continue
        out[key] = raw.hex() if key == "chip_id" else raw.decode("ascii", "replace")
    return out


def _policy(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cvmotion.agent.policy import MigrationPolicy

    mins = {
        "boot_loader": args.min_bl,
        "tee": args.min_tee,
        "snp": args.min_snp,
        "microcode": args.min_ucode,
        "fmc": args.min_fmc,
    }
    fields: dict[str, Any] = {"allowed_pools": tuple(args.allow_pool), "allow_debug": args.allow_debug}
    if any(v is not None for v in mins.values()):
        fields["minimum_tcb"] = {k: v for k, v in mins.items() if v is not None}
    if args.product:
        fields["product"] = args.product
    if args.ma_measurement:
        fields["allowed_ma_measurements"] = tuple(m.lower().removeprefix("0x") for m in args.ma_measurement)
    try:
        policy = MigrationPolicy.model_validate(fields)
    except ValidationError as exc:
        problems = describe_problems(exc.errors())
        raise UsageError(f"migration policy: {problems}") from None
    doc = policy.canonical()
    if args.out is not None:
        args.out.write_bytes(doc)
        print(f"wrote {args.out}")
    else:
        print(doc.decode())
    print(f"host_data {policy.host_data().hex()}", file=sys.stderr if args.out is None else sys.stdout)
    return 0
