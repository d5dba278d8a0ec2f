"""cli layer: ``cvmotion deployment create`` — deploy an ARM template (its supported subset) to a resource group."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cvmotion.cli._fleet import add_controller_args, call, emit, subscription, wait_operation
from cvmotion.errors import UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deployment = subparsers.add_parser("deployment", help="ARM-template deployments through the fleet controller")
    verbs = deployment.add_subparsers(dest="verb", metavar="VERB")
    create = verbs.add_parser("create", help="deploy a template; returns when every VM in it runs")
    add_controller_args(create)
    create.add_argument("--template-file", required=True, type=Path)
    create.add_argument("--parameters", nargs="*", default=[], metavar="K=V", help="template parameters (or @FILE)")
    create.add_argument("--name", help="deployment name (default: the template file's stem)")
    create.set_defaults(handler=_create)
    deployment.set_defaults(handler=lambda _a: _usage(deployment))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _parameters(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if item.startswith("@"):
            doc = json.loads(Path(item[1:]).read_text())
            out.update(doc.get("parameters", doc))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--parameters {item!r}: expected KEY=VALUE or @FILE")
        out[key] = {"value": value}
    return out


def _create(args: argparse.Namespace) -> int:
    try:
        template = json.loads(args.template_file.read_text())
    except ValueError as exc:
        raise UsageError(f"{args.template_file}: not valid JSON ({exc})") from None
    name = args.name or args.template_file.stem
    base = f"/subscriptions/{subscription(args)}/resourceGroups/{args.resource_group}"
    body = {"properties": {"template": template, "parameters": _parameters(args.parameters), "mode": "Incremental"}}
    out = call(args, "PUT", f"{base}/providers/Microsoft.Resources/deployments/{name}", body)
    for operation in out["properties"]["operations"].values():
        if operation:
            wait_operation(args, operation)
    out["properties"]["provisioningState"] = "Succeeded"
    vms = list(out["properties"]["operations"])
    emit(args, out, [("deployment", "virtual machines"), (name, ", ".join(vms))])
    return 0
