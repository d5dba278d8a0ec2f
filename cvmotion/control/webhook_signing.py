"""control layer: webhook signatures as Standard Webhooks defines them — ``sign`` (sender), ``verify`` (receiver).

A delivery carries three headers (https://www.standardwebhooks.com, "Signature scheme")::

    webhook-id:        the CloudEvent's id (the same on every retry: a receiver's idempotency key)
    webhook-timestamp: seconds since the Unix epoch, when this attempt was signed
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>

The secret is ``whsec_`` + base64 of 24 to 64 random bytes; the key is those bytes.  A receiver recomputes
the HMAC over the exact body bytes it received, compares in constant time against each space-separated
``v1,`` signature (several while a secret rotates), and refuses a timestamp more than ``tolerance`` seconds
from its clock (a captured delivery cannot be replayed later).  It imports nothing of the controller: a
receiver can copy this module alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping

__all__ = [
    "SECRET_PATTERN",
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "generate_secret",
    "parse_secret",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
MIN_KEY, MAX_KEY = 24, 64
# Exactly the base64 texts of 24 to 64 bytes: 8 to 20 groups of 4 (24..60 bytes), then 0 to 4 more bytes.
_B64 = "[A-Za-z0-9+/]"
_TAIL = rf"(?:{_B64}{{4}}(?:{_B64}{{2}}==)?|{_B64}{{2}}==|{_B64}{{3}}=)?"
SECRET_PATTERN = rf"^{SECRET_PREFIX}(?:{_B64}{{4}}){{8,20}}{_TAIL}$"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(ValueError):
    """A delivery whose headers are missing, stale, or whose signature does not match (one opaque reason)."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ``ValueError`` says what is wrong with it."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret is '{SECRET_PREFIX}' followed by base64 (omit it to get one generated)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the webhook secret after '{SECRET_PREFIX}' is not valid base64") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ValueError(f"the webhook secret must hold {MIN_KEY} to {MAX_KEY} bytes, not {len(key)}")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(parse_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float = DEFAULT_TOLERANCE_S
) -> str:
    """Check a delivery as a receiver; its ``webhook-id`` (to deduplicate retries) if it is genuine.

    Args:
        secret: the ``whsec_`` secret the webhook was created with.
        headers: the request's headers (any mapping; names are matched case-insensitively).
        body: the exact bytes received (not re-serialised JSON).
        now: the receiver's clock, seconds since the Unix epoch.
        tolerance: how far ``webhook-timestamp`` may be from ``now``.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is out of tolerance, or no signature matches.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lowered.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs(now - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures.split(" ") if s.startswith("v1,")):
        raise WebhookVerificationError("no webhook-signature matches")
    return msg_id
