"""ipc: pydantic's validation errors as one line a person reads — ``loc.path: message; ...``.

Every service and file loader that validates with pydantic reports refusals this way, so a bad field reads the
same in an HTTP error envelope, a CLI message and a policy file's error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["describe_problems"]


def describe_problems(errors: Iterable[Mapping[str, Any]], *, root: str = "") -> str:
    """Each error as ``dotted.location: message``, joined by ``; ``; an error at the top level is named ``root``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in errors)
