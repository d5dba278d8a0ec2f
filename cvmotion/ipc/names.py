"""ipc: the one rule for the names of VMs and hosts, wherever one is accepted (API bodies, paths, CLI flags).

A name becomes a directory (``vms/<name>/``), a URL path segment and a resource id, so it is restricted to
what is safe in all three: 1-63 of ``a-z``, ``0-9`` and ``-``, starting with a letter or digit (an RFC 1123
DNS label, lower case).
"""

from __future__ import annotations

import re

from cvmotion.errors import UsageError

__all__ = ["NAME_PATTERN", "NAME_RE", "check_name"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)


def check_name(what: str, value: object) -> str:
    """``value`` if it is a valid name, else a ``UsageError`` that says the rule."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise UsageError(f"{what} {value!r}: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit")
    return value
