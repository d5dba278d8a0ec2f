"""cli layer: ``cvmotion migrate NAME --from HOST_URL --to HOST_URL`` — live-migrate a confidential VM.

Starts the migration on the source host, shows live progress (round, remaining, bandwidth, expected
downtime) and ends with QEMU's ``query-migrate`` names; ``--json`` prints exactly that object.
Exit 0 when the VM runs on the destination, 5 when a migration policy refused it (nothing weaker is
tried), 3 for any other failure (the VM then runs on the source, or stays stopped, never both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cvmotion.cli._http import api
from cvmotion.errors import MigrationError, PolicyViolation, UsageError
from cvmotion.migration.options import OPTIONS, MigrationOptions

__all__ = ["add_option_flags", "options_from_args", "register"]

_POLL = 0.1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mig = subparsers.add_parser(
        "migrate",
        help="live-migrate a confidential VM between host daemons",
        description="Live-migrate NAME from one host daemon to another over an attested, encrypted stream.",
    )
    mig.add_argument("name")
    mig.add_argument("--from", dest="source", required=True, metavar="HOST_URL")
    mig.add_argument("--to", dest="destination", required=True, metavar="HOST_URL")
    add_option_flags(mig)
    mig.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds")
    mig.add_argument("--json", action="store_true", help="print the final query-migrate object only")
    mig.set_defaults(handler=_migrate)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per migration option (``migration.options.OPTIONS``: its help, type and bounds); a flag not given
    is not sent, so the host applies the schema's default."""
    group = parser.add_argument_group("migration options")
    for spec in OPTIONS:
        dest = f"option_{spec.name}"
        default = f"default {spec.default}"
        if spec.kind is bool:
            group.add_argument(spec.cli_flag, dest=dest, action=argparse.BooleanOptionalAction, help=spec.help)
            continue
        bounds = f"{spec.bounds()}, {default}"
        number = int if spec.kind is int else float
        group.add_argument(spec.cli_flag, dest=dest, type=number, metavar="N", help=f"{spec.help} ({bounds})")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by their host API names (checked here as the host checks them)."""
    given = {spec.api_name: getattr(args, f"option_{spec.name}") for spec in OPTIONS}
    body = {key: value for key, value in given.items() if value is not None}
    MigrationOptions.from_api(body)  # a bad value is refused before anything is asked of a host
    return body


def _url(text: str, flag: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise UsageError(f"{flag} {text!r}: expected a URL such as http://127.0.0.1:8701")
    return text.rstrip("/")


def start(source: str, name: str, destination: str, **options: Any) -> str:
    body = {"destination": destination, **options}
    return str(api("POST", f"{source}/v1/vms/{name}/migrate", body, timeout=180)["migration"])


def wait(source: str, mig_id: str, timeout: float, progress: Any = None) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration ends (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        info = api("GET", f"{source}/v1/migrations/{mig_id}")
        if progress is not None:
            progress(info)
        if info["status"] in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise MigrationError(f"migration {mig_id} still {info['status']} after {timeout:.0f} s")
        time.sleep(_POLL)


def _migrate(args: argparse.Namespace) -> int:
    source = _url(args.source, "--from")
    destination = _url(args.destination, "--to")
    mig_id = start(source, args.name, destination, **options_from_args(args))
    info = wait(source, mig_id, args.timeout) if args.json else _with_progress(source, mig_id, args.timeout)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _summary(info)
    if info["status"] == "completed":
        return 0
    if info.get("x-cvmotion", {}).get("error-kind") == "PolicyViolation":
        if not args.json:
            raise PolicyViolation([str(info.get("error-desc", "policy violation"))])
        return 5
    return 3


def _with_progress(source: str, mig_id: str, timeout: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]{task.fields[status]:<8}"),
        BarColumn(),
        TextColumn("round {task.fields[round]}"),
        TextColumn("remaining {task.fields[remaining]}"),
        TextColumn("{task.fields[mbps]} Mbit/s"),
        TextColumn("expected downtime {task.fields[expected]} ms"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False, console=None) as progress:
        task = progress.add_task("migrate", total=1.0, status="setup", round=0, remaining="-", mbps=0, expected="-")

        def update(info: dict[str, Any]) -> None:
            ram = info.get("ram", {})
            total = max(int(ram.get("total", 0)), 1)
            remaining = int(ram.get("remaining", 0))
            rounds = info.get("x-cvmotion", {}).get("rounds", [])
            done = 1.0 if info["status"] == "completed" else min(0.99, 1 - remaining / total) if rounds else 0.0
            progress.update(
                task,
                completed=done,
                status=info["status"],
                round=len(rounds),
                remaining=f"{remaining >> 20} MiB" if remaining >= 1 << 20 else f"{remaining >> 10} KiB",
                mbps=round(float(ram.get("mbps", 0))),
                expected=info.get("expected-downtime", "-"),
            )

        return wait(source, mig_id, timeout, update)


def _summary(info: dict[str, Any]) -> None:
    x = info.get("x-cvmotion", {})
    ram = info.get("ram", {})
    if info["status"] == "completed":
        print(
            f"completed: {x.get('vm')} now runs on {x.get('destination')}; total {info['total-time']} ms, "
            f"downtime {info.get('downtime')} ms, {len(x.get('rounds', []))} rounds, "
            f"{ram.get('transferred', 0) >> 20} MiB sent ({ram.get('normal')} pages, {ram.get('duplicate')} zero)"
        )
    else:
        print(f"{info['status']}: {info.get('error-desc', '')}; {x.get('outcome', '')}", file=sys.stderr)
