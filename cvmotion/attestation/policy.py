"""attestation layer: the attestation policy — what a relying party accepts once evidence has verified.

An ``AttestationPolicy`` is a frozen pydantic model loaded from JSON (``AttestationPolicy.from_json`` /
``load_policy``); ``policy_json_schema()`` returns its JSON Schema.  Byte fields are hex strings of the
exact field size (an optional ``0x`` prefix is accepted).  Every field is optional: an absent field (or
``null``) places no constraint, except ``allow_debug`` which defaults to ``false``.  Unknown keys are an
error, so a typo cannot silently weaken a policy.  Example::

    {
      "minimum_tcb": {"boot_loader": 10, "tee": 0, "snp": 25, "microcode": 84},
      "minimum_launch_tcb": {"Milan": {"snp": 5}, "Genoa": {"snp": 25}},
      "allow_debug": false,
      "migrate_ma": "allow",
      "max_vmpl": 0,
      "measurements": ["c57729018b0a6fb90dc17bb138b0aa35e4401004283ff4a2c24d3739ff3750f5...c4dc (96 hex digits)"],
      "minimum_firmware": "1.55.43",
      "platforms": ["amd-sev-snp"],
      "products": ["Genoa"]
    }
"""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, WithJsonSchema

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.attestation.trust import PlatformKind
from cvmotion.errors import AbiError, UsageError
from cvmotion.ipc.validation import describe_problems

__all__ = ["AttestationPolicy", "MigrateMa", "TcbMinimum", "load_policy", "policy_json_schema"]

_MAX_POLICY_BYTES = 1 << 20


def _hex(size: int) -> BeforeValidator:
    def parse(value: object) -> bytes:
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, str):
            text = value.strip()
            text = text[2:] if text[:2].lower() == "0x" else text
            if not re.fullmatch(r"[0-9a-fA-F]*", text) or len(text) % 2:
                raise ValueError("not a hex string")
            raw = bytes.fromhex(text)
        else:
            raise ValueError("expected a hex string")
        if len(raw) != size:
            raise ValueError(f"expected {size} bytes ({2 * size} hex digits), got {len(raw)}")
        return raw

    return BeforeValidator(parse)


def _hex_schema(size: int) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": f"^(0x)?[0-9a-fA-F]{{{2 * size}}}$"})


_HEX_OUT = PlainSerializer(lambda b: b.hex(), return_type=str)
Hex16 = Annotated[bytes, _hex(16), _HEX_OUT, _hex_schema(16)]
Hex32 = Annotated[bytes, _hex(32), _HEX_OUT, _hex_schema(32)]
Hex48 = Annotated[bytes, _hex(48), _HEX_OUT, _hex_schema(48)]
Hex64 = Annotated[bytes, _hex(64), _HEX_OUT, _hex_schema(64)]


def _product(value: object) -> object:
    if isinstance(value, str):
        try:
            return Product.from_name(value)
        except AbiError as exc:
            raise ValueError(str(exc)) from None
    return value


ProductName = Annotated[Product, BeforeValidator(_product)]
_Byte = Annotated[int, Field(ge=0, le=0xFF)]


class MigrateMa(enum.StrEnum):
    """What the policy says about guest policy bit 18 (MIGRATE_MA: a migration agent may be bound)."""

    ALLOW = "allow"
    REQUIRE = "require"
    FORBID = "forbid"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TcbMinimum(_Model):
    """A minimum TCB, per component (SNP ABI TCB_VERSION). ``fmc`` applies only to Turin."""

    boot_loader: _Byte = 0
    tee: _Byte = 0
    snp: _Byte = 0
    microcode: _Byte = 0
    fmc: _Byte = 0

    def shortfalls(self, tcb: TcbVersion, product: Product) -> list[str]:
        """Components of ``tcb`` below this minimum, as ``"snp=5 < 8"``."""
        names = (
            ("fmc", "boot_loader", "tee", "snp", "microcode")
            if product is Product.TURIN
            else ("boot_loader", "tee", "snp", "microcode")
        )
        out = []
        for name in names:
            have, need = getattr(tcb, name), getattr(self, name)
            if have < need:
                out.append(f"{name}={have} < {need}")
        return out


