"""attestation layer: tenants of the attestation service — each a JSON document with its attestation policy.

```
DATA_DIR/tenants/<name>.json     {"policy": {...AttestationPolicy...}, "mode": "enforce"|"report",
                                  "audience": null|"...", "token_lifetime_s": 28800, "require_runtime_data": false}
```
A request names its tenant with ``?tenant=NAME`` (default ``default``); an unknown tenant is a 404.  The
``default`` tenant always exists: ``--policy FILE`` (a bare ``AttestationPolicy``) overrides its policy, and
without either it gets ``AttestationPolicy()`` (no constraint except: no debug guests).

``mode``: ``enforce`` (default) refuses evidence that breaks the policy (HTTP 403, every violation listed);
``report`` issues the token anyway without ``x-ms-compliance-status`` and with ``x-cvmotion-policy-violations``
(MAA's behaviour when a policy only annotates), so relying parties must check compliance themselves.

``x-ms-policy-hash`` is the base64url SHA-256 of the policy's canonical JSON (keys sorted, no whitespace),
so a relying party can pin the exact policy a token was issued under.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cvmotion.attestation.jwks import b64url_encode
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.errors import UsageError
from cvmotion.ipc.validation import describe_problems

__all__ = ["DEFAULT_TENANT", "TENANT_NAME", "Tenant", "TenantConfig", "load_tenants"]

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_TOKEN_LIFETIME_S = 24 * 3600
_MAX_FILE = 1 << 20


class TenantConfig(BaseModel):
    """One tenant's document."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: AttestationPolicy = AttestationPolicy.model_validate({})
    mode: Literal["enforce", "report"] = "enforce"
    audience: str | None = Field(default=None, min_length=1, max_length=256)
    token_lifetime_s: int = Field(default=8 * 3600, ge=60, le=MAX_TOKEN_LIFETIME_S)
    require_runtime_data: bool = False


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    config: TenantConfig
    policy_hash: str

    @classmethod
    def of(cls, name: str, config: TenantConfig) -> Tenant:
        canonical = json.dumps(config.policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return cls(name, config, b64url_encode(hashlib.sha256(canonical.encode()).digest()))


def _problems(exc: ValidationError) -> str:
    return describe_problems(exc.errors(), root="(root)")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise UsageError(f"{path}: larger than {_MAX_FILE} bytes")
    return data


def load_tenant(path: Path) -> TenantConfig:
    try:
        obj: Any = json.loads(_read(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"tenant {path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"tenant {path}: must be a JSON object")
    try:
        return TenantConfig.model_validate(obj)
    except ValidationError as exc:
        raise UsageError(f"tenant {path}: {_problems(exc)}") from None


def load_tenants(data_dir: Path | None, default_policy: AttestationPolicy | None = None) -> dict[str, Tenant]:
    """Every ``DATA_DIR/tenants/*.json`` plus the ``default`` tenant (``default_policy`` overrides its policy)."""
    tenants: dict[str, Tenant] = {}
    directory = data_dir / "tenants" if data_dir is not None else None
    if directory is not None and directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            name = path.stem
            if not TENANT_NAME.fullmatch(name):
                raise UsageError(f"tenant file {path}: name {name!r} is not [a-z0-9-] (1-63 characters)")
            tenants[name] = Tenant.of(name, load_tenant(path))
    default = tenants.get(DEFAULT_TENANT)
    config = default.config if default is not None else TenantConfig()
    if default_policy is not None:
        config = config.model_copy(update={"policy": default_policy})
    tenants[DEFAULT_TENANT] = Tenant.of(DEFAULT_TENANT, config)
    return tenants
