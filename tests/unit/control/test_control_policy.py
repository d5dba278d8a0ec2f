"""control.policy: the Azure Policy grammar, table-driven (operators, logic, aliases, parameters, errors)."""

from __future__ import annotations

from typing import Any

import pytest

from cvmotion.control.builtins import ALLOWED_HOST_POOLS, BUILTINS, DENY_CLM
from cvmotion.control.errors import InvalidRequest
from cvmotion.control.policy import Effect, compile_definition, evaluate, resolve_parameters

CLM = "Microsoft.Compute/virtualMachines/securityProfile.confidentialLiveMigration"
SIZE = "Microsoft.Compute/virtualMachines/vmSize"
POOL = "Cvmotion.Fabric/hostPool"


def vm(clm: str = "Disabled", size: str = "Standard_DC2as_v5", pool: str | None = None, **tags: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "hardwareProfile": {"vmSize": size},
        "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": clm},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
    }
    if pool is not None:
        props["extended"] = {"hostPool": pool, "hostName": "h"}
    return {
        "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v",
        "name": "v",
        "type": "Microsoft.Compute/virtualMachines",
        "location": "local",
        "tags": tags,
        "properties": props,
    }


def rule(cond: dict[str, Any], effect: str = "deny", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"properties": {"parameters": parameters or {}, "policyRule": {"if": cond, "then": {"effect": effect}}}}


