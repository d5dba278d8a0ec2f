"""cli layer: ``cvmotion host list --controller URL`` and starting a host's controller registration."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from cvmotion.cli._fleet import add_controller_args, call, emit
from cvmotion.errors import UsageError

if TYPE_CHECKING:
    from cvmotion.host.daemon import HostDaemon
    from cvmotion.host.registration import Registration

__all__ = ["register_host_list", "start_registration"]


def register_host_list(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    listing = verbs.add_parser("list", help="hosts registered with the fleet controller")
    add_controller_args(listing, resource_group=False)
    listing.set_defaults(handler=_list)
    from cvmotion.cli.drain import register_drain

    register_drain(verbs)  # host drain|uncordon


def _list(args: argparse.Namespace) -> int:
    hosts = call(args, "GET", "/providers/Cvmotion.Fabric/hosts")["value"]
    rows = [("name", "state", "pool", "product", "TCB", "vCPUs", "GiB", "VMs", "API")]
    for h in hosts:
        p = h["properties"]
        rows.append(
            (
                h["name"], p["state"], p["pool"], p["product"], p["reportedTcbText"][:24],
                str(p["capacity"]["vcpus"]), str(p["capacity"]["memoryGiB"]), str(len(p["reportedVms"])), p["apiUrl"],
            )
        )  # fmt: skip
    emit(args, {"value": hosts}, rows)
    return 0


def start_registration(daemon: HostDaemon, args: argparse.Namespace, api_url: str) -> Registration | None:
    """The registration thread when ``--controller`` was given (``None`` otherwise)."""
    if not args.controller:
        return None
    from cvmotion.host.registration import Registration, RegistrationConfig

    token = args.controller_token or os.environ.get("CVMOTION_HOST_TOKEN")
    if not token:
        raise UsageError("--controller needs a registration token: --controller-token or $CVMOTION_HOST_TOKEN")
    config = RegistrationConfig(
        controller_url=args.controller,
        token=token,
        api_url=api_url,
        region=args.region,
        zone=args.zone,
        vcpus=args.capacity_vcpus,
        memory_gib=args.capacity_gib,
    )
    return Registration(daemon, config).start()
