"""cli layer: ``cvmotion policy definition create|list`` and ``policy assignment create|list|delete``.

Azure CLI's shapes: ``--rules`` is the ``policyRule`` (``{"if": ..., "then": ...}``) as JSON or @FILE,
``--params`` the parameter declarations (definitions) or values (assignments).  ``--resource-group RG``
is short for ``--scope /subscriptions/SUB/resourceGroups/RG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cvmotion.cli._fleet import add_controller_args, call, emit, subscription
from cvmotion.errors import UsageError

__all__ = ["register"]

_AUTH = "/providers/Microsoft.Authorization"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="organisation policy on the fleet controller (Azure Policy shape)")
    kinds = policy.add_subparsers(dest="kind", metavar="KIND")

    definition = kinds.add_parser("definition", help="policy definitions")
    dverbs = definition.add_subparsers(dest="verb", metavar="VERB")
    dcreate = dverbs.add_parser("create", help="create or replace a custom definition")
    add_controller_args(dcreate, resource_group=False)
    dcreate.add_argument("--name", required=True)
    dcreate.add_argument("--rules", required=True, help="policyRule JSON, or @FILE")
    dcreate.add_argument("--params", help="parameter declarations JSON, or @FILE")
    dcreate.add_argument("--display-name", default="")
    dcreate.add_argument("--description", default="")
    dcreate.set_defaults(handler=_definition_create)
    dlist = dverbs.add_parser("list", help="built-in and custom definitions")
    add_controller_args(dlist, resource_group=False)
    dlist.set_defaults(handler=_definition_list)

    assignment = kinds.add_parser("assignment", help="policy assignments at a scope")
    averbs = assignment.add_subparsers(dest="verb", metavar="VERB")
    acreate = averbs.add_parser("create", help="assign a definition at a scope")
    _scope_args(acreate)
    acreate.add_argument("--name", help="assignment name (default: the policy's)")
    acreate.add_argument("--policy", required=True, help="definition name, e.g. deny-confidential-live-migration")
    acreate.add_argument("--params", help='parameter values JSON or @FILE, e.g. {"allowedHostPools": ["pool-a"]}')
    acreate.set_defaults(handler=_assignment_create)
    alist = averbs.add_parser("list", help="assignments at or below a scope")
    _scope_args(alist, required=False)
    alist.set_defaults(handler=_assignment_list)
    adelete = averbs.add_parser("delete", help="remove an assignment")
    _scope_args(adelete)
    adelete.add_argument("--name", required=True)
    adelete.set_defaults(handler=_assignment_delete)
    for parser in (policy, definition, assignment):
        parser.set_defaults(handler=lambda _a, p=parser: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _scope_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    add_controller_args(parser, resource_group=False)
    parser.add_argument("--scope", help="/subscriptions/SUB or /subscriptions/SUB/resourceGroups/RG")
    parser.add_argument("--resource-group", "-g", metavar="RG", help="short for the resource group's scope")
    parser.set_defaults(scope_required=required)


def _scope(args: argparse.Namespace) -> str:
    if args.scope and args.resource_group:
        raise UsageError("give --scope or --resource-group, not both")
    if args.resource_group:
        return f"/subscriptions/{subscription(args)}/resourceGroups/{args.resource_group}"
    if args.scope:
        return str(args.scope).rstrip("/")
    return f"/subscriptions/{subscription(args)}"


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{what}: not valid JSON ({exc})") from None


def _definition_create(args: argparse.Namespace) -> int:
    props: dict[str, Any] = {
        "displayName": args.display_name or args.name,
        "description": args.description,
        "policyType": "Custom",
        "mode": "Indexed",
        "policyRule": _json_arg(args.rules, "--rules"),
    }
    params = _json_arg(args.params, "--params")
    if params is not None:
        props["parameters"] = params
    out = call(args, "PUT", f"{_AUTH}/policyDefinitions/{args.name}", {"properties": props})
    emit(args, out, None)
    return 0


def _definition_list(args: argparse.Namespace) -> int:
    out = call(args, "GET", f"{_AUTH}/policyDefinitions")
    rows = [("name", "type", "display name")]
    rows += [(d["name"], d["properties"]["policyType"], d["properties"].get("displayName", "")) for d in out["value"]]
    emit(args, out, rows)
    return 0


def _assignment_create(args: argparse.Namespace) -> int:
    scope = _scope(args)
    params = _json_arg(args.params, "--params") or {}
    if not isinstance(params, dict):
        raise UsageError("--params must be a JSON object of parameter values")
    body = {
        "properties": {
            "policyDefinitionId": f"{_AUTH}/policyDefinitions/{args.policy}",
            "parameters": {
                k: v if isinstance(v, dict) and set(v) == {"value"} else {"value": v} for k, v in params.items()
            },
        }
    }
    out = call(args, "PUT", f"{scope}{_AUTH}/policyAssignments/{args.name or args.policy}", body)
    emit(args, out, None)
    return 0


def _assignment_list(args: argparse.Namespace) -> int:
    out = call(args, "GET", f"{_scope(args)}{_AUTH}/policyAssignments")
    rows = [("name", "scope", "policy")]
    rows += [
        (a["name"], a["properties"]["scope"], a["properties"]["policyDefinitionId"].rsplit("/", 1)[-1])
        for a in out["value"]
    ]
    emit(args, out, rows)
    return 0


def _assignment_delete(args: argparse.Namespace) -> int:
    out = call(args, "DELETE", f"{_scope(args)}{_AUTH}/policyAssignments/{args.name}")
    emit(args, out, None)
    return 0
