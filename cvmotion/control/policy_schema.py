"""control layer: the policy grammar (``control.policy``) as JSON Schema, for the controller's OpenAPI document.

What the schema states: a definition's shape, each condition being ``field`` plus exactly one operator or
``allOf``/``anyOf``/``not``, the known fields and aliases, ``in``/``notIn`` taking a list, ``exists`` a
boolean, an effect of ``deny``/``audit``/``disabled``, and that an expression is only
``[parameters('NAME')]``.  What it cannot: that a parameter a rule uses is declared (the documented 400).
"""

from __future__ import annotations

from typing import Any

from cvmotion.control.policy import ALIASES, PARAMETER_PATTERN, PARAMETER_TYPES

__all__ = ["definition_body", "policy_components"]

_REF = "#/components/schemas/"
_PARAM = {"type": "string", "pattern": PARAMETER_PATTERN, "description": "[parameters('NAME')]"}
# A literal: anything but a string that looks like an expression ("[...").
_LITERAL = {
    "anyOf": [
        {"type": ["number", "boolean", "array", "object", "null"]},
        {"type": "string", "pattern": r"^(?:[^\[][\s\S]*)?$"},
        _PARAM,
    ]
}
_FIELD = {
    "anyOf": [
        {"type": "string", "enum": ["type", "name", "location", "id", *ALIASES]},
        {"type": "string", "pattern": r"^tags\.[\s\S]+$"},
    ],
    "description": "type, name, location, id, tags.NAME or an alias",
}
_OPERATORS = {
    "equals": _LITERAL,
    "notEquals": _LITERAL,
    "like": _LITERAL,
    "notLike": _LITERAL,
    "in": {"anyOf": [{"type": "array"}, _PARAM]},
    "notIn": {"anyOf": [{"type": "array"}, _PARAM]},
    "exists": {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}, _PARAM]},
}


def policy_components() -> dict[str, Any]:
    """The schemas ``PolicyDefinition`` and its recursive ``PolicyCondition``, as OpenAPI components."""
    condition = {
        "description": "field and exactly one operator, or allOf / anyOf / not",
        "oneOf": [
            {
                "type": "object",
                "required": ["field"],
                "properties": {"field": _FIELD, **_OPERATORS},
                "additionalProperties": False,
                "minProperties": 2,
                "maxProperties": 2,
            },
            *(
                {
                    "type": "object",
                    "required": [key],
                    "properties": {key: {"type": "array", "minItems": 1, "items": {"$ref": _REF + "PolicyCondition"}}},
                    "additionalProperties": False,
                }
                for key in ("allOf", "anyOf")
            ),
            {
                "type": "object",
                "required": ["not"],
                "properties": {"not": {"$ref": _REF + "PolicyCondition"}},
                "additionalProperties": False,
            },
        ],
    }
    parameter = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": list(PARAMETER_TYPES)},
            "allowedValues": {"type": "array"},
            "defaultValue": {},
            "metadata": {"type": "object"},
        },
    }
    definition = {
        "type": "object",
        "required": ["properties"],
        "properties": {
            "properties": {
                "type": "object",
                "required": ["policyRule"],
                "properties": {
                    "displayName": {"type": "string"},
                    "description": {"type": "string"},
                    "mode": {"type": "string"},
                    "parameters": {"type": "object", "additionalProperties": parameter},
                    "policyRule": {
                        "type": "object",
                        "required": ["if", "then"],
                        "additionalProperties": False,
                        "properties": {
                            "if": {"$ref": _REF + "PolicyCondition"},
                            "then": {
                                "type": "object",
                                "required": ["effect"],
                                "additionalProperties": False,
                                "properties": {
                                    "effect": {
                                        "anyOf": [{"type": "string", "enum": ["deny", "audit", "disabled"]}, _PARAM]
                                    }
                                },
                            },
                        },
                    },
                },
            }
        },
    }
    return {"PolicyCondition": condition, "PolicyDefinition": definition}


def definition_body() -> dict[str, Any]:
    """``openapi_extra`` of ``PUT .../policyDefinitions/{name}``."""
    example = {
        "properties": {
            "displayName": "VMs only in rg-prod may opt in to confidential live migration",
            "policyRule": {
                "if": {
                    "allOf": [
                        {"field": "type", "equals": "Microsoft.Compute/virtualMachines"},
                        {
                            "field": "Microsoft.Compute/virtualMachines/securityProfile.confidentialLiveMigration",
                            "equals": "Enabled",
                        },
                    ]
                },
                "then": {"effect": "deny"},
            },
        }
    }
    content = {"application/json": {"schema": {"$ref": _REF + "PolicyDefinition"}, "example": example}}
    return {"requestBody": {"required": True, "content": content}}
