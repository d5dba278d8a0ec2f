"""control.templates: the ARM template subset — expressions, parameters, and clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from cvmotion.control.errors import InvalidRequest
from cvmotion.control.resources import ClmSetting
from cvmotion.control.templates import expand_template


def template(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "vmName": {"type": "string"},
            "size": {"type": "string", "defaultValue": "Standard_DC2as_v5", "allowedValues": ["Standard_DC2as_v5"]},
        },
        "variables": {"suffix": "-kv", "clm": "Enabled"},
        "resources": [
            {
                "type": "Microsoft.Compute/virtualMachines",
                "apiVersion": "2024-03-01",
                "name": "[concat(parameters('vmName'), variables('suffix'))]",
                "location": "[resourceGroup().location]",
                "properties": {
                    "hardwareProfile": {"vmSize": "[parameters('size')]"},
                    "securityProfile": {
                        "securityType": "ConfidentialVM",
                        "confidentialLiveMigration": "[variables('clm')]",
                    },
                    "storageProfile": {"imageReference": {"id": "kvstore"}},
                },
            }
        ],
    }
    doc.update(extra)
    return doc


def test_expands_expressions() -> None:
    [res] = expand_template(template(), {"vmName": "web"}, "rg1", "westeurope")
    assert res.name == "web-kv"
    assert res.body.location == "westeurope"
    assert res.body.properties.security_profile.confidential_live_migration is ClmSetting.ENABLED
    assert res.body.properties.hardware_profile.vm_size == "Standard_DC2as_v5"


def test_parameter_value_form() -> None:
    [res] = expand_template(template(), {"vmName": {"value": "db"}}, "rg1", "local")
    assert res.name == "db-kv"


@pytest.mark.parametrize(
    ("doc", "params", "message"),
    [
        pytest.param(template(outputs={}), {"vmName": "a"}, r"\['outputs'\] are not supported", id="outputs"),
        pytest.param(template(), {}, "'vmName' has no value", id="missing-param"),
        pytest.param(template(), {"vmName": "a", "x": 1}, "no parameter", id="unknown-param"),
        pytest.param(template(), {"vmName": "a", "size": "Standard_DC4as_v5"}, "is not one of", id="allowed"),
        pytest.param(
            template(resources=[{"type": "Microsoft.Network/virtualNetworks", "name": "n"}]),
            {"vmName": "a"},
            "Microsoft.Network/virtualNetworks",
            id="resource-type",
        ),
        pytest.param(
            template(variables={"suffix": "[uniqueString('x')]", "clm": "Enabled"}),
            {"vmName": "a"},
            r"uniqueString\(\) is not supported",
            id="function",
        ),
        pytest.param(
            template(resources=[{"type": "Microsoft.Compute/virtualMachines", "name": "a", "copy": {}}]),
            {"vmName": "a"},
            r"\['copy'\] are not supported",
            id="copy",
        ),
        pytest.param(
            template(resources=[{"type": "Microsoft.Compute/virtualMachines", "name": "a", "properties": {}}]),
            {"vmName": "a"},
            "hardwareProfile",
            id="schema",
        ),
        pytest.param([], {}, "JSON object", id="not-object"),
        pytest.param(
            template(variables={"suffix": "[concat('a']", "clm": "x"}), {"vmName": "a"}, "ends too early", id="unclosed"
        ),
    ],
)
def test_refusals_name_the_construct(doc: Any, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        expand_template(doc, params, "rg1", "local")