TcbRequirement = TcbMinimum | dict[ProductName, TcbMinimum]


class AttestationPolicy(_Model):
    """What a relying party accepts. Absent fields place no constraint; lists are allowed sets."""

    minimum_tcb: TcbRequirement | None = Field(
        None, description="CURRENT, COMMITTED and REPORTED TCB must each reach it; one value or per product"
    )
    minimum_launch_tcb: TcbRequirement | None = Field(None, description="LAUNCH_TCB must reach it")
    allow_debug: bool = Field(False, description="accept guests whose POLICY.DEBUG (bit 19) is set")
    migrate_ma: MigrateMa = Field(MigrateMa.ALLOW, description="POLICY.MIGRATE_MA (bit 18): allow/require/forbid")
    vmpl: int | None = Field(None, ge=0, le=3, description="VMPL must equal this")
    max_vmpl: int | None = Field(None, ge=0, le=3, description="VMPL must be at most this")
    measurements: tuple[Hex48, ...] | None = Field(None, min_length=1, description="allowed MEASUREMENTs")
    report_data: Hex64 | None = Field(None, description="REPORT_DATA must equal this (64 bytes)")
    host_data: Hex32 | None = Field(None, description="HOST_DATA must equal this")
    family_id: Hex16 | None = Field(None, description="FAMILY_ID must equal this")
    image_id: Hex16 | None = Field(None, description="IMAGE_ID must equal this")
    id_key_digests: tuple[Hex48, ...] | None = Field(None, min_length=1, description="allowed ID_KEY_DIGESTs")
    author_key_digests: tuple[Hex48, ...] | None = Field(None, min_length=1, description="allowed AUTHOR_KEY_DIGESTs")
    require_id_block: bool = Field(False, description="the guest was launched with an ID block")
    require_author_key: bool = Field(False, description="the ID block was signed by an author key")
    minimum_guest_svn: int = Field(0, ge=0, le=0xFFFFFFFF)
    minimum_firmware: str | None = Field(
        None, pattern=r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?$", description='CURRENT firmware "major.minor[.build]"'
    )
    platforms: tuple[PlatformKind, ...] | None = Field(None, min_length=1, description="allowed platform kinds")
    products: tuple[ProductName, ...] | None = Field(None, min_length=1, description="allowed products")
    chip_ids: tuple[Hex64, ...] | None = Field(None, min_length=1, description="allowed CHIP_IDs")
    signing_keys: tuple[Literal["VCEK", "VLEK"], ...] | None = Field(None, min_length=1)

    @property
    def minimum_firmware_tuple(self) -> tuple[int, int, int] | None:
        if self.minimum_firmware is None:
            return None
        parts = [int(p) for p in self.minimum_firmware.split(".")]
        return (parts[0], parts[1], parts[2] if len(parts) == 3 else 0)

    @classmethod
    def from_json(cls, data: str | bytes, *, source: str = "policy") -> AttestationPolicy:
        """Parse a JSON policy; every problem becomes one ``UsageError`` naming the field."""
        try:
            obj: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{source}: the policy must be a JSON object")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            problems = describe_problems(exc.errors(), root="(root)")
            raise UsageError(f"{source}: invalid attestation policy: {problems}") from None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True, indent=2)


def load_policy(path: str | Path) -> AttestationPolicy:
    """Read a JSON policy file."""
    p = Path(path)
    with p.open("rb") as f:
        data = f.read(_MAX_POLICY_BYTES + 1)
    if len(data) > _MAX_POLICY_BYTES:
        raise UsageError(f"{p}: policy file larger than {_MAX_POLICY_BYTES} bytes")
    return AttestationPolicy.from_json(data, source=str(p))


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file."""
    return AttestationPolicy.model_json_schema()
