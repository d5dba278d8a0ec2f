"""cli layer: ``cvmotion vm run`` -- boot a guest image (or a snapshot) locally and stream its console.

This verb runs the VM in this process, with no control plane: it is the VMM's own tool (like running
QEMU or Firecracker by hand).  The console goes to stdout; what the VMM says goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cvmotion.cli.vm_fleet import register_fleet_verbs
from cvmotion.errors import ImageError, UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = subparsers.add_parser("vm", help="VMs: run an image locally, or create/list/migrate them on host daemons")
    verbs = vm.add_subparsers(dest="verb", metavar="VERB")
    run = verbs.add_parser(
        "run",
        help="boot a multiboot guest (or restore a snapshot) and stream its console",
        description="Boot a multiboot guest image on KVM (or the unicorn emulator) and stream COM1 to stdout.",
    )
    run.add_argument("--image", help="memdirty | kvstore | probe | PATH to a multiboot v1 ELF kernel")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--memory", help="guest RAM, e.g. 64M, 8G (default 64M)")
    size.add_argument("--size", metavar="SKU", help="a VM size, e.g. Standard_DC2as_v5 (sets vCPUs and memory)")
    run.add_argument("--vcpus", type=int, help="vCPU count (default 1, or the size's)")
    run.add_argument("--cmdline", default="", help='guest command line, e.g. "dirty_mib=4 rate=1000"')
    run.add_argument("--seconds", type=float, help="stop after this long (default: when the guest stops)")
    run.add_argument("--backend", choices=("kvm", "emulated"), help="force a backend (default: kvm if usable)")
    run.add_argument("--save", type=Path, metavar="FILE", help="at the end, pause and write a snapshot here")
    run.add_argument("--restore", type=Path, metavar="FILE", help="continue from a snapshot instead of booting")
    run.set_defaults(handler=_run)
    register_fleet_verbs(verbs)
    vm.set_defaults(handler=lambda _args: _help(vm))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _say(text: str) -> None:
    print(f"cvmotion vm: {text}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from cvmotion.abi.sku import find_sku, format_size, parse_memory
    from cvmotion.vmm.backend import BackendKind
    from cvmotion.vmm.images import load_image
    from cvmotion.vmm.snapshot import load_snapshot, save_snapshot
    from cvmotion.vmm.vm import MachineConfig, Vm

    backend = BackendKind(args.backend) if args.backend else None
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    if args.restore is not None:
        if args.image or args.memory or args.size or args.vcpus:
            raise UsageError("--restore takes the image, memory and vCPUs from the snapshot")
        state, memory = load_snapshot(args.restore)
        vm = Vm.restore(state, memory, backend)
        what = f"snapshot {args.restore}"
    else:
        if not args.image:
            raise UsageError("--image is required (memdirty, kvstore, probe or a path)")
        vcpus, mem = 1, 64 << 20
        if args.size:
            sku = find_sku(args.size)
            vcpus, mem = sku.vcpus, sku.memory
        if args.memory:
            mem = parse_memory(args.memory)
        if args.vcpus is not None:
            if args.vcpus < 1:
                raise UsageError(f"--vcpus must be at least 1, got {args.vcpus}")
            vcpus = args.vcpus
        try:
            image = load_image(args.image)
        except ImageError as exc:  # a bad file is bad input: exit code 1, like any malformed input
            raise UsageError(str(exc)) from exc
        try:
            vm = Vm.create(MachineConfig(mem, vcpus, backend), image, args.cmdline)
        except ImageError as exc:
            raise UsageError(str(exc)) from exc
        what = f"image {image.name}"
    try:
        kind = vm.backend_kind.value
        if vm.backend_kind is BackendKind.EMULATED:
            kind += " (unicorn CPU emulator, no hardware virtualization)"
        _say(
            f"{what}, backend {kind} [{vm.backend_reason}], memory {format_size(vm.memory.size)}, "
            f"{vm.config.vcpus} vCPU(s), cmdline {vm.cmdline!r}"
        )
        vm.console.subscribe(lambda line: print(line, flush=True))
        t0 = time.monotonic()
        if args.restore is not None:
            vm.resume()
        else:
            vm.start()
        stop = vm.wait(args.seconds)
        elapsed = time.monotonic() - t0
        if args.save is not None:
            vm.pause()
            stored = save_snapshot(args.save, vm.capture_state(), vm.memory)
            _say(f"snapshot written to {args.save} ({format_size(stored) if stored else '0 bytes'} of memory)")
        if stop is None:
            _say(f"stopped after {elapsed:.1f} s as asked; {format_size(vm.memory.populated_bytes())} populated")
            return 0
        vm.check()  # a fault raises VcpuError naming the RIP
        _say(f"{stop.message} after {elapsed:.1f} s")
        return 0 if not stop.exit_code else 3
    finally:
        vm.close()
