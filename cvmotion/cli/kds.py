"""cli layer: ``cvmotion kds``: the EMULATED AMD Key Distribution Service.

```
cvmotion kds serve --vendor-dir DIR [--listen HOST:PORT]     (default 127.0.0.1:8780; port 0: any free port)
cvmotion kds fetch --kds-url URL --product P --hwid HEX --bl N --tee N --snp N --ucode N [--fmc N] --out FILE
```
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cvmotion.errors import UsageError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("kds", help="the emulated AMD Key Distribution Service")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=type(parser))
    parser.set_defaults(handler=lambda _args: _usage(parser))

    serve = verbs.add_parser("serve", help="serve VCEKs and cert chains by AMD's URL scheme over HTTP")
    serve.add_argument("--vendor-dir", type=Path, help="emulated vendor directory (default $CVMOTION_HOME/vendor)")
    serve.add_argument("--listen", default="127.0.0.1:8780", help="HOST:PORT to listen on (127.0.0.1:8780)")
    serve.set_defaults(handler=_serve)

    fetch = verbs.add_parser("fetch", help="fetch one VCEK (DER) from a KDS")
    fetch.add_argument("--kds-url", required=True, help="KDS base URL, e.g. http://127.0.0.1:8780")
    fetch.add_argument("--product", required=True, help="Milan, Genoa or Turin")
    fetch.add_argument("--hwid", required=True, help="hwID in hex (64 bytes; Turin 8)")
    for flag in ("--bl", "--tee", "--snp", "--ucode"):
        fetch.add_argument(flag, type=int, required=True, help=f"{flag[2:]} SPL")
    fetch.add_argument("--fmc", type=int, default=0, help="FMC SPL (Turin)")
    fetch.add_argument("--out", type=Path, required=True, help="where to write the DER certificate")
    fetch.set_defaults(handler=_fetch)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cvmotion.cli.platform import default_vendor_dir
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.kds_http import listen_socket, parse_listen, server_config
    from cvmotion.firmware.vendor import Vendor

    host, port = parse_listen(args.listen)
    vendor = Vendor.open(args.vendor_dir or default_vendor_dir())
    # Bind first, then announce: the printed URL is connectable (port 0 picks a free port and prints it).
    sock, url = listen_socket(host, port)
    print(f"EMULATED AMD KDS (not AMD's) serving {vendor.root} on {url}", flush=True)
    with sock:
        uvicorn.Server(server_config(Kds(vendor))).run(sockets=[sock])
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from cvmotion.abi.snp import Product, TcbVersion
    from cvmotion.errors import MalformedStructure
    from cvmotion.firmware.kds_http import KdsClient

    try:
        product = Product.from_name(args.product)
        hwid = bytes.fromhex(args.hwid)
    except (MalformedStructure, ValueError) as exc:
        raise UsageError(f"bad --product or --hwid: {exc}") from None
    tcb = TcbVersion(boot_loader=args.bl, tee=args.tee, snp=args.snp, microcode=args.ucode, fmc=args.fmc)
    with KdsClient(args.kds_url) as client:
        args.out.write_bytes(client.vcek_der(product, hwid, tcb))
    print(f"wrote {args.out}")
    return 0
