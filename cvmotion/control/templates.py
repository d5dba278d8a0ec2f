"""control layer: the ARM template subset ``deployment create`` accepts, expanded into VM requests.

Supported: ``$schema``, ``contentVersion``, ``parameters`` (type, defaultValue, allowedValues),
``variables``, ``resources`` of type ``Microsoft.Compute/virtualMachines`` (apiVersion, name, location,
tags, properties), and expressions ``[parameters('x')]``, ``[variables('y')]``, ``[concat(...)]``,
``[resourceGroup().location]`` / ``.name``, string and integer literals.  Anything else is refused
with an error naming it, before any resource is created.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cvmotion.control.errors import InvalidRequest
from cvmotion.control.resources import VM_TYPE, VmPut
from cvmotion.ipc.validation import describe_problems

__all__ = ["TemplateResource", "expand_template"]

_TOP = {"$schema", "contentVersion", "parameters", "variables", "resources"}
_RESOURCE = {"type", "apiVersion", "name", "location", "tags", "properties"}
_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<sym>[(),.]))")


@dataclass(frozen=True, slots=True)
class TemplateResource:
    name: str
    body: VmPut


class _Expr:
    """A recursive-descent reader of one ``[...]`` expression."""

    def __init__(self, text: str, scope: _Scope) -> None:
        self.text, self.scope, self.pos = text, scope, 0
        self.tokens: list[tuple[str, str]] = []
        while self.pos < len(text):
            match = _TOKEN.match(text, self.pos)
            if match is None or match.end() == self.pos:
                if text[self.pos :].strip():
                    raise InvalidRequest(f"template expression [{text}]: cannot read {text[self.pos :]!r}")
                break
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            self.pos = match.end()
        self.i = 0

    def _next(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise InvalidRequest(f"template expression [{self.text}] ends too early")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _expect(self, sym: str) -> None:
        if self._next() != ("sym", sym):
            raise InvalidRequest(f"template expression [{self.text}]: expected {sym!r}")

    def value(self) -> Any:
        result = self._primary()
        if self.i != len(self.tokens):
            raise InvalidRequest(f"template expression [{self.text}]: unexpected {self.tokens[self.i][1]!r}")
        return result

    def _primary(self) -> Any:
        kind, tok = self._next()
        if kind == "str":
            return tok[1:-1].replace("''", "'")
        if kind == "num":
            return int(tok)
        if kind != "name":
            raise InvalidRequest(f"template expression [{self.text}]: unexpected {tok!r}")
        self._expect("(")
        args: list[Any] = []
        if self.tokens[self.i : self.i + 1] != [("sym", ")")]:
            args.append(self._primary())
            while self.tokens[self.i : self.i + 1] == [("sym", ",")]:
                self.i += 1
                args.append(self._primary())
        self._expect(")")
        value = self.scope.call(tok, args, self.text)
        while self.tokens[self.i : self.i + 1] == [("sym", ".")]:
            self.i += 1
            kind, prop = self._next()
            if kind != "name" or not isinstance(value, Mapping) or prop not in value:
                raise InvalidRequest(f"template expression [{self.text}]: no property {prop!r}")
            value = value[prop]
        return value


@dataclass
class _Scope:
    parameters: dict[str, Any]
    variables: dict[str, Any]
    resource_group: dict[str, str]

    def call(self, fn: str, args: list[Any], text: str) -> Any:
        if fn == "parameters" or fn == "variables":
            table = self.parameters if fn == "parameters" else self.variables
            if len(args) != 1 or args[0] not in table:
                raise InvalidRequest(f"template expression [{text}]: {fn}({args[0] if args else ''!r}) is not defined")
            return table[args[0]]
        if fn == "concat":
            if all(isinstance(a, list) for a in args):
                return [x for a in args for x in a]
            return "".join(str(a) for a in args)
        if fn == "resourceGroup" and not args:
            return self.resource_group
        raise InvalidRequest(
            f"template function {fn}() is not supported (parameters, variables, concat, resourceGroup)"
        )

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("[") and value.endswith("]") and not value.startswith("[["):
            return _Expr(value[1:-1], self).value()
        if isinstance(value, str) and value.startswith("[["):
            return value[1:]
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value


_TYPES = {"string": str, "int": int, "bool": bool, "array": list, "object": dict, "securestring": str}


def _parameters(declared: Mapping[str, Any], given: Mapping[str, Any], scope: _Scope) -> dict[str, Any]:
    unknown = set(given) - set(declared)
    if unknown:
        raise InvalidRequest(f"template has no parameter(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if not isinstance(spec, Mapping) or str(spec.get("type", "")).lower() not in _TYPES:
            raise InvalidRequest(f"template parameter {name!r} needs a type of {', '.join(_TYPES)}")
        if name in given:
            raw = given[name]
            value = raw["value"] if isinstance(raw, Mapping) and set(raw) == {"value"} else raw
        elif "defaultValue" in spec:
            value = scope.resolve(spec["defaultValue"])
        else:
            raise InvalidRequest(f"template parameter {name!r} has no value and no defaultValue")
        kind = _TYPES[str(spec["type"]).lower()]
        if kind is int and isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, kind):
            raise InvalidRequest(f"template parameter {name!r} must be {spec['type']}, got {value!r}")
        if "allowedValues" in spec and value not in spec["allowedValues"]:
            raise InvalidRequest(f"template parameter {name!r} = {value!r} is not one of {spec['allowedValues']}")
        out[name] = value
    return out


def expand_template(
    template: Any, parameters: Mapping[str, Any], resource_group: str, location: str
) -> list[TemplateResource]:
    """The template's VMs as validated requests, or ``InvalidRequest`` naming the first unsupported part."""
    if not isinstance(template, dict):
        raise InvalidRequest("the template must be a JSON object")
    unsupported = sorted(set(template) - _TOP)
    if unsupported:
        raise InvalidRequest(f"template section(s) {unsupported} are not supported (supported: {sorted(_TOP)})")
    scope = _Scope({}, {}, {"name": resource_group, "location": location})
    scope.parameters = _parameters(template.get("parameters", {}), parameters, scope)
    for name, raw in dict(template.get("variables", {})).items():
        scope.variables[name] = scope.resolve(raw)
    resources = template.get("resources", [])
    if not isinstance(resources, list) or not resources:
        raise InvalidRequest("template.resources must be a non-empty list")
    out: list[TemplateResource] = []
    for index, res in enumerate(resources):
        if not isinstance(res, dict):
            raise InvalidRequest(f"resources[{index}] must be an object")
        extra = sorted(set(res) - _RESOURCE)
        if extra:
            raise InvalidRequest(f"resources[{index}]: {extra} are not supported (supported: {sorted(_RESOURCE)})")
        if res.get("type") != VM_TYPE:
            raise InvalidRequest(f"resources[{index}]: type {res.get('type')!r} is not supported (only {VM_TYPE})")
        resolved = scope.resolve({k: v for k, v in res.items() if k not in ("type", "apiVersion")})
        name = resolved.pop("name", None)
        if not isinstance(name, str):
            raise InvalidRequest(f"resources[{index}]: name must be a string")
        try:
            body = VmPut.model_validate(resolved)
        except ValidationError as exc:
            problems = describe_problems(exc.errors())
            raise InvalidRequest(f"resources[{index}] ({name}): {problems}") from None
        out.append(TemplateResource(name, body))
    return out
