"""cli layer: talking to the fleet controller — its address, the bearer token, polling operations, output.

The address comes from ``--controller`` or ``$CVMOTION_CONTROLLER``; the token from ``--token`` or
``$CVMOTION_TOKEN``, else (on the controller's own machine) the Owner token the controller wrote into its
data directory, found through ``$CVMOTION_HOME/controllers.json`` (URL -> data directory) — the CLI says
so on stderr.  ``--resource-group RG`` means ``/subscriptions/SUB/resourceGroups/RG`` with SUB from
``--subscription``, ``$CVMOTION_SUBSCRIPTION`` or ``default``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cvmotion.cli.paths import default_home
from cvmotion.errors import Conflict, CvmError, NotFound, PolicyViolation, UsageError

__all__ = [
    "add_controller_args",
    "call",
    "call_with_operation",
    "controller_url",
    "emit",
    "register_controller_dir",
    "subscription",
    "wait_operation",
]

_REGISTRY = "controllers.json"
_SAID_OWNER: list[Path] = []  # say once per process which token file a call uses


def add_controller_args(parser: argparse.ArgumentParser, *, resource_group: bool = True) -> None:
    parser.add_argument("--controller", metavar="URL", help="controller API (default $CVMOTION_CONTROLLER)")
    parser.add_argument("--token", help="bearer token (default $CVMOTION_TOKEN, else the local Owner token)")
    parser.add_argument("--subscription", help="subscription (default $CVMOTION_SUBSCRIPTION, else 'default')")
    if resource_group:
        parser.add_argument("--resource-group", "-g", required=True, metavar="RG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def controller_url(args: argparse.Namespace) -> str:
    url = args.controller or os.environ.get("CVMOTION_CONTROLLER")
    if not url:
        raise UsageError("give --controller URL or set CVMOTION_CONTROLLER")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--controller {url!r}: expected a URL such as http://127.0.0.1:8790")
    return str(url).rstrip("/")


def subscription(args: argparse.Namespace) -> str:
    return str(args.subscription or os.environ.get("CVMOTION_SUBSCRIPTION") or "default")


def register_controller_dir(url: str, data_dir: Path) -> None:
    """Remember which data directory serves ``url``, so local CLI calls can find its Owner token."""
    from cvmotion.files import write_json

    path = default_home() / _REGISTRY
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
    known[url] = str(data_dir.resolve())
    write_json(path, known)


def _token(args: argparse.Namespace, url: str) -> str:
    token = getattr(args, "token", None) or os.environ.get("CVMOTION_TOKEN")
    if token:
        return str(token)
    try:
        data_dir = json.loads((default_home() / _REGISTRY).read_text()).get(url)
    except (OSError, ValueError):
        data_dir = None
    if data_dir:
        path = Path(data_dir) / "owner.token"
        try:
            token = path.read_text().strip()
        except OSError:
            token = None
        if token:
            if not _SAID_OWNER:
                print(f"cvmotion: using the controller's local Owner token ({path})", file=sys.stderr)
                _SAID_OWNER.append(path)
            return str(token)
    raise UsageError("no token: give --token, set CVMOTION_TOKEN, or run 'cvmotion controller token create'")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
    """``method path`` on the controller; the JSON answer, or a ``CvmError`` carrying its message."""
    return call_with_operation(args, method, path, body, timeout=timeout)[0]


def call_with_operation(
    args: argparse.Namespace, method: str, path: str, body: Any = None, *, timeout: float = 60.0
) -> tuple[Any, str | None]:
    """As ``call``, plus the ``Azure-AsyncOperation`` URL of a long-running request (else ``None``)."""
    url = controller_url(args)
    headers = {"Authorization": f"Bearer {_token(args, url)}"}
    try:
        response = httpx.request(method, url + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the controller at {url}: {exc}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code < 300:
        return data, response.headers.get("Azure-AsyncOperation")
    error = data.get("error", {}) if isinstance(data, dict) else {}
    code = str(error.get("code", ""))
    message = f"{code}: {error.get('message') or response.text[:300]}" if code else response.text[:300]
    if response.status_code == 404:
        raise NotFound(message)
    if response.status_code == 409:
        raise Conflict(message)
    if code == "RequestDisallowedByPolicy":
        raise PolicyViolation([message])
    if response.status_code < 500:
        raise UsageError(message)
    raise CvmError(message)


def wait_operation(args: argparse.Namespace, operation_url: str, timeout: float = 600.0) -> dict[str, Any]:
    """Poll an ``Azure-AsyncOperation`` URL until it settles (bounded); a failed one raises."""
    base = controller_url(args)
    path = operation_url.removeprefix(base)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        op: dict[str, Any] = call(args, "GET", path)
        if op["status"] == "Succeeded":
            return op
        if op["status"] == "Failed":
            error = op.get("error", {})
            raise CvmError(f"operation {op['name']} failed: {error.get('code')}: {error.get('message')}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise CvmError(f"operation {operation_url} did not settle within {timeout:.0f} s")


def emit(args: argparse.Namespace, value: Any, table: Sequence[tuple[str, ...]] | None = None) -> None:
    """``--json``: one object on stdout; otherwise a table (first row is the header)."""
    if getattr(args, "json", False) or table is None:
        print(json.dumps(value, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    out = Table(*table[0])
    for row in table[1:]:
        out.add_row(*row)
    Console().print(out)
