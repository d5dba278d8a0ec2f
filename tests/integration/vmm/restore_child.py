"""Child process for the cross-process restore test: adopt an inherited memfd, restore the VM, query it.

    python restore_child.py --fd N --state FILE [--get KEY ...] [--heartbeats N]

Prints one JSON object: {"values": {key: value-or-null}, "heartbeats": [[seq, writes, csum], ...]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.snapshot import VmState
from cvmotion.vmm.vm import Vm
from cvmotion.vmm.workloads import KvClient, parse_heartbeat


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--get", nargs="*", default=[])
    parser.add_argument("--heartbeats", type=int, default=0)
    args = parser.parse_args()
    state = VmState.from_bytes(args.state.read_bytes())
    vm = Vm.restore(state, GuestMemory(state.memory_size, fd=args.fd))
    try:
        vm.resume()
        kv = KvClient(vm.cvmio)
        values = {key: (v.decode() if (v := kv.get(key.encode())) is not None else None) for key in args.get}
        beats = [parse_heartbeat(line) for line in vm.console.collect(r"^HB ", args.heartbeats, 60)]
        print(json.dumps({"values": values, "heartbeats": beats}))
    finally:
        vm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
