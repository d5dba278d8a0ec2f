"""cli layer: ``cvmotion webhook create|list|show|delete|redeliver`` — the fleet's events delivered to a URL.

``create`` subscribes a URL to event types (``--types cvmotion.migration.* ...``; none: every type) and prints
the signing secret once (``--secret whsec_...`` to choose it).  The webhook receives the events of the
token's subscription (``--subscription SUB`` to name one the token covers; the local Owner token covers
all).  ``show --deliveries [--state DeadLettered]`` lists what was delivered or given up on;
``redeliver`` tries a dead-lettered delivery again.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cvmotion.cli._fleet import add_controller_args, call, emit

__all__ = ["register"]

_HOOKS = "/v1/webhooks"
_STATES = ("Pending", "Succeeded", "DeadLettered")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhook = subparsers.add_parser("webhook", help="deliver the fleet's events (CloudEvents) to a URL, signed")
    verbs = webhook.add_subparsers(dest="verb", metavar="VERB")

    create = verbs.add_parser("create", help="subscribe a URL to events")
    add_controller_args(create, resource_group=False)
    create.add_argument("--url", required=True, help="the receiver, http(s)://HOST[:PORT]/PATH")
    create.add_argument("--types", nargs="+", default=[], metavar="TYPE", help="types or prefixes ending in .*")
    create.add_argument("--subject-begins-with", default="", metavar="PREFIX", help="only subjects with this prefix")
    create.add_argument("--secret", help="whsec_ + base64 of 24-64 bytes (default: generated, printed once)")
    create.add_argument("--max-attempts", type=int, help="delivery attempts before dead-letter (default 15)")
    create.set_defaults(handler=_create)

    listing = verbs.add_parser("list", help="the webhooks, with their deliveries by state")
    add_controller_args(listing, resource_group=False)
    listing.set_defaults(handler=_list)

    show = verbs.add_parser("show", help="one webhook; --deliveries: its deliveries")
    add_controller_args(show, resource_group=False)
    show.add_argument("--id", required=True, dest="hook_id")
    show.add_argument("--deliveries", action="store_true", help="list its deliveries, newest first")
    show.add_argument("--state", choices=_STATES, help="only deliveries in this state")
    show.set_defaults(handler=_show)

    delete = verbs.add_parser("delete", help="stop delivering to a webhook")
    add_controller_args(delete, resource_group=False)
    delete.add_argument("--id", required=True, dest="hook_id")
    delete.set_defaults(handler=_delete)

    again = verbs.add_parser("redeliver", help="try a dead-lettered delivery again")
    add_controller_args(again, resource_group=False)
    again.add_argument("--id", required=True, dest="hook_id")
    again.add_argument("--delivery", required=True, type=int)
    again.set_defaults(handler=_redeliver)
    webhook.set_defaults(handler=lambda _a: _usage(webhook))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _row(hook: dict[str, Any]) -> tuple[str, ...]:
    counts = hook.get("deliveries") or {}
    return (
        hook["id"],
        hook["url"],
        ", ".join(hook["types"]) or "(all)",
        hook["subscription"],
        " / ".join(str(counts.get(s, "-")) for s in _STATES),
    )


_HEADER = ("id", "url", "types", "subscription", "pending / succeeded / dead")


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"url": args.url, "types": [t for v in args.types for t in v.split(",") if t]}
    if args.subject_begins_with:
        body["subjectBeginsWith"] = args.subject_begins_with
    if args.secret:
        body["secret"] = args.secret
    if args.max_attempts is not None:
        body["maxDeliveryAttempts"] = args.max_attempts
    if args.subscription:
        body["subscription"] = args.subscription
    hook = call(args, "POST", _HOOKS, body)
    emit(args, hook, [_HEADER, _row(hook)])
    if not args.json:
        print(f"secret: {hook['secret']}  (shown once: the receiver verifies signatures with it)")
    return 0


def _list(args: argparse.Namespace) -> int:
    out = call(args, "GET", _HOOKS)
    emit(args, out, [_HEADER, *(_row(h) for h in out["value"])])
    return 0


def _show(args: argparse.Namespace) -> int:
    if not args.deliveries:
        hook = call(args, "GET", f"{_HOOKS}/{args.hook_id}")
        emit(args, hook, [_HEADER, _row(hook)])
        return 0
    query = f"?state={args.state}" if args.state else ""
    out = call(args, "GET", f"{_HOOKS}/{args.hook_id}/deliveries{query}")
    rows = [("delivery", "event", "state", "attempts", "last status", "last error")]
    rows += [
        (str(d["id"]), d["eventId"], d["state"], str(d["attempts"]), str(d["lastStatus"]), d["lastError"])
        for d in out["value"]
    ]
    emit(args, out, rows)
    return 0


def _delete(args: argparse.Namespace) -> int:
    out = call(args, "DELETE", f"{_HOOKS}/{args.hook_id}")
    emit(args, out, [("deleted",), (out["deleted"],)])
    return 0


def _redeliver(args: argparse.Namespace) -> int:
    d = call(args, "POST", f"{_HOOKS}/{args.hook_id}/deliveries/{args.delivery}/redeliver")
    emit(args, d, [("delivery", "state", "attempts"), (str(d["id"]), d["state"], str(d["attempts"]))])
    return 0
