"""ipc: the error envelope of every cvmotion HTTP service — built in one place, parsed in one place.

A refusal's body is ``{"error": {"kind", "message"[, "violations", ...]}}``: ``kind`` is the ``CvmError`` class
(or the router's ``not_found``, ``invalid_request``...), ``message`` names the problem.  ``error_body`` makes it
(``ipc.openapi.ErrorEnvelope`` is its schema); ``parse_error`` reads one from any answer, whatever it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ErrorInfo", "error_body", "parse_error"]


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of a refusal; ``extra`` adds fields to the error (``violations``, a service's own)."""
    return {"error": {"kind": kind, "message": message, **extra}}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What a refusal said: its kind, its message, the policy violations it lists."""

    status: int
    kind: str
    message: str
    violations: tuple[str, ...] = ()


def parse_error(status: int, data: object) -> ErrorInfo:
    """The refusal in ``data`` (a decoded JSON answer of status ``status``); never raises: an answer that is no
    envelope reads as ``http_error`` with the bare status as its message."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ErrorInfo(status, "http_error", f"HTTP {status}")
    violations = error.get("violations")
    return ErrorInfo(
        status,
        str(error.get("kind") or "http_error"),
        str(error.get("message") or f"HTTP {status}"),
        tuple(str(v) for v in violations) if isinstance(violations, list) else (),
    )
