"""cli layer: ``cvmotion platform``: create, inspect and exercise a host's EMULATED AMD secure processor.

```
cvmotion platform create   --data-dir DIR [--product Milan|Genoa|Turin] [--vendor-dir DIR] [--seed N]
cvmotion platform show     --data-dir DIR [--json] [--kds-url URL]
cvmotion platform report   --data-dir DIR --report-data HEX [--out FILE] [--vcek-out FILE] [--chain-out FILE]
cvmotion platform set-tcb  --data-dir DIR [--bl N] [--tee N] [--snp N] [--ucode N] [--fmc N] [--commit]
cvmotion platform load-vlek --data-dir DIR --csp-id NAME
```
The vendor directory defaults to ``$CVMOTION_HOME/vendor`` (``CVMOTION_HOME`` defaults to ``~/.cvmotion``);
a chip remembers the vendor directory it was made by.  Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmotion.errors import UsageError

if TYPE_CHECKING:
    from cvmotion.abi.snp import TcbVersion
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.device import EndorsementSource

__all__ = ["default_vendor_dir", "register"]

DEFAULT_KDS_URL = "http://127.0.0.1:8780"
_PROBE_POLICY = 0x30000  # SMT allowed, reserved bit 17: the policy QEMU and sev-snp-measure default to


def default_vendor_dir() -> Path:
    home = Path(os.environ.get("CVMOTION_HOME") or "~/.cvmotion").expanduser()
    return home / "vendor"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("platform", help="the emulated AMD secure processor of a host")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=type(parser))
    parser.set_defaults(handler=lambda _args: _usage(parser))

    create = verbs.add_parser("create", help="manufacture an emulated chip in a host data directory")
    _data_dir(create)
    create.add_argument("--product", default="Genoa", help="Milan, Genoa or Turin (default Genoa)")
    create.add_argument("--vendor-dir", type=Path, help="emulated vendor directory (default $CVMOTION_HOME/vendor)")
    create.add_argument("--seed", type=int, help="deterministic chip identity (tests and demos only)")
    create.add_argument("--report-version", type=int, default=3, choices=(2, 3, 5), help="report version (3)")
    create.add_argument("--mit-vector", type=_int, default=0, help="CURRENT_MIT_VECTOR for v5 reports")
    create.set_defaults(handler=_create)

    show = verbs.add_parser("show", help="print the chip identity, TCBs, firmware and VCEK URL")
    _data_dir(show)
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.add_argument("--kds-url", default=os.environ.get("CVMOTION_KDS_URL", DEFAULT_KDS_URL), help="KDS base URL")
    show.set_defaults(handler=_show)

    report = verbs.add_parser("report", help="launch a probe guest and get a signed attestation report")
    _data_dir(report)
    report.add_argument("--report-data", required=True, help="up to 64 bytes in hex (zero-padded on the right)")
    report.add_argument("--out", type=Path, default=Path("report.bin"), help="report file (report.bin)")
    report.add_argument("--vcek-out", type=Path, help="write the VCEK (or VLEK) certificate, DER")
    report.add_argument("--chain-out", type=Path, help="write ASK (or ASVK) then ARK, PEM")
    report.add_argument("--vmpl", type=int, default=0, help="VMPL to request (0..3)")
    report.add_argument("--key", choices=("auto", "vcek", "vlek"), default="auto", help="MSG_REPORT_REQ KEY_SEL")
    report.add_argument("--vendor-dir", type=Path, help="vendor directory for certificates (default: the chip's)")
    report.add_argument("--kds-url", help="fetch certificates from this KDS instead of the vendor directory")
    report.set_defaults(handler=_report)

    set_tcb = verbs.add_parser("set-tcb", help="install firmware at a new TCB (new reported TCB, new VCEK)")
    _data_dir(set_tcb)
    for flag, name in (("--bl", "boot loader"), ("--tee", "TEE"), ("--snp", "SNP"), ("--ucode", "microcode")):
        set_tcb.add_argument(flag, type=int, help=f"{name} SPL (default: unchanged)")
    set_tcb.add_argument("--fmc", type=int, help="FMC SPL (Turin only)")
    set_tcb.add_argument("--commit", action="store_true", help="also SNP_COMMIT (raise the anti-rollback floor)")
    set_tcb.add_argument("--hold-reported", action="store_true", help="keep REPORTED_TCB (SNP_SET_CONFIG)")
    set_tcb.set_defaults(handler=_set_tcb)

    vlek = verbs.add_parser("load-vlek", help="have the vendor issue a VLEK for a CSP and load it (SNP_VLEK_LOAD)")
    _data_dir(vlek)
    vlek.add_argument("--csp-id", required=True, help="cloud provider id written in the VLEK's cspId extension")
    vlek.add_argument("--vendor-dir", type=Path, help="vendor directory (default: the chip's)")
    vlek.set_defaults(handler=_load_vlek)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, required=True, help="the host's data directory")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _vendor(path: Path | None, chip: Chip | None = None) -> Path:
    if path is not None:
        return path
    if chip is not None and chip.vendor_dir is not None:
        return chip.vendor_dir
    return default_vendor_dir()


def _create(args: argparse.Namespace) -> int:
    from cvmotion.abi.snp import Product
    from cvmotion.errors import MalformedStructure
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.vendor import Vendor

    try:
        product = Product.from_name(args.product)
    except MalformedStructure as exc:
        raise UsageError(f"--product: {exc}") from None
    vendor = Vendor.open(_vendor(args.vendor_dir))
    chip = Chip.create(
        args.data_dir, vendor, product, args.seed, report_version=args.report_version, mit_vector=args.mit_vector
    )
    vendor.roots(product)
    print(f"created emulated {product.value} chip {chip.hwid.hex()[:16]}... in {args.data_dir}")
    print(f"trust anchor (emulated ARK): {vendor.ark_path(product).resolve()}")
    return 0


def _tcb_doc(tcb: TcbVersion, chip: Chip) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "raw": f"{tcb.to_u64(chip.product.tcb_layout):#018x}",
        "boot_loader": tcb.boot_loader,
        "tee": tcb.tee,
        "snp": tcb.snp,
        "microcode": tcb.microcode,
    }
    if chip.product.tcb_layout.value == "turin":
        doc["fmc"] = tcb.fmc
    return doc


def _show(args: argparse.Namespace) -> int:
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.kds import vcek_path

    chip = Chip.load(args.data_dir)
    url = args.kds_url.rstrip("/") + vcek_path(chip.product, chip.hwid, chip.reported_tcb)
    doc = {
        "emulated": True,
        "product": chip.product.value,
        "chip_id": chip.chip_id.hex(),
        "hwid": chip.hwid.hex(),
        "current_tcb": _tcb_doc(chip.current_tcb, chip),
        "committed_tcb": _tcb_doc(chip.committed_tcb, chip),
        "reported_tcb": _tcb_doc(chip.reported_tcb, chip),
        "firmware": f"{chip.firmware.major}.{chip.firmware.minor}",
        "firmware_build": chip.firmware.build,
        "cpuid": {"family": chip.cpuid.family, "model": chip.cpuid.model, "stepping": chip.cpuid.stepping},
        "report_version": chip.report_version,
        "vcek_url": url,
        "vendor_dir": str(chip.vendor_dir) if chip.vendor_dir else None,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"EMULATED AMD secure processor ({chip.product.value}) in {args.data_dir}")
    print(f"  chip id         {chip.chip_id.hex()}")
    for name in ("current_tcb", "committed_tcb", "reported_tcb"):
        tcb = getattr(chip, name)
        print(f"  {name:<15} {tcb.to_u64(chip.product.tcb_layout):#018x}  {tcb.describe()}")
    print(f"  firmware        {chip.firmware.describe()}")
    print(f"  cpuid           family {chip.cpuid.family:#x} model {chip.cpuid.model:#x} stepping {chip.cpuid.stepping}")
    print(f"  report version  {chip.report_version}")
    print(f"  VCEK URL        {url}")
    return 0


def _report_data(text: str) -> bytes:
    text = text.removeprefix("0x")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"--report-data {text[:20]!r}: not hexadecimal") from None
    if len(data) > 64:
        raise UsageError(f"--report-data is {len(data)} bytes; REPORT_DATA holds at most 64")
    return data.ljust(64, b"\0")


def _endorsements(args: argparse.Namespace, chip: Chip) -> EndorsementSource:
    if args.kds_url:
        from cvmotion.firmware.kds_http import KdsClient

        return KdsClient(args.kds_url)
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.vendor import Vendor

    vendor_dir = _vendor(args.vendor_dir, chip)
    if not vendor_dir.is_dir():
        raise UsageError(f"vendor directory {vendor_dir} does not exist (pass --vendor-dir or --kds-url)")
    return Kds(Vendor.open(vendor_dir))


def _report(args: argparse.Namespace) -> int:
    from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
    from cvmotion.abi.snp import AttestationReport
    from cvmotion.errors import FirmwareError, FirmwareStatus
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.device import SecureProcessor
    from cvmotion.firmware.launch import PAGE_SIZE, PageType

    report_data = _report_data(args.report_data)
    if not 0 <= args.vmpl <= 3:
        raise UsageError(f"--vmpl {args.vmpl}: a VMPL is 0..3")
    chip = Chip.load(args.data_dir)
    sp = SecureProcessor(chip, endorsements=_endorsements(args, chip))
    # A probe guest: one measured page naming itself, and the secrets page the guest learns VMPCK0 from.
    handle = sp.launch_start(_PROBE_POLICY)
    try:
        probe = b"cvmotion platform report probe guest\n".ljust(PAGE_SIZE, b"\0")
        sp.launch_update(handle, 0x0, PageType.NORMAL, probe)
        secrets = bytearray(PAGE_SIZE)
        sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
        sp.launch_finish(handle)
        sp.activate(handle)
        channel = GuestChannel(bytes(secrets[0x20:0x40]))
        key_sel = {"auto": 0, "vcek": 1, "vlek": 2}[args.key]
        request = channel.report_request(report_data, vmpl=args.vmpl, key_sel=key_sel)
        response = ReportRsp.from_bytes(channel.open_response(sp.guest_request(handle, request)))
    finally:
        sp.decommission(handle)
    if response.status:
        raise FirmwareError(FirmwareStatus(response.status), "MSG_REPORT_RSP refused the request")
    report = AttestationReport.from_bytes(response.report)
    args.out.write_bytes(response.report)
    certs = sp.get_ext_certs(report.key_info.signing_key)
    if args.vcek_out:
        args.vcek_out.write_bytes(certs.endorsement_der)
    if args.chain_out:
        args.chain_out.write_bytes(certs.chain_pem)
    print(f"wrote {args.out}: EMULATED {chip.product.value} report v{report.version}, "
          f"signed by the {report.key_info.signing_key.name}")  # fmt: skip
    print(f"  measurement {report.measurement.hex()}")
    if chip.vendor_dir:
        print(f"  verify with --trust-anchor {chip.vendor_dir / chip.product.value / 'ark.pem'}")
    return 0


def _set_tcb(args: argparse.Namespace) -> int:
    import dataclasses

    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.device import SecureProcessor

    chip = Chip.load(args.data_dir)
    changes = {
        name: value
        for name, value in (
            ("boot_loader", args.bl),
            ("tee", args.tee),
            ("snp", args.snp),
            ("microcode", args.ucode),
            ("fmc", args.fmc),
        )
        if value is not None
    }
    if not changes:
        raise UsageError("set-tcb: give at least one of --bl --tee --snp --ucode --fmc")
    bad = [f"{name}={value}" for name, value in changes.items() if not 0 <= value <= 255]
    if bad:
        raise UsageError(f"set-tcb: SPLs are 0..255 ({', '.join(bad)})")
    current = dataclasses.replace(chip.current_tcb, **changes)
    sp = SecureProcessor(chip)
    sp.update_tcb(current, reported=chip.reported_tcb if args.hold_reported else None, commit=args.commit)
    status = sp.platform_status()
    print(f"EMULATED {chip.product.value}: current TCB {status.current_tcb.describe()}, "
          f"reported {status.reported_tcb.describe()}, committed {status.committed_tcb.describe()}")  # fmt: skip
    return 0


def _load_vlek(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.device import SecureProcessor
    from cvmotion.firmware.vendor import Vendor

    chip = Chip.load(args.data_dir)
    vendor_dir = _vendor(args.vendor_dir, chip)
    if not vendor_dir.is_dir():
        raise UsageError(f"vendor directory {vendor_dir} does not exist")
    issue = Vendor.open(vendor_dir).issue_vlek(chip.product, args.csp_id, chip.reported_tcb, chip.chip_id)
    SecureProcessor(chip).vlek_load(issue.hashstick, issue.cert.public_bytes(serialization.Encoding.DER))
    print(f"loaded an EMULATED VLEK for {args.csp_id!r} at TCB {chip.reported_tcb.describe()}")
    return 0
