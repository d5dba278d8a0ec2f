"""attestation layer: key-release policies — Azure Key Vault's secure-key-release grammar, evaluated on token claims.

Grammar (AKV "secure key release policy grammar", modelled on Azure Policy)::

    policy    = {"version": "1.0.0", "anyOf": [authority, ...]}
    authority = {"authority": ISSUER_URL, "allOf" | "anyOf": [condition, ...]}
    condition = {"claim": NAME, OPERATOR: VALUE} | {"allOf": [condition, ...]} | {"anyOf": [condition, ...]}
    OPERATOR  = equals | notEquals | less | lessOrEquals | greater | greaterOrEquals | exists

Example (release only to a non-debug cvmotion guest with one launch measurement, on any platform)::

    {"version": "1.0.0", "anyOf": [{"authority": "http://127.0.0.1:8790", "allOf": [
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
        {"claim": "x-ms-compliance-status", "equals": "cvmotion-compliant-cvm"},
        {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": false},
        {"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": "<96 hex digits>"},
        {"claim": "x-ms-sevsnpvm-snpfw-svn", "greaterOrEquals": 8}]}]}

Semantics (all fail closed): a claim NAME is looked up as a top-level claim, else as a dotted path into JSON
objects (``x-ms-runtime.keys``); an absent claim fails every operator except ``exists: false``; ``equals`` /
``notEquals`` compare strings case-insensitively (as Azure Policy does — hex digests in either case match),
booleans only with booleans, numbers only with numbers; ordering operators accept numbers only.  The token's
``iss`` selects the authority entry (exact match); a token from any other issuer is refused.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cvmotion.errors import UsageError

__all__ = ["ClaimCondition", "ConditionGroup", "Operator", "ReleasePolicy"]

Scalar = str | int | float | bool
_MAX_DEPTH = 8


class Operator(enum.StrEnum):
    EQUALS = "equals"
    NOT_EQUALS = "notEquals"
    LESS = "less"
    LESS_OR_EQUALS = "lessOrEquals"
    GREATER = "greater"
    GREATER_OR_EQUALS = "greaterOrEquals"
    EXISTS = "exists"


_MISSING = object()


def _lookup(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):  # longest top-level prefix first ("x-ms-runtime.keys")
        head = ".".join(parts[:split])
        if head in claims:
            node: Any = claims[head]
            for part in parts[split:]:
                if not isinstance(node, dict) or part not in node:
                    return _MISSING
                node = node[part]
            return node
    return _MISSING


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(have: Any, want: Scalar) -> bool:
    if isinstance(want, bool) or isinstance(have, bool):
        return isinstance(have, bool) and isinstance(want, bool) and have is want
    if isinstance(want, str):
        return isinstance(have, str) and have.casefold() == want.casefold()
    return _is_number(have) and have == want


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    claim: str
    op: Operator
    value: Scalar

    def failures(self, claims: Mapping[str, Any]) -> list[str]:
        have = _lookup(claims, self.claim)
        shown = json.dumps(self.value)
        if self.op is Operator.EXISTS:
            ok = (have is not _MISSING) == bool(self.value)
            return [] if ok else [f"{self.claim}: exists is {have is not _MISSING}, policy wants {shown}"]
        if have is _MISSING:
            return [f"{self.claim}: absent (policy: {self.op.value} {shown})"]
        if self.op is Operator.EQUALS:
            ok = _equal(have, self.value)
        elif self.op is Operator.NOT_EQUALS:
            ok = not _equal(have, self.value)
        elif not (_is_number(have) and _is_number(self.value)):
            ok = False
        else:
            ok = {
                Operator.LESS: have < self.value,
                Operator.LESS_OR_EQUALS: have <= self.value,
                Operator.GREATER: have > self.value,
                Operator.GREATER_OR_EQUALS: have >= self.value,
            }[self.op]
        return [] if ok else [f"{self.claim}: {json.dumps(have)[:120]} is not {self.op.value} {shown}"]


@dataclass(frozen=True, slots=True)
class ConditionGroup:
    all_of: bool
    items: tuple[ClaimCondition | ConditionGroup, ...]

    def failures(self, claims: Mapping[str, Any]) -> list[str]:
        results = [item.failures(claims) for item in self.items]
        if self.all_of:
            return [f for r in results for f in r]
        if any(not r for r in results):
            return []
        return ["none of anyOf holds: " + " | ".join("; ".join(r) for r in results)]


@dataclass(frozen=True, slots=True)
class ReleasePolicy:
    """A parsed release policy: ``{authority: condition group}``."""

    authorities: dict[str, ConditionGroup]

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], *, source: str = "release policy") -> ReleasePolicy:
        """Parse; every structural problem is one ``UsageError`` naming where it is."""
        try:
            doc = json.loads(data) if isinstance(data, str | bytes) else data
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: not JSON ({exc})") from None
        if not isinstance(doc, Mapping) or set(doc) != {"version", "anyOf"}:
            raise UsageError(f'{source}: expected exactly {{"version": "1.0.0", "anyOf": [...]}}')
        if doc["version"] != "1.0.0":
            raise UsageError(f"{source}: version {doc['version']!r} is not 1.0.0")
        entries = doc["anyOf"]
        if not isinstance(entries, list) or not entries:
            raise UsageError(f"{source}: anyOf must be a non-empty list of authorities")
        authorities: dict[str, ConditionGroup] = {}
        for i, entry in enumerate(entries):
            where = f"{source}: anyOf[{i}]"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("authority"), str):
                raise UsageError(f"{where}: needs an 'authority' URL")
            rest = {k: v for k, v in entry.items() if k != "authority"}
            if len(rest) != 1 or next(iter(rest)) not in ("allOf", "anyOf"):
                raise UsageError(f"{where}: needs exactly one of allOf / anyOf besides 'authority'")
            authority = entry["authority"].rstrip("/")
            if authority in authorities:
                raise UsageError(f"{where}: authority {authority!r} is listed twice")
            authorities[authority] = _group(rest, f"{where}", 0)
        return cls(authorities)

    def failures(self, issuer: str, claims: Mapping[str, Any]) -> list[str]:
        """Why ``claims`` (from a token issued by ``issuer``) may not have the key; empty means release."""
        group = self.authorities.get(issuer.rstrip("/"))
        if group is None:
            return [f"issuer {issuer!r} is not an authority of this key's release policy"]
        return group.failures(claims)


def _group(node: Mapping[str, Any], where: str, depth: int) -> ConditionGroup:
    if depth > _MAX_DEPTH:
        raise UsageError(f"{where}: nested deeper than {_MAX_DEPTH}")
    ((key, items),) = node.items()
    if not isinstance(items, list) or not items:
        raise UsageError(f"{where}.{key}: must be a non-empty list")
    return ConditionGroup(
        key == "allOf", tuple(_condition(c, f"{where}.{key}[{i}]", depth) for i, c in enumerate(items))
    )


def _condition(node: object, where: str, depth: int) -> ClaimCondition | ConditionGroup:
    if not isinstance(node, Mapping):
        raise UsageError(f"{where}: a condition must be an object")
    if "claim" not in node:
        if len(node) != 1 or next(iter(node)) not in ("allOf", "anyOf"):
            raise UsageError(f"{where}: expected {{'claim': ..., OPERATOR: value}} or allOf / anyOf")
        return _group(node, where, depth + 1)
    claim = node["claim"]
    ops = [k for k in node if k != "claim"]
    if not isinstance(claim, str) or not claim or len(ops) != 1:
        raise UsageError(f"{where}: needs a claim name and exactly one operator")
    try:
        op = Operator(ops[0])
    except ValueError:
        raise UsageError(f"{where}: unknown operator {ops[0]!r} ({', '.join(o.value for o in Operator)})") from None
    value = node[ops[0]]
    if not isinstance(value, str | int | float | bool):
        raise UsageError(f"{where}: the value of {op.value} must be a string, number or boolean")
    if op is Operator.EXISTS and not isinstance(value, bool):
        raise UsageError(f"{where}: exists takes true or false")
    return ClaimCondition(claim, op, value)
