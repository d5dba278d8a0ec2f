"""cli layer: ``cvmotion vm create|update|show|list|delete|migrate --controller URL --resource-group RG``.

The controller path of the ``vm`` verbs (``vm_fleet`` keeps the direct host path: ``--host URL``).
A verb takes this path when ``--controller`` or ``--resource-group`` is given; ``--host NAME`` then
pins the VM to one registered host.  Long-running requests are polled until they settle.
"""

from __future__ import annotations

import argparse
from typing import Any

from cvmotion.cli._fleet import (
    add_controller_args,
    call,
    call_with_operation,
    emit,
    subscription,
    wait_operation,
)
from cvmotion.errors import UsageError

__all__ = ["add_controller_verbs", "add_shared", "controller_path", "create", "delete", "listing", "show"]


def controller_path(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "controller", None) or getattr(args, "resource_group", None))


def _vm_path(args: argparse.Namespace, name: str | None = None) -> str:
    if not args.resource_group:
        raise UsageError("--resource-group RG is required with --controller")
    base = f"/subscriptions/{subscription(args)}/resourceGroups/{args.resource_group}"
    base += "/providers/Microsoft.Compute/virtualMachines"
    return f"{base}/{name}" if name else base


def _name(args: argparse.Namespace) -> str:
    name = getattr(args, "name_flag", None) or getattr(args, "name", None)
    if not name:
        raise UsageError("give the VM's name (--name NAME)")
    return str(name)


def add_shared(parser: argparse.ArgumentParser) -> None:
    """The controller flags on a verb that also has the direct host path."""
    parser.add_argument("--controller", metavar="URL", help="fleet controller (default $CVMOTION_CONTROLLER)")
    parser.add_argument("--resource-group", "-g", metavar="RG", help="the VM's resource group (controller path)")
    parser.add_argument("--subscription", help="default $CVMOTION_SUBSCRIPTION, else 'default'")
    parser.add_argument("--token", help="bearer token (default $CVMOTION_TOKEN, else the local Owner token)")


def add_controller_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    update = verbs.add_parser("update", help="change a VM through the controller (opt in/out of live migration)")
    add_controller_args(update)
    update.add_argument("--name", dest="name_flag", required=True)
    update.add_argument("--confidential-live-migration", choices=("Enabled", "Disabled"), required=True)
    update.set_defaults(handler=_update)

    migrate = verbs.add_parser("migrate", help="live-migrate a VM through the controller (operator action)")
    migrate.add_argument("name", nargs="?")
    add_controller_args(migrate)
    migrate.add_argument("--name", dest="name_flag")
    migrate.add_argument("--to-host", metavar="HOST", help="destination host (default: the scheduler picks)")
    migrate.set_defaults(handler=_migrate)


def _row(vm: dict[str, Any]) -> tuple[str, ...]:
    p = vm["properties"]
    view = p["instanceView"]
    return (
        vm["name"], p["hardwareProfile"]["vmSize"], p["provisioningState"], view["powerState"], str(view["host"]),
        p["securityProfile"]["confidentialLiveMigration"], "yes" if view["liveMigration"]["eligible"] else "no",
    )  # fmt: skip


_HEADER = ("name", "size", "provisioning", "power", "host", "live migration", "eligible")


def create(args: argparse.Namespace) -> int:
    if args.memory or args.vcpus or args.backend or args.migration_policy or args.key_name:
        raise UsageError("--memory, --vcpus, --backend, --migration-policy and --key-name are for --host URL only")
    if not args.size:
        raise UsageError("--size is required with --controller (e.g. Standard_DC2as_v5)")
    name = _name(args)
    body: dict[str, Any] = {
        "properties": {
            "hardwareProfile": {"vmSize": args.size},
            "securityProfile": {
                "securityType": "ConfidentialVM",
                "confidentialLiveMigration": args.confidential_live_migration or "Disabled",
            },
            "storageProfile": {"imageReference": {"id": args.image}},
            "osProfile": {"cmdline": args.cmdline},
        }
    }
    if args.host:
        body["properties"]["placement"] = {"host": args.host}
    if args.location:
        body["location"] = args.location
    _, operation = call_with_operation(args, "PUT", _vm_path(args, name), body)
    if operation:
        wait_operation(args, operation)
    vm = call(args, "GET", _vm_path(args, name))
    emit(args, vm, [_HEADER, _row(vm)])
    return 0


def _update(args: argparse.Namespace) -> int:
    body = {"properties": {"securityProfile": {"confidentialLiveMigration": args.confidential_live_migration}}}
    vm = call(args, "PATCH", _vm_path(args, _name(args)), body)
    emit(args, vm, [_HEADER, _row(vm)])
    return 0


def show(args: argparse.Namespace) -> int:
    vm = call(args, "GET", _vm_path(args, _name(args)))
    emit(args, vm, None)
    return 0


def listing(args: argparse.Namespace) -> int:
    vms = call(args, "GET", _vm_path(args))["value"]
    emit(args, {"value": vms}, [_HEADER, *(_row(vm) for vm in vms)])
    return 0


def delete(args: argparse.Namespace) -> int:
    name = _name(args)
    _, operation = call_with_operation(args, "DELETE", _vm_path(args, name))
    if operation:
        wait_operation(args, operation)
    emit(args, {"deleted": name}, [("deleted",), (name,)])
    return 0


def _migrate(args: argparse.Namespace) -> int:
    name = _name(args)
    body = {"targetHost": args.to_host} if args.to_host else {}
    started, operation = call_with_operation(args, "POST", _vm_path(args, name) + "/migrate", body)
    op = wait_operation(args, operation) if operation else started
    vm = call(args, "GET", _vm_path(args, name))
    emit(args, {"operation": op, "vm": vm}, [_HEADER, _row(vm)])
    return 0
