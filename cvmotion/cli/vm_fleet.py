"""cli layer: ``cvmotion vm create|list|show|delete|kv|console --host URL`` — VMs on a running host daemon."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from cvmotion.cli._http import api
from cvmotion.errors import UsageError

__all__ = ["register_fleet_verbs"]


def register_fleet_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = verbs.add_parser("create", help="launch a confidential VM on a host daemon; returns when it runs")
    create.add_argument("--host", required=True, metavar="HOST_URL", help="host API, e.g. http://127.0.0.1:8701")
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
    create.set_defaults(handler=_create)

    listing = verbs.add_parser("list", help="list the VMs of a host daemon")
    listing.add_argument("--host", required=True, metavar="HOST_URL")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)

    show = verbs.add_parser("show", help="one VM of a host daemon")
    show.add_argument("name")
    show.add_argument("--host", required=True, metavar="HOST_URL")
    show.set_defaults(handler=_show)

    delete = verbs.add_parser("delete", help="stop and decommission a VM")
    delete.add_argument("name")
    delete.add_argument("--host", required=True, metavar="HOST_URL")
    delete.set_defaults(handler=_delete)

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


def _base(url: str) -> str:
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


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(api("GET", f"{_base(args.host)}/v1/vms/{args.name}"), indent=2))
    return 0


def _delete(args: argparse.Namespace) -> int:
    api("DELETE", f"{_base(args.host)}/v1/vms/{args.name}")
    print(f"{args.name}: deleted")
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