def matches(cond: dict[str, Any], doc: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
    declared = {k: {"type": "Array" if isinstance(v, list) else "String"} for k, v in (params or {}).items()}
    compiled = compile_definition("t", rule(cond, parameters=declared))
    resolved = resolve_parameters(compiled, params or {})
    [verdict] = evaluate([("a", compiled, resolved)], doc)
    return verdict.matched


CASES = [
    pytest.param({"field": CLM, "equals": "Enabled"}, vm("Enabled"), True, id="equals"),
    pytest.param({"field": CLM, "equals": "enabled"}, vm("Enabled"), True, id="equals-case-insensitive"),
    pytest.param({"field": CLM, "equals": "Enabled"}, vm("Disabled"), False, id="equals-no"),
    pytest.param({"field": CLM, "notEquals": "Enabled"}, vm("Disabled"), True, id="notEquals"),
    pytest.param({"field": SIZE, "in": ["Standard_DC2as_v5", "x"]}, vm(), True, id="in"),
    pytest.param({"field": SIZE, "in": ["x"]}, vm(), False, id="in-no"),
    pytest.param({"field": SIZE, "notIn": ["x"]}, vm(), True, id="notIn"),
    pytest.param({"field": POOL, "exists": True}, vm(pool="p"), True, id="exists"),
    pytest.param({"field": POOL, "exists": False}, vm(), True, id="exists-false"),
    pytest.param({"field": POOL, "exists": "true"}, vm(), False, id="exists-string"),
    pytest.param({"field": SIZE, "like": "Standard_DC*"}, vm(), True, id="like"),
    pytest.param({"field": SIZE, "like": "Standard_EC*"}, vm(), False, id="like-no"),
    pytest.param({"field": SIZE, "notLike": "Standard_EC*"}, vm(), True, id="notLike"),
    pytest.param({"field": "tags.env", "equals": "prod"}, vm(env="prod"), True, id="tag"),
    pytest.param({"field": "tags['env']", "equals": "prod"}, vm(env="dev"), False, id="tag-bracket"),
    pytest.param({"field": "type", "equals": "Microsoft.Compute/virtualMachines"}, vm(), True, id="type"),
    pytest.param(
        {"allOf": [{"field": CLM, "equals": "Enabled"}, {"field": SIZE, "like": "*DC*"}]},
        vm("Enabled"),
        True,
        id="allOf",
    ),
    pytest.param(
        {"allOf": [{"field": CLM, "equals": "Enabled"}, {"field": SIZE, "like": "*EC*"}]},
        vm("Enabled"),
        False,
        id="allOf-no",
    ),
    pytest.param(
        {"anyOf": [{"field": CLM, "equals": "Enabled"}, {"field": SIZE, "like": "*EC*"}]},
        vm("Enabled"),
        True,
        id="anyOf",
    ),
    pytest.param({"not": {"field": CLM, "equals": "Enabled"}}, vm("Enabled"), False, id="not"),
]


@pytest.mark.parametrize(("cond", "doc", "expected"), CASES)
def test_conditions(cond: dict[str, Any], doc: dict[str, Any], expected: bool) -> None:
    assert matches(cond, doc) is expected


@pytest.mark.parametrize(
    ("params", "doc", "expected"),
    [
        pytest.param({"pools": ["a", "b"]}, vm(pool="a"), False, id="allowed"),
        pytest.param({"pools": ["a", "b"]}, vm(pool="c"), True, id="outside"),
    ],
)
def test_parameters(params: dict[str, Any], doc: dict[str, Any], expected: bool) -> None:
    assert matches({"field": POOL, "notIn": "[parameters('pools')]"}, doc, params) is expected


BAD = [
    pytest.param(
        rule({"field": "Microsoft.Compute/virtualMachines/nope", "equals": 1}), "not a known alias", id="alias"
    ),
    pytest.param(rule({"field": CLM, "matches": "x"}), "expected one operator", id="operator"),
    pytest.param(rule({"field": CLM, "equals": "x", "in": []}), "expected one operator", id="two-operators"),
    pytest.param(rule({"field": CLM, "equals": "x"}, effect="modify"), "is not one of deny", id="effect"),
    pytest.param(rule({"allOf": []}), "non-empty list", id="empty-allOf"),
    pytest.param(rule({"nope": 1}), "expected field, allOf", id="shape"),
    pytest.param(rule({"field": CLM, "equals": "[parameters('x')]"}), "does not declare", id="undeclared-param"),
    pytest.param(rule({"field": CLM, "equals": "[concat('a')]"}), "not supported", id="expression"),
    pytest.param({"properties": {}}, "policyRule is required", id="no-rule"),
    pytest.param(
        {"properties": {"policyRule": {"if": {"field": CLM, "equals": "x"}, "then": {"effect": "deny"}, "else": 1}}},
        "exactly 'if' and 'then'",
        id="extra-rule-key",
    ),
]


@pytest.mark.parametrize(("document", "message"), BAD)
def test_bad_definitions_are_refused(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        compile_definition("bad", document)


def test_builtins_compile_and_behave() -> None:
    deny = compile_definition(DENY_CLM, BUILTINS[DENY_CLM])
    pools = compile_definition(ALLOWED_HOST_POOLS, BUILTINS[ALLOWED_HOST_POOLS])
    assignments = [
        ("deny", deny, resolve_parameters(deny, {})),
        ("pools", pools, resolve_parameters(pools, {"allowedHostPools": {"value": ["pool-a"]}})),
    ]
    by_name = {v.assignment: v for v in evaluate(assignments, vm("Enabled", pool="pool-b"))}
    assert by_name["deny"].matched
    assert by_name["deny"].effect is Effect.DENY
    assert by_name["pools"].matched
    by_name = {v.assignment: v for v in evaluate(assignments, vm("Disabled"))}
    assert not by_name["deny"].matched
    assert not by_name["pools"].matched  # a plain PUT has no host pool yet


@pytest.mark.parametrize(
    ("given", "message"),
    [
        pytest.param({}, "needs parameter 'allowedHostPools'", id="missing"),
        pytest.param({"allowedHostPools": "a"}, "must be of type Array", id="not-array"),
        pytest.param({"allowedHostPools": ["a"], "x": 1}, "no parameter", id="unknown"),
        pytest.param({"allowedHostPools": ["a"], "effect": "modify"}, "not one of", id="effect-value"),
    ],
)
def test_assignment_parameters_are_checked(given: dict[str, Any], message: str) -> None:
    pools = compile_definition(ALLOWED_HOST_POOLS, BUILTINS[ALLOWED_HOST_POOLS])
    with pytest.raises(InvalidRequest, match=message):
        resolve_parameters(pools, given)


def test_disabled_effect_is_skipped_and_audit_reported() -> None:
    deny = compile_definition(DENY_CLM, BUILTINS[DENY_CLM])
    assert evaluate([("a", deny, resolve_parameters(deny, {"effect": "disabled"}))], vm("Enabled")) == []
    [audit] = evaluate([("a", deny, resolve_parameters(deny, {"effect": "audit"}))], vm("Enabled"))
    assert audit.effect is Effect.AUDIT
    assert audit.matched
