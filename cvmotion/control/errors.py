"""control layer: the controller's error classes and how each maps to an HTTP status and ARM error code.

```
UsageError (cvmotion.errors)
├── InvalidRequest              400 InvalidRequestContent: malformed body, unknown field, bad name
├── RequestDisallowedByPolicy   403 a deny policy assignment matched; names the assignment
├── Unauthorized                401 AuthenticationFailed: no token or an unknown one
└── Forbidden                   403 AuthorizationFailed: the token's role or scope does not allow the request
CvmError
└── HostUnreachable             a host API call failed at the transport (the worker retries with backoff)
    └── HostBusy                the host refused for now (the VM is still settling a previous move)
```
"""

from __future__ import annotations

from cvmotion.errors import CvmError, UsageError

__all__ = ["Forbidden", "HostBusy", "HostUnreachable", "InvalidRequest", "RequestDisallowedByPolicy", "Unauthorized"]


class InvalidRequest(UsageError):
    """The request body or a name breaks the resource schema."""


class RequestDisallowedByPolicy(UsageError):
    """A policy assignment with effect ``deny`` matched the request."""

    def __init__(self, message: str, assignment: str, definition: str) -> None:
        super().__init__(message)
        self.assignment = assignment
        self.definition = definition


class Unauthorized(UsageError):
    """No bearer token, or one the controller does not know."""


class Forbidden(UsageError):
    """The token is valid but its role or scope does not cover the request."""


class HostUnreachable(CvmError):
    """A host's API did not answer (connection refused, timeout): transient, retried."""


class HostBusy(HostUnreachable):
    """The host answered 409 to a request that will succeed once the VM settles: retried like a transient."""
