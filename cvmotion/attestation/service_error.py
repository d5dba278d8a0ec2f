"""attestation layer: the error a service (attestation, key release) answers with, and its clients raise.

A module of its own so that a client (the paravisor in every VM process) does not import the request models
(pydantic: ~0.2 s of start-up).
"""

from __future__ import annotations

from typing import Any

from cvmotion.errors import CvmError
from cvmotion.ipc.envelope import error_body

__all__ = ["ServiceError"]


class ServiceError(CvmError):
    """A request the attestation or key-release service refuses: HTTP ``status``, a stable ``kind``, a message.

    Rendered as ``{"error": {"kind", "message"[, "violations"]}}``.
    """

    def __init__(self, status: int, kind: str, message: str, *, violations: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.violations = list(violations) if violations is not None else None

    def to_json(self) -> dict[str, Any]:
        if self.violations is not None:
            return error_body(self.kind, str(self), violations=self.violations)
        return error_body(self.kind, str(self))
