"""cli layer: one helper to call a cvmotion HTTP API and turn its errors into the CLI's error classes."""

from __future__ import annotations

from typing import Any

import httpx

from cvmotion.errors import Conflict, CvmError, MigrationError, NotFound, PolicyViolation, UsageError
from cvmotion.ipc.envelope import parse_error
from cvmotion.ipc.http_client import default_ssl_context

__all__ = ["api"]


def api(method: str, url: str, body: dict[str, Any] | None = None, *, timeout: float = 120.0) -> dict[str, Any]:
    """``method url`` with a JSON body; returns the JSON object or raises a ``CvmError`` naming the problem."""
    try:
        response = httpx.request(method, url, json=body, timeout=timeout, verify=default_ssl_context())
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {url}: {exc}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code < 300 and isinstance(data, dict):
        return data
    error = parse_error(response.status_code, data)
    message = error.message if error.kind != "http_error" else f"{error.message} from {url}"
    if response.status_code == 404:
        raise NotFound(message)
    if response.status_code == 409:
        raise Conflict(message)
    if response.status_code == 422 and error.violations:
        raise PolicyViolation(list(error.violations))
    if response.status_code < 500:
        raise UsageError(message)
    raise MigrationError(message) if error.kind.endswith("Error") else CvmError(message)
