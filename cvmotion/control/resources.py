"""control layer: the resource shapes of the controller, as Azure Resource Manager writes them.

One schema per concept: the request models (``VmPut``, ``VmPatch``) refuse unknown keys, and
``vm_resource`` renders the one response shape every endpoint and the CLI use.  Resource ids are
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from cvmotion.abi.sku import CATALOG
from cvmotion.control.errors import InvalidRequest
from cvmotion.ipc.names import NAME_PATTERN

__all__ = [
    "VM_TYPE",
    "ClmSetting",
    "HostState",
    "Tcb",
    "PowerState",
    "ProvisioningState",
    "RG_NAME_PATTERN",
    "SUB_NAME_PATTERN",
    "VM_NAME_PATTERN",
    "VmPatch",
    "VmPut",
    "check_name",
    "no_bool",
    "host_vm_name",
    "rg_id",
    "vm_id",
]

VM_TYPE = "Microsoft.Compute/virtualMachines"
# ARM names: VMs 1-64 chars (we keep 40 so the host-side name stays within the host's 63), groups 1-90.
VM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,39}$"
RG_NAME_PATTERN = r"^[A-Za-z0-9_.()-]{0,89}[A-Za-z0-9_()-]$"
SUB_NAME_PATTERN = r"^[A-Za-z0-9-]{1,64}$"
_VM_NAME = re.compile(VM_NAME_PATTERN)
_RG_NAME = re.compile(RG_NAME_PATTERN)
_SUB_NAME = re.compile(SUB_NAME_PATTERN)


def no_bool(value: object) -> object:
    """A JSON integer: 5 or 5.0 (JSON Schema's "integer"), never true/false (which Python calls ints)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# A raw TCB: an unsigned 64-bit value (bounds before the validator, so the JSON Schema says minimum/maximum).
Tcb = Annotated[int, Field(ge=0, le=(1 << 64) - 1), BeforeValidator(no_bool)]


class ClmSetting(enum.Enum):
    """``properties.securityProfile.confidentialLiveMigration``: opt-in, so the default is Disabled."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"


class ProvisioningState(enum.Enum):
    CREATING = "Creating"
    UPDATING = "Updating"
    MIGRATING = "Migrating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DELETING = "Deleting"


class PowerState(enum.Enum):
    """``instanceView`` power state (Azure's ``PowerState/...`` codes, without the prefix)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"  # its host stopped reporting it: under investigation, never re-created elsewhere


class HostState(enum.Enum):
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"  # missed heartbeats: placement skips it, its VMs keep their records


def check_name(kind: str, value: str) -> str:
    pattern = {"virtualMachines": _VM_NAME, "resourceGroups": _RG_NAME, "subscriptions": _SUB_NAME}[kind]
    if not pattern.fullmatch(value):
        raise InvalidRequest(f"{kind} name {value!r} is invalid: it must match {pattern.pattern}")
    return value


def rg_id(sub: str, rg: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}"


def vm_id(sub: str, rg: str, name: str) -> str:
    return f"{rg_id(sub, rg)}/providers/{VM_TYPE}/{name}"


def host_vm_name(resource_id: str, name: str) -> str:
    """The VM's name on its host: unique per resource id, and within the host's ``[a-z0-9-]{1,63}`` rule."""
    digest = hashlib.sha256(resource_id.lower().encode()).hexdigest()[:10]
    return f"{name.lower()}-{digest}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HardwareProfile(_Strict):
    # The catalogue's names; the handler also takes them in any case and without "Standard_".
    vm_size: str = Field(alias="vmSize", min_length=1, max_length=64, json_schema_extra={"enum": list(CATALOG)})


class SecurityProfile(_Strict):
    security_type: Literal["ConfidentialVM"] = Field(default="ConfidentialVM", alias="securityType")
    confidential_live_migration: ClmSetting = Field(default=ClmSetting.DISABLED, alias="confidentialLiveMigration")


class ImageReference(_Strict):
    """A built-in guest (``kvstore``, ``memdirty``, ``probe``) or a path on the host."""

    id: str = Field(min_length=1, max_length=4096)


class StorageProfile(_Strict):
    image_reference: ImageReference = Field(alias="imageReference")


class OsProfile(_Strict):
    """The guest command line stands in for customData: parameters the image reads at boot."""

    cmdline: str = Field(default="", max_length=3000)
    os_type: Literal["Linux", "Other"] = Field(default="Other", alias="osType")


class Placement(_Strict):
    """cvmotion extension: constraints on the host (``host`` pins the VM, like a dedicated host)."""

    host: str | None = Field(default=None, pattern=NAME_PATTERN, description="a registered host's name")
    product: Literal["Milan", "Genoa", "Turin"] | None = None
    minimum_tcb: Tcb | None = Field(default=None, alias="minimumTcb")


class VmProperties(_Strict):
    hardware_profile: HardwareProfile = Field(alias="hardwareProfile")
    security_profile: SecurityProfile = Field(default_factory=SecurityProfile, alias="securityProfile")
    storage_profile: StorageProfile = Field(alias="storageProfile")
    os_profile: OsProfile = Field(default_factory=OsProfile, alias="osProfile")
    placement: Placement = Field(default_factory=Placement)


class VmPut(_Strict):
    location: str = Field(default="local", min_length=1, max_length=64)
    tags: dict[str, str] = Field(default_factory=dict, max_length=50)
    properties: VmProperties


class SecurityProfilePatch(_Strict):
    confidential_live_migration: ClmSetting | None = Field(default=None, alias="confidentialLiveMigration")


class VmPropertiesPatch(_Strict):
    security_profile: SecurityProfilePatch | None = Field(default=None, alias="securityProfile")


class VmPatch(_Strict):
    tags: dict[str, str] | None = Field(default=None, max_length=50)
    properties: VmPropertiesPatch | None = None
