"""control layer: bearer tokens and roles — who may do what, at which subscription.

Tokens are random (``cvm_`` + 32 bytes, URL-safe base64); the database keeps only their SHA-256, so a
stolen database copy grants nothing.  A role is granted at one subscription or at every one (``*``).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from cvmotion.control.db import Token
from cvmotion.control.errors import Forbidden, Unauthorized
from cvmotion.errors import UsageError

__all__ = ["ALL_SUBSCRIPTIONS", "Action", "Principal", "Role", "authenticate", "authorize", "issue_token"]

ALL_SUBSCRIPTIONS = "*"


class Role(enum.Enum):
    READER = "Reader"
    CONTRIBUTOR = "Contributor"
    OWNER = "Owner"
    POLICY_ADMINISTRATOR = "PolicyAdministrator"
    HOST = "Host"  # a host daemon: registers and heartbeats, nothing else


class Action(enum.Enum):
    READ = "read"
    WRITE_VM = "write-vm"
    MIGRATE = "migrate"  # an operator action
    WRITE_POLICY = "write-policy"
    REGISTER_HOST = "register-host"


_GRANTS: dict[Role, frozenset[Action]] = {
    Role.READER: frozenset({Action.READ}),
    Role.CONTRIBUTOR: frozenset({Action.READ, Action.WRITE_VM}),
    Role.OWNER: frozenset(Action),
    Role.POLICY_ADMINISTRATOR: frozenset({Action.READ, Action.WRITE_POLICY}),
    Role.HOST: frozenset({Action.REGISTER_HOST}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    subscription: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, role: Role, subscription: str = ALL_SUBSCRIPTIONS) -> str:
    """A new bearer token for ``role`` at ``subscription`` (the caller commits)."""
    if subscription != ALL_SUBSCRIPTIONS and not subscription.replace("-", "").isalnum():
        raise UsageError(f"subscription {subscription!r} is not a valid name")
    token = "cvm_" + secrets.token_urlsafe(32)
    session.add(Token(digest=_digest(token), role=role.value, subscription=subscription))
    return token


def authenticate(session: Session, header: str | None) -> Principal:
    """The principal of an ``Authorization: Bearer …`` header.

    Raises:
        Unauthorized: no header, not a bearer token, or a token the controller never issued.
    """
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("this request needs 'Authorization: Bearer TOKEN' (cvmotion controller token create)")
    row = session.get(Token, _digest(header.removeprefix("Bearer ").strip()))
    if row is None:
        raise Unauthorized("the bearer token is not known to this controller")
    return Principal(Role(row.role), row.subscription)


def authorize(principal: Principal, action: Action, subscription: str | None = None) -> None:
    """Raises ``Forbidden`` unless the principal's role grants ``action`` at ``subscription``."""
    if action not in _GRANTS[principal.role]:
        raise Forbidden(f"role {principal.role.value} may not {action.value}")
    if subscription is not None and principal.subscription not in (ALL_SUBSCRIPTIONS, subscription):
        raise Forbidden(f"the token is for subscription {principal.subscription!r}, not {subscription!r}")
