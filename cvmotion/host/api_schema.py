"""host layer: the host API's contract — its request and answer models and each operation's refusals.

``host.api`` serves these; its OpenAPI document (``/openapi.json``) is generated from them, so every rule a
handler enforces before it calls the daemon (the name rule, memory *or* size, the kv operations, bounded
options) is the schema's, and every refusal is an ``ipc.openapi.ErrorEnvelope`` whose ``kind`` is the
``CvmError`` class that caused it.  What a schema cannot say (an image file that must exist, a guest policy's
reserved bits, a reachable destination) is a documented ``400``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from cvmotion.abi.images import BUILTIN_IMAGES
from cvmotion.abi.kvstore import KEY_MAX, VALUE_MAX
from cvmotion.abi.sku import CATALOG, MAX_MEMORY, MAX_SKU_MEMORY, MAX_SKU_VCPUS, MIB, MIN_MEMORY
from cvmotion.errors import UsageError
from cvmotion.host.config import DEFAULT_GUEST_POLICY
from cvmotion.host.store import VmState
from cvmotion.ipc.names import NAME_PATTERN
from cvmotion.ipc.openapi import error_responses
from cvmotion.migration.options import OPTIONS, MigrationOptions
from cvmotion.migration.stats import MigrationStatus, Verdict

__all__ = [
    "MAX_BODY",
    "MIGRATION_ID_PATTERN",
    "PEER_HEADERS",
    "CreateVm",
    "IncomingMigration",
    "KvRequest",
    "MigrateRequest",
    "refusals",
]

MAX_BODY = 1 << 20
MIGRATION_ID_PATTERN = "^[0-9a-f]{12}$"
# A size with a binary unit (QEMU's ``-m`` spelling); whether it is a whole MiB in range is the handler's check.
MEMORY_TEXT_PATTERN = "^[0-9]{1,16}([KkMmGgTt]([Ii]?[Bb])?)?$"


def _any_case(text: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in text)


# The catalogue's SKU names as ``find_sku`` reads them: any case, with or without ``Standard_``.
SIZE_PATTERN = f"^({_any_case('Standard_')})?({'|'.join(_any_case(n.removeprefix('Standard_')) for n in CATALOG)})$"
_KEY_NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
_BASE64 = "^[A-Za-z0-9+/]*={0,2}$"
_STRICT = ConfigDict(extra="forbid", strict=True)


class CreateVm(BaseModel):
    """``POST /v1/vms``: launch a confidential VM on this host; exactly one of ``memory`` and ``size``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # Exactly one of memory and size, as if/then/else: client generators still see one object model.
        json_schema_extra={
            "if": {"required": ["memory"]},
            "then": {"not": {"required": ["size"]}},
            "else": {"required": ["size"]},
        },
    )

    name: str = Field(pattern=NAME_PATTERN, description="the VM's name (an RFC 1123 DNS label)")
    image: str = Field(
        min_length=1,
        max_length=4096,
        description=f"a built-in guest ({', '.join(BUILTIN_IMAGES)}) or the path of a multiboot ELF on the host",
        examples=list(BUILTIN_IMAGES),
    )
    memory: (
        Annotated[int, Field(ge=MIN_MEMORY, le=MAX_MEMORY, multiple_of=MIB)]
        | Annotated[str, Field(pattern=MEMORY_TEXT_PATTERN)]
        | SkipJsonSchema[None]
    ) = Field(
        default=None,
        description=(
            f"bytes, or text such as 64M, 1G, 512MiB: a whole number of MiB from {MIN_MEMORY // MIB} MiB to "
            f"{MAX_MEMORY >> 40} TiB (instead of size)"
        ),
    )
    size: Annotated[str, Field(pattern=SIZE_PATTERN)] | SkipJsonSchema[None] = Field(
        default=None,
        description="an SKU of the catalogue, any case, Standard_ optional: its memory and vCPUs (instead of memory)",
        examples=["Standard_DC2as_v5"],
    )
    vcpus: int | None = Field(default=None, ge=1, le=128, description="default: the SKU's, or 1")
    cmdline: str = Field(default="", max_length=3000, description="the guest's command line")
    backend: Literal["kvm", "emulated"] | None = Field(default=None, description="default: KVM where usable")
    policy: int = Field(
        default=DEFAULT_GUEST_POLICY,
        ge=0,
        lt=1 << 64,
        description="SNP guest policy; the secure processor refuses reserved bits (bit 17 must be one): 400",
    )
    migration_policy: str | None = Field(
        default=None,
        pattern=_BASE64,
        max_length=65536,
        description="base64 of a canonical migration policy document (default: this host's pool only)",
    )
    key_name: str | None = Field(default=None, pattern=_KEY_NAME_PATTERN, description="data key to release")

    @model_validator(mode="before")
    @classmethod
    def _no_null_sizes(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(key in data and data[key] is None for key in ("memory", "size")):
            raise ValueError("memory and size are never null: give exactly one of them")
        return data

    @model_validator(mode="after")
    def _memory_or_size(self) -> Self:
        if (self.memory is None) == (self.size is None):
            raise ValueError("give exactly one of memory (e.g. 64M, 1G) or size (an SKU such as Standard_DC2as_v5)")
        return self


_KEYED_OPS = ("get", "put", "delete")
_STATS_OPS = ("stats",)


class KvRequest(BaseModel):
    """``POST /v1/vms/{name}/kv``: one request to a kvstore guest; ``stats`` takes no key, the others need one."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "if": {"properties": {"op": {"enum": list(_STATS_OPS)}}},
            "then": {"properties": {"key": {"maxLength": 0}}},
            "else": {"required": ["key"], "properties": {"key": {"minLength": 1}}},
        },
    )

    op: Literal[_KEYED_OPS + _STATS_OPS]  # type: ignore[valid-type]
    key: str = Field(default="", max_length=KEY_MAX, description=f"at most {KEY_MAX} bytes of UTF-8")
    value: str = Field(default="", max_length=VALUE_MAX, description=f"put: at most {VALUE_MAX} bytes of UTF-8")

    @model_validator(mode="after")
    def _key_rule(self) -> Self:
        if (self.op in _STATS_OPS) == bool(self.key):
            raise ValueError("kv: get, put and delete need a key; stats takes none")
        return self


def _migration_options_schema(schema: dict[str, Any]) -> None:
    """The migration options of ``MigrateRequest`` as its schema states them: ``migration.options.OPTIONS``."""
    schema.setdefault("properties", {}).update({spec.api_name: spec.json_schema() for spec in OPTIONS})
    schema["additionalProperties"] = False


class MigrateRequest(BaseModel):
    """``POST /v1/vms/{name}/migrate``: live-migrate the VM to another host of the pool.

    Besides ``destination``, the body holds migration options by their API names; their one schema is
    ``migration.options.OPTIONS`` (types, defaults, bounds), and a key it does not name is refused.
    """

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_migration_options_schema)

    destination: str = Field(
        min_length=8, max_length=2048, pattern="^https?://[^/\\s]+", description="the destination's host API URL"
    )

    @model_validator(mode="before")
    @classmethod
    def _options_are_known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            try:
                MigrationOptions.from_api({k: v for k, v in data.items() if k != "destination"})
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return data

    def options(self) -> MigrationOptions:
        return MigrationOptions.from_api(dict(self.model_extra or {}))


class IncomingSpec(BaseModel):
    """The VM's spec as the source sends it: bounded, and named as the VM it describes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    memory: int = Field(ge=MIN_MEMORY, le=MAX_SKU_MEMORY)
    vcpus: int = Field(default=1, ge=1, le=MAX_SKU_VCPUS)
    image: str = Field(default="", max_length=4096)
    cmdline: str = Field(default="", max_length=3000)
    backend: str | None = Field(default=None, pattern="^(kvm|emulated)$")
    mode: str = Field(default="incoming", pattern="^(launch|incoming)$")  # always "incoming" here
    attestation_url: str | None = Field(default=None, max_length=2048)  # replaced by this host's services
    key_release_url: str | None = Field(default=None, max_length=2048)
    key_name: str | None = Field(default=None, pattern="^[A-Za-z0-9._-]{1,64}$")


class IncomingMigration(BaseModel):
    """``POST /v1/migrations/incoming``: a source host asks this host to receive a VM."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(pattern=NAME_PATTERN)
    spec: IncomingSpec
    session_id: str = Field(pattern="^[0-9a-f]{32}$")
    options: dict[str, Any] = Field(default_factory=dict)
    source: str = Field(default="", max_length=63)
    source_migration: str = Field(default="", pattern="^[0-9a-f]{0,32}$")
    policy: int = Field(default=DEFAULT_GUEST_POLICY, ge=0, lt=1 << 64)
    migration_policy: str = Field(default="", max_length=65536)
    measurement: str = Field(default="", pattern="^([0-9a-f]{96})?$")


# -- answers ---------------------------------------------------------------------------------------------


class HostInfo(BaseModel):
    name: str
    pool: str
    product: str | None
    chip_id: str | None
    reported_tcb: str | None
    reported_tcb_raw: int | None
    firmware: str | None
    emulated: bool
    migration_port: int
    migration_host: str
    vms: int


class VmInfo(BaseModel):
    name: str
    host: str
    state: str = Field(description=f"one of: {', '.join(s.value for s in VmState)} (or the VM process's word)")
    memory: int
    vcpus: int
    image: str
    cmdline: str
    handle: int | None
    measurement: str | None
    policy: int
    backend: str | None
    pid: int | None
    stop_reason: str | None
    migrations: list[str]


class VmList(BaseModel):
    vms: list[VmInfo]


class Deleted(BaseModel):
    deleted: str


class Console(BaseModel):
    lines: list[str]
    next: int = Field(description="pass as since to read on")


class KvAnswer(BaseModel):
    status: str = Field(description="the guest's status (OK, NOT_FOUND, ...)")
    value: str | None = Field(None, description="get: the value")
    keys: int | None = Field(None, description="stats")
    slots: int | None = Field(None, description="stats")
    ops: int | None = Field(None, description="stats")


class Migration(BaseModel):
    """QEMU's ``query-migrate`` object, plus ``x-cvmotion`` (id, VM, hosts, rounds)."""

    model_config = ConfigDict(extra="allow")

    status: Literal[tuple(s.value for s in MigrationStatus)]  # type: ignore[valid-type]
    ram: dict[str, Any]
    x_cvmotion: dict[str, Any] = Field(alias="x-cvmotion")


class MigrationStarted(Migration):
    migration: str = Field(description="the migration's id")


class MigrationList(BaseModel):
    migrations: list[Migration]


class Cancelled(BaseModel):
    cancelled: str


class IncomingAccepted(BaseModel):
    migration: str
    host: str
    port: int
    ticket: str
    name: str


class Outcome(BaseModel):
    state: Literal[tuple(v.value for v in Verdict)]  # type: ignore[valid-type]
    token: str | None = Field(None, description="base64: the commit receipt or the abort token")


class ServerSentEvent(BaseModel):
    """One event of ``GET /v1/events?follow=true``: a CloudEvent (JSON) in ``data``; keep-alives are comments."""

    data: str = Field(description="a CloudEvent, JSON")
    event: str | None = None
    id: str | None = None


class EventList(BaseModel):
    events: list[dict[str, Any]] = Field(description="CloudEvents 1.0 (JSON), oldest first")


# -- refusals ------------------------------------------------------------------------------------------

_REFUSALS: dict[int, tuple[str, ...]] = {
    307: ("the VM was live-migrated: the same request goes to Location", "Moved"),
    400: ("a request that breaks its schema or a rule the handler checks", "UsageError"),
    401: ("a host-to-host call without a valid signature from a pool host credential", "Unauthorized"),
    404: ("no such VM or migration on this host", "NotFound"),
    409: ("the name is taken, the VM is busy or not running here, or over the host's memory budget", "Conflict"),
    413: (f"a body over {MAX_BODY} bytes", "UsageError"),
}


def refusals(*statuses: int, **kinds: tuple[str, ...]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for ``statuses`` (400 always), with extra kinds per status (``s400=("ImageError",)``)."""
    table = {}
    for status in sorted({400, *statuses}):
        description, *base = _REFUSALS[status]
        table[status] = (description, *base, *kinds.get(f"s{status}", ()))
    out = error_responses(table)
    if 307 in out:
        location = {"description": "the VM's URL on its new host", "schema": {"type": "string"}}
        out[307]["headers"] = {"Location": location}
    return out


def _header(name: str, pattern: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": pattern, "maxLength": 16384}
    return {"name": name, "in": "header", "required": True, "schema": schema, "description": description}


PEER_HEADERS: list[dict[str, Any]] = [
    _header("x-cvmotion-host-cert", _BASE64, "the calling host's pool-issued certificate, base64 DER"),
    _header("x-cvmotion-date", "^[0-9]{1,12}$", "Unix seconds; within 300 s of this host's clock"),
    _header("x-cvmotion-nonce", "^[0-9a-f]{32}$", "16 random bytes, hex; accepted once"),
    _header(
        "x-cvmotion-signature",
        _BASE64,
        'ECDSA-SHA384, base64, over "cvmotion-host-request/1\\nMETHOD\\nPATH\\nDATE\\nNONCE\\nsha256(body) hex"',
    ),
]
