"""cli layer: ``cvmotion vm create|list|show|delete|kv|console --host URL`` — VMs on a running host daemon.

With ``--controller URL``/``--resource-group RG`` the same verbs go through the fleet controller instead
(``cli.fleet_vm``), where ``--host NAME`` pins the VM to a registered host.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmotion.cli import fleet_vm
from cvmotion.cli._http import api
from cvmotion.errors import UsageError

__all__ = ["register_fleet_verbs"]

Handler = Callable[[argparse.Namespace], int]


def register_fleet_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = verbs.add_parser("create", help="launch a confidential VM on a host daemon; returns when it runs")
    create.add_argument(
        "--host", metavar="HOST", help="host API URL, e.g. http://127.0.0.1:8701 (with --controller: a host to pin to)"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--image", required=True, help="memdirty | kvstore | probe | PATH")
    size = create.add_mutually_exclusive_group(required=True)
    size.add_argument("--memory", help="guest RAM, e.g. 64M, 1G")
    size.add_argument("--size", metavar="SKU", help="e.g. Standard_DC2as_v5")
    create.add_argument("--cmdline", default="", help='guest command line, e.g. "dirty_mib=16 rate=0"')
    create.add_argument("--vcpus", type=int)
    create.add_argument("--backend", choices=("kvm", "emulated"))
    create.add_argument("--migration-policy", type=Path, metavar="FILE", help="canonical MigrationPolicy JSON")
    create.add_argument("--key-name", help="data key the paravisor fetches from the host's key-release service")
    create.add_argument("--json", action="store_true")
    create.add_argument("--confidential-live-migration", choices=("Enabled", "Disabled"), help="controller path")
    create.add_argument("--location", help="controller path: the VM's location (default 'local')")
    fleet_vm.add_shared(create)
    create.set_defaults(handler=_via_controller(_create, fleet_vm.create))

    listing = verbs.add_parser("list", help="list the VMs of a host daemon")
    listing.add_argument("--host", metavar="HOST_URL")
    listing.add_argument("--json", action="store_true")
    fleet_vm.add_shared(listing)
    listing.set_defaults(handler=_via_controller(_list, fleet_vm.listing))

    show = verbs.add_parser("show", help="one VM of a host daemon")
    show.add_argument("name", nargs="?")
    show.add_argument("--host", metavar="HOST_URL")
    show.add_argument("--name", dest="name_flag", help="controller path: the VM's name")
    show.add_argument("--json", action="store_true")
    fleet_vm.add_shared(show)
    show.set_defaults(handler=_via_controller(_show, fleet_vm.show))

    delete = verbs.add_parser("delete", help="stop and decommission a VM")
    delete.add_argument("name", nargs="?")
    delete.add_argument("--host", metavar="HOST_URL")
    delete.add_argument("--name", dest="name_flag", help="controller path: the VM's name")
    delete.add_argument("--json", action="store_true")
    delete.add_argument(
        "--force", action="store_true", help="host path: stop it even while its migration has not settled (else 409)"
    )
    fleet_vm.add_shared(delete)
    delete.set_defaults(handler=_via_controller(_delete, fleet_vm.delete))

    kv = verbs.add_parser("kv", help="one kvstore request to a VM (GET/PUT/DELETE through cvm-io)")
    kv.add_argument("name")
    kv.add_argument("op", choices=("get", "put", "delete"))
    kv.add_argument("key")
    kv.add_argument("value", nargs="?", default="")
    kv.add_argument("--host", required=True, metavar="HOST_URL")
    kv.set_defaults(handler=_kv)

    console = verbs.add_parser("console", help="print a VM's serial console")
    console.add_argument("name")
    console.add_argument("--host", required=True, metavar="HOST_URL")
    console.add_argument("--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
    console.set_defaults(handler=_console)
    fleet_vm.add_controller_verbs(verbs)


def _via_controller(direct: Handler, controlled: Handler) -> Handler:
    return lambda args: controlled(args) if fleet_vm.controller_path(args) else direct(args)


def _base(url: str | None) -> str:
    if not url:
        raise UsageError("give --host HOST_URL (a host daemon), or --controller URL --resource-group RG")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--host {url!r}: expected a URL such as http://127.0.0.1:8701")
    return url.rstrip("/")


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "image": args.image, "cmdline": args.cmdline}
    if args.memory:
        body["memory"] = args.memory
    else:
        body["size"] = args.size
    if args.vcpus:
        body["vcpus"] = args.vcpus
    if args.backend:
        body["backend"] = args.backend
    if args.key_name:
        body["key_name"] = args.key_name
    if args.migration_policy:
        body["migration_policy"] = base64.b64encode(args.migration_policy.read_bytes()).decode()
    vm = api("POST", f"{_base(args.host)}/v1/vms", body, timeout=180)
    if args.json:
        print(json.dumps(vm, indent=2))
    else:
        print(f"{vm['name']}: {vm['state']} on {vm['host']} ({vm['backend']}), measurement {vm['measurement'][:24]}...")
    return 0


def _list(args: argparse.Namespace) -> int:
    vms = api("GET", f"{_base(args.host)}/v1/vms")["vms"]
    if args.json:
        print(json.dumps(vms, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "state", "memory", "vcpus", "image", "backend", "measurement")
    for vm in vms:
        table.add_row(
            vm["name"],
            vm["state"],
            f"{vm['memory'] >> 20} MiB",
            str(vm["vcpus"]),
            vm["image"],
            str(vm["backend"]),
            str(vm["measurement"])[:16] + "...",
        )
    Console().print(table)
    return 0


def _vm_name(args: argparse.Namespace) -> str:
    name = args.name or args.name_flag
    if not name:
        raise UsageError("give the VM's name")
    return str(name)


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(api("GET", f"{_base(args.host)}/v1/vms/{_vm_name(args)}"), indent=2))
    return 0


def _delete(args: argparse.Namespace) -> int:
    force = "?force=true" if getattr(args, "force", False) else ""
    api("DELETE", f"{_base(args.host)}/v1/vms/{_vm_name(args)}{force}")
    print(f"{_vm_name(args)}: deleted")
    return 0


def _kv(args: argparse.Namespace) -> int:
    result = api(
        "POST", f"{_base(args.host)}/v1/vms/{args.name}/kv", {"op": args.op, "key": args.key, "value": args.value}
    )
    print(json.dumps(result))
    return 0 if result["status"] in ("OK", "NOT_FOUND") else 3


def _console(args: argparse.Namespace) -> int:
    since = 0
    base = _base(args.host)
    while True:
        out = api("GET", f"{base}/v1/vms/{args.name}/console?since={since}")
        for line in out["lines"]:
            print(line)
        sys.stdout.flush()
        since = out["next"]
        if not args.follow:
            return 0
        time.sleep(0.5)
