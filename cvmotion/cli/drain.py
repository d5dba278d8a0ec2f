"""cli layer: ``cvmotion host drain|cordon|uncordon`` — host maintenance through the fleet controller.

``host drain HOST --reason SecurityUpdate|HardwareRefresh [--max-parallel N] [--notice S] [--wait] [--json]``
cordons the host and starts its drain; ``--wait`` follows it (each VM's step and outcome as it changes on
stderr) until it ends and prints one object, ``--json`` exactly the documented one::

    {"host", "reason", "status", "vms": [{"name", "resourceGroup", "method", "outcome", "from", "to",
                                          "downtimeMs", "pauseMs", "attempts", "reason"}]}

``host drain HOST --cancel`` cancels a running drain; ``host cordon HOST [--reason R]`` makes the host no
placement target without moving anything (maintenance run outside a drain); ``host uncordon HOST`` makes it a
placement target again.  The exit code is 0 when the drain succeeded, 3 when it ended otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from urllib.parse import quote

from cvmotion.cli._fleet import add_controller_args, call, emit
from cvmotion.errors import CvmError

__all__ = ["drain_summary", "register_drain", "wait_drain"]

_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_VM_KEYS = ("name", "resourceGroup", "method", "outcome", "from", "to", "downtimeMs", "pauseMs", "attempts", "reason")


def register_drain(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drain = verbs.add_parser("drain", help="cordon a host and move its VMs off it (live first, then the fallbacks)")
    drain.add_argument("host", metavar="HOST")
    drain.add_argument("--reason", choices=("SecurityUpdate", "HardwareRefresh"), help="why the host is drained")
    drain.add_argument("--max-parallel", type=int, default=None, metavar="N", help="live moves off the host at once")
    drain.add_argument("--notice", type=float, default=None, metavar="S", help="Scheduled Events' NotBefore, seconds")
    drain.add_argument("--wait", action="store_true", help="follow the drain until it ends")
    drain.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="--wait gives up after this")
    drain.add_argument("--cancel", action="store_true", help="cancel the host's running drain")
    add_controller_args(drain, resource_group=False)
    drain.set_defaults(handler=_drain)
    cordon = verbs.add_parser("cordon", help="make a host no placement target; the VMs it runs stay")
    cordon.add_argument("host", metavar="HOST")
    cordon.add_argument("--reason", default=None, help="why (shown with the host)")
    add_controller_args(cordon, resource_group=False)
    cordon.set_defaults(handler=_cordon)
    uncordon = verbs.add_parser("uncordon", help="make a cordoned host a placement target again")
    uncordon.add_argument("host", metavar="HOST")
    add_controller_args(uncordon, resource_group=False)
    uncordon.set_defaults(handler=_uncordon)


def drain_summary(drain: dict[str, Any]) -> dict[str, Any]:
    """The documented ``--wait --json`` object, from the API's drain view."""
    return {
        "host": drain["host"],
        "reason": drain["reason"],
        "status": drain["status"],
        "vms": [{key: vm.get(key) for key in _VM_KEYS} for vm in drain["vms"]],
    }


def wait_drain(args: argparse.Namespace, host: str, timeout: float, *, quiet: bool = False) -> dict[str, Any]:
    """Poll the host's drain until it ends (bounded); each VM's change is told on stderr unless ``quiet``."""
    deadline = time.monotonic() + timeout
    seen: dict[str, tuple[Any, ...]] = {}
    while True:
        drain: dict[str, Any] = call(args, "GET", f"{_HOSTS}/{quote(host, safe='')}/drain")
        for vm in drain["vms"]:
            state = (vm["step"], vm["outcome"], vm["to"])
            if not quiet and seen.get(vm["name"]) != state:
                print(f"  {vm['name']}: {vm['method']} {vm['step']} {vm['outcome'] or ''}".rstrip(), file=sys.stderr)
            seen[vm["name"]] = state
        if not drain["active"]:
            return drain
        if time.monotonic() > deadline:
            raise CvmError(f"the drain of {host} did not end within {timeout:.0f} s (it goes on; --cancel stops it)")
        time.sleep(0.25)


def _drain(args: argparse.Namespace) -> int:
    path = f"{_HOSTS}/{quote(args.host, safe='')}/drain"
    if args.cancel:
        drain = call(args, "POST", path + "/cancel")
        emit(args, drain_summary(drain) if args.json else drain, _table(drain))
        return 0
    if args.reason is None:
        raise CvmError("--reason SecurityUpdate|HardwareRefresh is required (or --cancel)")
    body: dict[str, Any] = {"reason": args.reason}
    if args.max_parallel is not None:
        body["maxParallel"] = args.max_parallel
    if args.notice is not None:
        body["noticeSeconds"] = args.notice
    drain = call(args, "POST", path, body)
    if args.wait:
        drain = wait_drain(args, args.host, args.timeout, quiet=args.json)
    emit(args, drain_summary(drain) if args.json else drain, _table(drain))
    return 0 if drain["status"] in ("Succeeded", "Accepted", "Running") else 3


def _table(drain: dict[str, Any]) -> list[tuple[str, ...]]:
    def ms(value: Any) -> str:
        return "" if value is None else f"{value:.0f}"

    rows: list[tuple[str, ...]] = [
        ("VM", "group", "method", "step", "outcome", "from", "to", "downtime ms", "pause ms", "reason")
    ]
    for vm in drain["vms"]:
        rows.append(
            (
                vm["name"], vm["resourceGroup"], vm["method"], vm["step"], vm["outcome"] or "", vm["from"],
                vm["to"] or "", ms(vm["downtimeMs"]), ms(vm["pauseMs"]), (vm["reason"] or "")[:60],
            )
        )  # fmt: skip
    print(f"drain of {drain['host']} ({drain['reason']}): {drain['status']}", file=sys.stderr)
    return rows


def _cordon(args: argparse.Namespace) -> int:
    body = {} if args.reason is None else {"reason": args.reason}
    return _show_host(args, call(args, "POST", f"{_HOSTS}/{quote(args.host, safe='')}/cordon", body))


def _uncordon(args: argparse.Namespace) -> int:
    return _show_host(args, call(args, "POST", f"{_HOSTS}/{quote(args.host, safe='')}/uncordon"))


def _show_host(args: argparse.Namespace, host: dict[str, Any]) -> int:
    props = host["properties"]
    emit(args, host, [("host", "state", "cordoned"), (host["name"], props["state"], str(props["cordoned"]))])
    return 0
