"""vmd: ``python -m cvmotion.vmd`` — one VM process, started by the host daemon (or warm, as a standby).

The platform process checks this command line (``platformd.peer``) before it accepts a ``vm_attach``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from cvmotion.errors import CvmError
from cvmotion.ipc.latency import tune_for_latency
from cvmotion.vmd.process import VmProcess
from cvmotion.vmd.protocol import VmSpec
from cvmotion.vmd.server import install
from cvmotion.vmm.kvm_backend import install_kick_handler

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvmotion-vm", description="one cvmotion VM (started by the host daemon)")
    parser.add_argument("--dir", required=True, type=Path, help="the VM's directory (vm.json, control.sock)")
    parser.add_argument("--platform", required=True, help="the platform process's socket")
    parser.add_argument("--standby", action="store_true", help="start without a VM; wait for `configure`")
    parser.add_argument("--parent", type=int, help="a standby's daemon PID: it exits once that is not its parent")
    args = parser.parse_args(argv)
    if args.standby:
        proc = install(VmProcess(VmSpec(name="standby", memory=0), args.dir, args.platform))
        proc.configured = False
        if args.parent is not None:
            proc._parent = args.parent
    else:
        try:
            spec = VmSpec.from_json((args.dir / "vm.json").read_text())
        except (OSError, ValueError, TypeError) as exc:
            print(f"cvmotion-vm: {args.dir / 'vm.json'}: {exc}", file=sys.stderr)
            return 1
        proc = install(VmProcess(spec, args.dir, args.platform))
    signal.signal(signal.SIGTERM, lambda *_: proc._stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's terminal going away must not kill the guest
    # vCPU threads are kicked out of KVM_RUN with a signal whose handler only the main thread may install;
    # an incoming VM is created later, from an RPC thread, when the firmware hands over its state.
    install_kick_handler()
    if args.standby:
        threading.Thread(target=proc.make_spare_key, name="spare-key", daemon=True).start()
    else:
        try:
            proc.setup()
        except CvmError as exc:
            print(f"cvmotion-vm: {exc}", file=sys.stderr)
            (args.dir / "error").write_text(str(exc))
            return 1
    tune_for_latency()
    proc.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
