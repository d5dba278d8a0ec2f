"""control layer: the two built-in policy definitions every controller has from its first start."""

from __future__ import annotations

from typing import Any

__all__ = ["ALLOWED_HOST_POOLS", "BUILTINS", "DENY_CLM"]

DENY_CLM = "deny-confidential-live-migration"
ALLOWED_HOST_POOLS = "allowed-host-pools"

_VM = {"field": "type", "equals": "Microsoft.Compute/virtualMachines"}

BUILTINS: dict[str, dict[str, Any]] = {
    DENY_CLM: {
        "properties": {
            "displayName": "Confidential live migration must be disabled",
            "policyType": "BuiltIn",
            "mode": "Indexed",
            "description": "Refuses VMs that opt in to confidential live migration, and live migrations of VMs.",
            "parameters": {
                "effect": {"type": "String", "defaultValue": "deny", "allowedValues": ["deny", "audit", "disabled"]}
            },
            "policyRule": {
                "if": {
                    "allOf": [
                        _VM,
                        {
                            "field": "Microsoft.Compute/virtualMachines/securityProfile.confidentialLiveMigration",
                            "equals": "Enabled",
                        },
                    ]
                },
                "then": {"effect": "[parameters('effect')]"},
            },
        }
    },
    ALLOWED_HOST_POOLS: {
        "properties": {
            "displayName": "Confidential live migration allowed host pools",
            "policyType": "BuiltIn",
            "mode": "Indexed",
            "description": (
                "VMs are placed and live-migrated only onto hosts of these pools; the pools are also bound into"
                " each VM's migration policy at launch, so the migration agents enforce them too."
            ),
            "parameters": {
                "allowedHostPools": {"type": "Array", "metadata": {"displayName": "Allowed host pools"}},
                "effect": {"type": "String", "defaultValue": "deny", "allowedValues": ["deny", "audit", "disabled"]},
            },
            "policyRule": {
                "if": {
                    "allOf": [
                        _VM,
                        {"field": "Cvmotion.Fabric/hostPool", "exists": True},
                        {"field": "Cvmotion.Fabric/hostPool", "notIn": "[parameters('allowedHostPools')]"},
                    ]
                },
                "then": {"effect": "[parameters('effect')]"},
            },
        }
    },
}
