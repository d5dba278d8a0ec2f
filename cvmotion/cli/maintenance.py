"""cli layer: ``cvmotion maintenance create|list|show|delete`` — scheduled maintenance windows.

``maintenance create --hosts h1,h2 --start 2026-12-05T22:00Z|now|+10m --duration PT2H --reason SecurityUpdate``
schedules a window (Azure's maintenance configuration, scope Host): when it opens, the controller drains
its hosts one after another, in the order given.  ``--name`` defaults to one derived from the start.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any
from urllib.parse import quote

from cvmotion.cli._fleet import add_controller_args, call, emit
from cvmotion.errors import UsageError

__all__ = ["register"]

_WINDOWS = "/providers/Cvmotion.Fabric/maintenanceWindows"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("maintenance", help="scheduled maintenance windows (their hosts are drained)")
    verbs = group.add_subparsers(dest="verb", metavar="VERB")
    create = verbs.add_parser("create", help="schedule a window: its hosts are drained one by one once it opens")
    create.add_argument("--name", help="the window's name (default: maint-<start>)")
    create.add_argument("--hosts", required=True, help="comma-separated host names, drained in this order")
    create.add_argument("--start", required=True, help="ISO 8601 time (UTC unless an offset is given), now, +10m")
    create.add_argument("--duration", required=True, help="PT2H, 2h30m, 90m or HH:MM")
    create.add_argument("--reason", required=True, choices=("SecurityUpdate", "HardwareRefresh"))
    create.add_argument("--max-parallel", type=int, default=None, metavar="N", help="live moves off a host at once")
    create.add_argument("--notice", type=float, default=None, metavar="S", help="Scheduled Events' NotBefore, s")
    add_controller_args(create, resource_group=False)
    create.set_defaults(handler=_create)
    listing = verbs.add_parser("list", help="the maintenance windows")
    add_controller_args(listing, resource_group=False)
    listing.set_defaults(handler=_list)
    for verb, handler, text in (("show", _show, "one window"), ("delete", _delete, "delete a window")):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("name", metavar="NAME")
        add_controller_args(parser, resource_group=False)
        parser.set_defaults(handler=handler)
    group.set_defaults(handler=lambda _a: _usage(group))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1


def _rows(windows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("name", "status", "start", "end", "reason", "hosts", "drains")]
    for w in windows:
        rows.append(
            (w["name"], w["status"], w["start"], w["end"], w["reason"], ",".join(w["hosts"]), str(len(w["drains"])))
        )
    return rows


def _create(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise UsageError("--hosts: name at least one host")
    name = args.name or f"maint-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if not _NAME.match(name):
        raise UsageError(f"--name {name!r}: lower-case letters, digits and '-', at most 63")
    body: dict[str, Any] = {"hosts": hosts, "start": args.start, "duration": args.duration, "reason": args.reason}
    if args.max_parallel is not None:
        body["maxParallel"] = args.max_parallel
    if args.notice is not None:
        body["noticeSeconds"] = args.notice
    window = call(args, "PUT", f"{_WINDOWS}/{quote(name, safe='')}", body)
    emit(args, window, _rows([window]))
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = call(args, "GET", _WINDOWS)
    emit(args, answer, _rows(answer["value"]))
    return 0


def _show(args: argparse.Namespace) -> int:
    window = call(args, "GET", f"{_WINDOWS}/{quote(args.name, safe='')}")
    emit(args, window, _rows([window]))
    return 0


def _delete(args: argparse.Namespace) -> int:
    window = call(args, "DELETE", f"{_WINDOWS}/{quote(args.name, safe='')}")
    emit(args, window, _rows([window]))
    return 0
