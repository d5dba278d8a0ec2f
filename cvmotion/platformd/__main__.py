"""platformd: ``python -m cvmotion.platformd`` — a host's platform process (its emulated AMD-SP and its MA).

Started by the host daemon when absent (or by the operator); it provisions its own chip and pool credential on the
first start (``platformd.provision``) and then serves ``platform.sock`` (``platformd.server``).  A secure-processor
state its predecessor sealed is opened on start (``platformd.succession``); ``--succeed FD`` starts it ahead of a
memory-preserving update: loaded, it waits for the go on FD and for ``--predecessor`` to exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cvmotion.errors import CvmError, UsageError
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.kds_http import KdsClient
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.latency import tune_for_latency
from cvmotion.platformd.ma import MigrationAgentService, load_agent_config
from cvmotion.platformd.provision import platform_trust, provision
from cvmotion.platformd.server import PlatformService
from cvmotion.platformd.succession import SuccessorLink, open_sealed_state

__all__ = ["build_service", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvmotion-platform", description="a host's emulated AMD-SP and MA")
    parser.add_argument("--data-dir", required=True, type=Path, help="the host's data directory (chip identity)")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--vendor-dir", type=Path, help="emulated vendor (for VCEK certificates)")
    parser.add_argument("--kds", help="KDS URL for VCEK certificates (instead of --vendor-dir)")
    parser.add_argument("--product", help="first start: the chip to manufacture (Milan, Genoa, Turin)")
    parser.add_argument("--pool", help="first start: the pool the operator's pool CA puts this chip in")
    parser.add_argument("--pool-ca-dir", type=Path, help="first start: the operator's pool CA (issues the credential)")
    parser.add_argument("--succeed", type=int, metavar="FD", help="a hand-over: say ready on FD, start on its go")
    parser.add_argument("--predecessor", type=int, metavar="PID", help="with --succeed: wait for this PID to exit")
    args = parser.parse_args(argv)
    link = SuccessorLink.from_fd(args.succeed) if args.succeed is not None else None
    try:
        provision(
            args.data_dir,
            product=args.product,
            vendor_dir=args.vendor_dir,
            pool=args.pool,
            pool_ca_dir=args.pool_ca_dir,
        )
        if link is not None:
            link.ready_and_wait(args.predecessor)
        service = build_service(args.data_dir, vendor_dir=args.vendor_dir, kds_url=args.kds)
    except CvmError as exc:
        print(f"cvmotion-platform: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    (args.data_dir / "platform.pid").write_text(str(os.getpid()))
    tune_for_latency()
    service.serve(args.socket, stop, listening=link.serving if link is not None else None)
    return 0


def build_service(data_dir: Path, *, vendor_dir: Path | None, kds_url: str | None) -> PlatformService:
    """Open the host's chip, bring up its SP and its migration agent (MA)."""
    endorsements: Any
    if kds_url:
        endorsements = KdsClient(kds_url)
    elif vendor_dir is not None:
        endorsements = Kds(Vendor.open(vendor_dir))
    else:
        raise UsageError("the platform needs --kds URL or --vendor-dir for VCEK certificates")
    opened = open_sealed_state(data_dir, endorsements)
    sp = opened[0] if opened is not None else SecureProcessor.open(data_dir, endorsements=endorsements)
    service = PlatformService(sp)
    # Real AMD roots are pinned; the emulated ARK recorded when the chip was made is the only other anchor (a
    # migration never leaves the product family), never one the KDS or vendor directory of this start offers.
    trust = platform_trust(data_dir, Chip.load(data_dir))
    try:
        service.ma_handle = MigrationAgentService(service, load_agent_config(data_dir, trust)).identity.handle
    except UsageError as exc:
        service.serve_agent(None, reason=str(exc))
    if opened is not None:
        service.adopt(opened[1])
    return service


if __name__ == "__main__":
    raise SystemExit(main())
