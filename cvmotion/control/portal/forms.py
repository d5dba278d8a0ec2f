"""control layer (portal): the forms' fields, checked before the API is called, with a message per field.

The API checks everything again (it is the authority); these checks exist so that a typo is answered
beside the field that holds it, in words, instead of as one JSON error for the whole request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request

from cvmotion.abi.sku import CATALOG, Sku
from cvmotion.agent.pool import POOL_NAME_PATTERN
from cvmotion.control.resources import RG_NAME_PATTERN, SUB_NAME_PATTERN, VM_NAME_PATTERN

__all__ = ["AssignmentForm", "VmForm", "read_form", "sizes"]

_MAX_FORM = 64 * 1024
BUILT_IN_IMAGES = ("kvstore", "memdirty", "probe")
_ASSIGNMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
EFFECTS = ("deny", "audit", "disabled")


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as {name: last value} (bounded; other types: empty)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    body = await request.body()
    if ctype != "application/x-www-form-urlencoded" or len(body) > _MAX_FORM:
        return {}
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=64)
    return {key: values[-1] for key, values in parsed.items()}


def _common(data: dict[str, str]) -> dict[str, str]:
    """The fields every form here has: subscription, resource group, name."""
    return {
        "subscription": data.get("subscription", "default").strip() or "default",
        "resource_group": data.get("resource_group", "").strip(),
        "name": data.get("name", "").strip(),
    }


def sizes() -> list[Sku]:
    """The catalogue's DCasv5 and ECasv5 sizes (the series the create blade offers), smallest first."""
    return [s for s in CATALOG.values() if s.series in ("DCasv5", "ECasv5")]


@dataclass
class VmForm:
    subscription: str = "default"
    resource_group: str = ""
    name: str = ""
    size: str = "Standard_DC2as_v5"
    image: str = "kvstore"
    cmdline: str = ""
    clm: bool = False  # "Enable confidential live migration": off by default (opt-in)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, str]) -> VmForm:
        c = _common(data)
        form = cls(
            subscription=c["subscription"],
            resource_group=c["resource_group"],
            name=c["name"],
            size=data.get("size", "").strip(),
            image=data.get("image", "").strip(),
            cmdline=data.get("cmdline", ""),
            clm=data.get("clm", "") in ("on", "true", "Enabled"),
        )
        form.check()
        return form

    def check(self) -> None:
        e = self.errors
        if not self.name:
            e["name"] = "Enter a name for the virtual machine."
        elif not re.fullmatch(VM_NAME_PATTERN, self.name):
            e["name"] = "Use 1–40 letters, digits and hyphens, starting with a letter or digit."
        if not self.resource_group:
            e["resource_group"] = "Enter a resource group (it is created if it does not exist)."
        elif not re.fullmatch(RG_NAME_PATTERN, self.resource_group):
            e["resource_group"] = "Use up to 90 letters, digits, '_', '-', '.', '(' or ')', not ending in '.'."
        if not re.fullmatch(SUB_NAME_PATTERN, self.subscription):
            e["subscription"] = "Use 1–64 letters, digits and hyphens."
        if self.size not in CATALOG:
            e["size"] = "Choose a size from the list."
        if not self.image:
            e["image"] = "Choose an image, or enter the path of a guest image on the hosts."
        elif len(self.image) > 4096:
            e["image"] = "The image path is longer than 4096 characters."
        if len(self.cmdline) > 3000:
            e["cmdline"] = "The command line is longer than 3000 characters."

    @property
    def sku(self) -> Sku | None:
        return CATALOG.get(self.size)

    def body(self) -> dict[str, Any]:
        """The ARM PUT body of this VM."""
        return {
            "location": "local",
            "properties": {
                "hardwareProfile": {"vmSize": self.size},
                "securityProfile": {
                    "securityType": "ConfidentialVM",
                    "confidentialLiveMigration": "Enabled" if self.clm else "Disabled",
                },
                "storageProfile": {"imageReference": {"id": self.image}},
                "osProfile": {"cmdline": self.cmdline},
            },
        }


@dataclass
class AssignmentForm:
    subscription: str = "default"
    resource_group: str = ""  # empty: the subscription's scope
    name: str = ""
    definition: str = ""
    effect: str = "deny"
    pools: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    has_pools: bool = False  # the chosen definition takes allowedHostPools
    has_effect: bool = False

    @classmethod
    def parse(cls, data: dict[str, str], definitions: dict[str, dict[str, Any]]) -> AssignmentForm:
        c = _common(data)
        form = cls(
            subscription=c["subscription"],
            resource_group=c["resource_group"],
            name=c["name"],
            definition=data.get("definition", "").strip(),
            effect=data.get("effect", "deny").strip(),
            pools=[p.strip() for p in data.get("pools", "").replace(",", " ").split() if p.strip()],
        )
        e = form.errors
        if not _ASSIGNMENT.fullmatch(form.name):
            e["name"] = "Use 1–128 letters, digits, '_', '.' and '-', starting with a letter or digit."
        if form.resource_group and not re.fullmatch(RG_NAME_PATTERN, form.resource_group):
            e["resource_group"] = "Not a valid resource group name (or leave it empty for the subscription)."
        if not re.fullmatch(SUB_NAME_PATTERN, form.subscription):
            e["subscription"] = "Use 1–64 letters, digits and hyphens."
        params = definitions.get(form.definition, {}).get("properties", {}).get("parameters", {})
        if form.definition not in definitions:
            e["definition"] = "Choose a policy definition."
        if form.effect not in EFFECTS:
            e["effect"] = "Choose deny, audit or disabled."
        if "allowedHostPools" in params:
            bad = [p for p in form.pools if not POOL_NAME_PATTERN.fullmatch(p)]
            if not form.pools:
                e["pools"] = "This policy needs at least one host pool."
            elif bad:
                e["pools"] = f"Not a pool name: {', '.join(bad[:3])} (letters, digits, '.', '_' and '-')."
        form.has_pools = "allowedHostPools" in params
        form.has_effect = "effect" in params
        return form

    @property
    def scope(self) -> str:
        base = f"/subscriptions/{self.subscription}"
        return f"{base}/resourceGroups/{self.resource_group}" if self.resource_group else base

    def body(self) -> dict[str, Any]:
        parameters: dict[str, Any] = {}
        if self.has_pools:
            parameters["allowedHostPools"] = {"value": self.pools}
        if self.has_effect:
            parameters["effect"] = {"value": self.effect}
        return {
            "properties": {
                "policyDefinitionId": f"/providers/Microsoft.Authorization/policyDefinitions/{self.definition}",
                "parameters": parameters,
            }
        }
