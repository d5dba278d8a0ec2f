"""control layer: organisation policy in Azure Policy's shape — parse, check and evaluate definitions.

A definition's ``policyRule`` is ``{"if": CONDITION, "then": {"effect": EFFECT}}``::

    CONDITION := {"field": FIELD, OP: VALUE} | {"allOf": [CONDITION…]} | {"anyOf": [CONDITION…]}
               | {"not": CONDITION}
    OP        := equals | notEquals | in | notIn | exists | like | notLike
    FIELD     := type | name | location | tags.NAME | an alias (``ALIASES``)
    VALUE     := JSON, or "[parameters('NAME')]"
    EFFECT    := deny | audit | disabled, or "[parameters('NAME')]"

Definitions are checked when they are stored (unknown alias, operator, effect or parameter: a clear
error), then compiled once into closures so a request is judged against a hundred assignments quickly.
String comparisons are case-insensitive, as in Azure Policy; ``like`` takes ``*`` wildcards.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cvmotion.control.errors import InvalidRequest

__all__ = [
    "ALIASES",
    "PARAMETER_PATTERN",
    "PARAMETER_TYPES",
    "CompiledDefinition",
    "Effect",
    "Verdict",
    "compile_definition",
    "evaluate",
    "resolve_parameters",
]

# alias -> path into the resource document (the request's ARM body plus id, name, type).
ALIASES: dict[str, tuple[str, ...]] = {
    "Microsoft.Compute/virtualMachines/securityProfile.confidentialLiveMigration": (
        "properties", "securityProfile", "confidentialLiveMigration",
    ),
    "Microsoft.Compute/virtualMachines/securityProfile.securityType": (
        "properties", "securityProfile", "securityType",
    ),
    "Microsoft.Compute/virtualMachines/vmSize": ("properties", "hardwareProfile", "vmSize"),
    "Microsoft.Compute/virtualMachines/sku.name": ("properties", "hardwareProfile", "vmSize"),
    "Microsoft.Compute/virtualMachines/imageId": ("properties", "storageProfile", "imageReference", "id"),
    # The pool of the host a placement or a move would put the VM on (absent on a plain PUT).
    "Cvmotion.Fabric/hostPool": ("properties", "extended", "hostPool"),
    "Cvmotion.Fabric/hostName": ("properties", "extended", "hostName"),
}  # fmt: skip
_ALIASES_CI = {k.lower(): v for k, v in ALIASES.items()}
_FIELDS = {"type": ("type",), "name": ("name",), "location": ("location",), "id": ("id",)}
_OPERATORS = ("equals", "notEquals", "in", "notIn", "exists", "like", "notLike")
PARAMETER_PATTERN = r"^\[parameters\('([A-Za-z0-9_]+)'\)\]$"
_PARAM = re.compile(PARAMETER_PATTERN)
# A declared parameter's type -> the JSON values it takes (bool is no Integer).
PARAMETER_TYPES: dict[str, Callable[[Any], bool]] = {
    "String": lambda v: isinstance(v, str),
    "Array": lambda v: isinstance(v, list),
    "Boolean": lambda v: isinstance(v, bool),
    "Integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "Object": lambda v: isinstance(v, dict),
}
# Operators whose parameter must be of a type: `in` takes a list, `exists` true or false.
_OPERAND_TYPES = {"in": "Array", "notIn": "Array", "exists": "Boolean"}
_MISSING = object()

Condition = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


class Effect(enum.Enum):
    DENY = "deny"
    AUDIT = "audit"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class CompiledDefinition:
    name: str
    parameters: Mapping[str, Mapping[str, Any]]
    condition: Condition
    effect: str  # an Effect value, or a parameter expression resolved per assignment


@dataclass(frozen=True, slots=True)
class Verdict:
    assignment: str
    definition: str
    effect: Effect
    matched: bool


def _path(field: str) -> tuple[str, ...]:
    lowered = field.lower()
    if lowered in _FIELDS:
        return _FIELDS[lowered]
    if lowered.startswith("tags.") and len(field) > 5:
        return ("tags", field[5:])
    if lowered.startswith("tags['") and field.endswith("']"):
        return ("tags", field[6:-2])
    path = _ALIASES_CI.get(lowered)
    if path is None:
        raise InvalidRequest(f"policy field {field!r} is not a known alias; known: {', '.join(sorted(ALIASES))}")
    return path


def _lookup(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _fold(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _value(raw: Any, declared: Mapping[str, Any], op: str, where: str) -> Callable[[Mapping[str, Any]], Any]:
    """A literal, or a ``[parameters('x')]`` reference checked against the declared parameters.

    ``in``/``notIn`` take a list and ``exists`` a boolean, literally or as a parameter of that type, so an
    assignment can never make a rule fail when a request is judged.
    """
    wanted = _OPERAND_TYPES.get(op)
    if isinstance(raw, str):
        match = _PARAM.match(raw)
        if match:
            name = match.group(1)
            if name not in declared:
                raise InvalidRequest(f"policy rule uses parameter {name!r}, which the definition does not declare")
            if wanted is not None and declared[name].get("type", "String") != wanted:
                raise InvalidRequest(f"{where}: '{op}' takes a parameter of type {wanted}, and {name!r} is not one")
            return lambda params: params[name]
        if raw.startswith("["):
            raise InvalidRequest(f"policy expression {raw[:100]!r} is not supported (only [parameters('NAME')])")
    if wanted == "Array" and not isinstance(raw, list):
        raise InvalidRequest(f"{where}: '{op}' needs a list, got {type(raw).__name__}")
    if wanted == "Boolean":
        _truthy(raw, where)
    return lambda _params: raw


def _compile(cond: Any, declared: Mapping[str, Any], where: str) -> Condition:
    if not isinstance(cond, dict) or not cond:
        raise InvalidRequest(f"{where}: a condition must be a JSON object")
    if "allOf" in cond or "anyOf" in cond:
        key = "allOf" if "allOf" in cond else "anyOf"
        items = cond[key]
        if len(cond) != 1 or not isinstance(items, list) or not items:
            raise InvalidRequest(f"{where}.{key}: expected a non-empty list and nothing beside it")
        parts = [_compile(c, declared, f"{where}.{key}[{i}]") for i, c in enumerate(items)]
        if key == "allOf":
            return lambda doc, params: all(p(doc, params) for p in parts)
        return lambda doc, params: any(p(doc, params) for p in parts)
    if "not" in cond:
        if len(cond) != 1:
            raise InvalidRequest(f"{where}.not: nothing may stand beside 'not'")
        inner = _compile(cond["not"], declared, f"{where}.not")
        return lambda doc, params: not inner(doc, params)
    if "field" not in cond:
        raise InvalidRequest(f"{where}: expected field, allOf, anyOf or not; got {sorted(cond)}")
    ops = [k for k in cond if k != "field"]
    if len(ops) != 1 or ops[0] not in _OPERATORS:
        raise InvalidRequest(f"{where}: expected one operator of {', '.join(_OPERATORS)}; got {ops}")
    return _operator(ops[0], _path(str(cond["field"])), _value(cond[ops[0]], declared, ops[0], where), where)


def _operator(op: str, path: tuple[str, ...], value: Callable[[Mapping[str, Any]], Any], where: str) -> Condition:
    def actual(doc: Mapping[str, Any]) -> Any:
        return _fold(_lookup(doc, path))

    if op == "exists":
        return lambda doc, params: (_lookup(doc, path) is not _MISSING) == _truthy(value(params), where)
    if op == "equals":
        return lambda doc, params: actual(doc) == _fold(value(params))
    if op == "notEquals":
        return lambda doc, params: actual(doc) != _fold(value(params))
    if op in ("in", "notIn"):
        negate = op == "notIn"

        def member(doc: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
            options = value(params)
            if not isinstance(options, list):
                raise InvalidRequest(f"{where}: '{op}' needs a list, got {type(options).__name__}")
            return (actual(doc) in [_fold(o) for o in options]) != negate

        return member
    negate = op == "notLike"

    def like(doc: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
        got = actual(doc)
        pattern = str(_fold(value(params)))
        hit = isinstance(got, str) and fnmatch.fnmatchcase(got, pattern.replace("[", "[[]").replace("?", "[?]"))
        return hit != negate

    return like


def _truthy(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"{where}: 'exists' takes true or false")


def compile_definition(name: str, document: Mapping[str, Any]) -> CompiledDefinition:
    """Check a definition (``{"properties": {"policyRule": …, "parameters": …}}``) and compile it.

    Raises:
        InvalidRequest: naming the first problem (unknown alias, operator, effect, parameter, shape).
    """
    props = document.get("properties", document)
    if not isinstance(props, Mapping) or not isinstance(props.get("policyRule"), Mapping):
        raise InvalidRequest(f"policy definition {name!r}: properties.policyRule is required")
    declared = props.get("parameters", {}) or {}
    if not isinstance(declared, Mapping) or not all(isinstance(v, Mapping) for v in declared.values()):
        raise InvalidRequest(f"policy definition {name!r}: parameters must map names to objects")
    for pname, spec in declared.items():
        kind = spec.get("type", "String")
        if not isinstance(kind, str) or kind not in PARAMETER_TYPES:
            raise InvalidRequest(f"policy definition {name!r}: parameter {pname!r} has unknown type {kind!r}")
        if not isinstance(spec.get("allowedValues", []), list):
            raise InvalidRequest(f"policy definition {name!r}: parameter {pname!r}: allowedValues must be a list")
    rule = props["policyRule"]
    unknown = set(rule) - {"if", "then"}
    if unknown or "if" not in rule or not isinstance(rule.get("then"), Mapping):
        raise InvalidRequest(f"policy definition {name!r}: policyRule needs exactly 'if' and 'then'")
    if set(rule["then"]) != {"effect"}:
        raise InvalidRequest(f"policy definition {name!r}: then takes exactly 'effect'")
    condition = _compile(rule["if"], declared, "policyRule.if")
    effect = rule["then"].get("effect")
    if not isinstance(effect, str):
        raise InvalidRequest(f"policy definition {name!r}: then.effect is required")
    match = _PARAM.match(effect)
    if match:
        if match.group(1) not in declared:
            raise InvalidRequest(f"policy definition {name!r}: effect uses undeclared parameter {match.group(1)!r}")
    elif effect.lower() not in {e.value for e in Effect}:
        raise InvalidRequest(f"policy definition {name!r}: effect {effect!r} is not one of deny, audit, disabled")
    return CompiledDefinition(name, declared, condition, effect)


def resolve_parameters(definition: CompiledDefinition, given: Mapping[str, Any]) -> dict[str, Any]:
    """Assignment values (``{"x": {"value": v}}`` or ``{"x": v}``) over the definition's defaults.

    Raises:
        InvalidRequest: an unknown parameter, a missing one without a default, or a value not allowed.
    """
    unknown = set(given) - set(definition.parameters)
    if unknown:
        raise InvalidRequest(f"policy {definition.name!r} has no parameter(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for pname, spec in definition.parameters.items():
        if pname in given:
            raw = given[pname]
            values[pname] = raw["value"] if isinstance(raw, Mapping) and set(raw) == {"value"} else raw
        elif "defaultValue" in spec:
            values[pname] = spec["defaultValue"]
        else:
            raise InvalidRequest(f"policy {definition.name!r} needs parameter {pname!r}")
        allowed = spec.get("allowedValues")
        if allowed is not None and values[pname] not in allowed:
            raise InvalidRequest(f"parameter {pname!r} = {values[pname]!r} is not one of {allowed}")
        kind = spec.get("type", "String")
        if not PARAMETER_TYPES[kind](values[pname]):
            raise InvalidRequest(f"parameter {pname!r} must be of type {kind}, not {type(values[pname]).__name__}")
    effect = definition.effect
    match = _PARAM.match(effect)
    if match and str(values[match.group(1)]).lower() not in {e.value for e in Effect}:
        raise InvalidRequest(f"parameter {match.group(1)!r} must be one of deny, audit, disabled")
    return values


def evaluate(
    assignments: list[tuple[str, CompiledDefinition, Mapping[str, Any]]], doc: Mapping[str, Any]
) -> list[Verdict]:
    """Judge ``doc`` against each (assignment id, definition, resolved parameters); disabled ones are skipped."""
    verdicts = []
    for assignment, definition, params in assignments:
        match = _PARAM.match(definition.effect)
        effect = Effect(str(params[match.group(1)] if match else definition.effect).lower())
        if effect is Effect.DISABLED:
            continue
        verdicts.append(Verdict(assignment, definition.name, effect, definition.condition(doc, params)))
    return verdicts
