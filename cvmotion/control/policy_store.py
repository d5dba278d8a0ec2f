"""control layer: policy definitions and assignments in the database, and judging a request against them.

Definitions are compiled once per (name, document) and cached; assignments are read per request (a
replica sees another's new assignment at once).  ``judge`` raises ``RequestDisallowedByPolicy`` for the
first matching ``deny`` (by assignment id, so the answer is deterministic) and records ``audit``
results as compliance rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.orm import Session

from cvmotion.control.builtins import BUILTINS
from cvmotion.control.db import Assignment, ComplianceResult, Definition
from cvmotion.control.errors import InvalidRequest, RequestDisallowedByPolicy
from cvmotion.control.policy import (
    CompiledDefinition,
    Effect,
    Verdict,
    compile_definition,
    evaluate,
    resolve_parameters,
)
from cvmotion.errors import Conflict, NotFound

__all__ = ["ASSIGNMENT_TYPE", "PolicyStore", "parse_scope", "scope_covers"]

ASSIGNMENT_TYPE = "Microsoft.Authorization/policyAssignments"
DEFINITION_TYPE = "Microsoft.Authorization/policyDefinitions"


Judged = tuple[str, CompiledDefinition, Mapping[str, Any]]  # (assignment id, definition, parameters)
_Scoped = tuple[tuple[Any, ...], list[tuple[str, Judged]]]  # (version, [(scope, judged)])


_ASSIGNMENTS: Table = Assignment.__table__  # type: ignore[assignment]
_VERSION = select(func.count(), func.max(_ASSIGNMENTS.c.created_at)).where(
    _ASSIGNMENTS.c.scope.like(bindparam("prefix"))
)


def scope_covers(scope: str, resource_id: str) -> bool:
    scope, resource_id = scope.lower().rstrip("/"), resource_id.lower()
    return resource_id == scope or resource_id.startswith(scope + "/")


class PolicyStore:
    def __init__(self) -> None:
        self._compiled: dict[tuple[str, str], CompiledDefinition] = {}
        self._scopes: dict[str, _Scoped] = {}
        self._lock = threading.Lock()

    def compiled(self, row: Definition) -> CompiledDefinition:
        key = (row.name, json.dumps(row.document, sort_keys=True))
        with self._lock:
            found = self._compiled.get(key)
        if found is None:
            found = compile_definition(row.name, row.document)
            with self._lock:
                self._compiled[key] = found
        return found

    # -- definitions -------------------------------------------------------------------------------

    def install_builtins(self, session: Session) -> None:
        for name, document in BUILTINS.items():
            row = session.get(Definition, name)
            if row is None:
                session.add(Definition(name=name, document=document, builtin=True))
            elif row.document != document:
                row.document = document

    def put_definition(self, session: Session, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        compile_definition(name, document)  # refuses unknown aliases, operators, effects before storing
        row = session.get(Definition, name)
        if row is not None and row.builtin:
            raise Conflict(f"policy definition {name!r} is built in and cannot be changed")
        if row is None:
            session.add(Definition(name=name, document=dict(document), builtin=False))
        else:
            row.document = dict(document)
        session.flush()
        return self.definition_resource(self._definition(session, name))

    def _definition(self, session: Session, name: str) -> Definition:
        row = session.get(Definition, name)
        if row is None:
            raise NotFound(f"policy definition {name!r} does not exist")
        return row

    def definition_resource(self, row: Definition) -> dict[str, Any]:
        props = dict(row.document.get("properties", row.document))
        props["policyType"] = "BuiltIn" if row.builtin else "Custom"
        return {
            "id": f"/providers/{DEFINITION_TYPE}/{row.name}",
            "name": row.name,
            "type": DEFINITION_TYPE,
            "properties": props,
        }

    def list_definitions(self, session: Session) -> list[dict[str, Any]]:
        rows = session.scalars(select(Definition).order_by(Definition.name))
        return [self.definition_resource(r) for r in rows]

    # -- assignments -------------------------------------------------------------------------------

    def put_assignment(
        self, session: Session, scope: str, name: str, definition: str, parameters: Mapping[str, Any]
    ) -> dict[str, Any]:
        compiled = self.compiled(self._definition(session, definition))
        resolve_parameters(compiled, parameters)
        assignment_id = f"{scope}/providers/{ASSIGNMENT_TYPE}/{name}"
        row = session.get(Assignment, assignment_id)
        if row is None:
            row = Assignment(id=assignment_id, name=name, scope=scope, definition=definition)
            session.add(row)
        row.definition = definition
        row.parameters = dict(parameters)
        row.created_at = time.time()  # the last write: replicas' cached compiled sets compare it
        session.flush()
        return self.assignment_resource(row)

    def assignment_resource(self, row: Assignment) -> dict[str, Any]:
        return {
            "id": row.id,
            "name": row.name,
            "type": ASSIGNMENT_TYPE,
            "properties": {
                "scope": row.scope,
                "policyDefinitionId": f"/providers/{DEFINITION_TYPE}/{row.definition}",
                "parameters": {k: (v if isinstance(v, dict) else {"value": v}) for k, v in row.parameters.items()},
            },
        }

    def list_assignments(self, session: Session, scope: str | None) -> list[dict[str, Any]]:
        rows = session.scalars(select(Assignment).order_by(Assignment.id))
        return [self.assignment_resource(r) for r in rows if scope is None or scope_covers(scope, r.scope)]

    def delete_assignment(self, session: Session, scope: str, name: str) -> None:
        row = session.get(Assignment, f"{scope}/providers/{ASSIGNMENT_TYPE}/{name}")
        if row is None:
            raise NotFound(f"policy assignment {name!r} does not exist at {scope}")
        session.delete(row)

    # -- judging -----------------------------------------------------------------------------------

    def in_scope(self, session: Session, resource_id: str) -> list[tuple[str, CompiledDefinition, Mapping[str, Any]]]:
        """The assignments whose scope covers ``resource_id``, compiled, with their parameters resolved.

        The compiled set of a subscription is cached and re-read only when the subscription's assignments
        change (their count or latest write time: one aggregate query), so another replica's new
        assignment still applies at once.
        """
        sub_scope = "/".join(resource_id.split("/")[:3])  # /subscriptions/{sub}
        prefix = {"prefix": f"{sub_scope}%"}
        version = tuple(session.connection().execute(_VERSION, prefix).one())  # Core: it runs on every request
        with self._lock:
            cached = self._scopes.get(sub_scope)
        if cached is None or cached[0] != version:
            rows = session.execute(
                select(Assignment, Definition)
                .join(Definition, Definition.name == Assignment.definition)
                .where(Assignment.scope.like(prefix["prefix"]))
                .order_by(Assignment.id)
            )
            entries: list[tuple[str, Judged]] = []
            for row, definition in rows:
                compiled = self.compiled(definition)
                entries.append((row.scope, (row.id, compiled, resolve_parameters(compiled, row.parameters))))
            fresh: _Scoped = (version, entries)
            with self._lock:
                self._scopes[sub_scope] = fresh
            cached = fresh
        return [entry for scope, entry in cached[1] if scope_covers(scope, resource_id)]

    def judge(
        self,
        session: Session,
        doc: Mapping[str, Any],
        *,
        record: bool = True,
        assignments: list[tuple[str, CompiledDefinition, Mapping[str, Any]]] | None = None,
    ) -> list[Verdict]:
        """Evaluate ``doc`` (an ARM resource body with id/name/type); raise on the first matching deny."""
        if assignments is None:
            assignments = self.in_scope(session, str(doc["id"]))
        verdicts = evaluate(assignments, doc)
        for verdict in verdicts:
            if verdict.effect is Effect.DENY and verdict.matched:
                name = verdict.assignment.rsplit("/", 1)[-1]
                raise RequestDisallowedByPolicy(
                    f"Resource '{doc['name']}' was disallowed by policy assignment '{name}'"
                    f" (definition '{verdict.definition}', scope {verdict.assignment.split('/providers/')[0]})",
                    assignment=verdict.assignment,
                    definition=verdict.definition,
                )
            if record and verdict.effect is Effect.AUDIT:
                session.add(
                    ComplianceResult(
                        assignment=verdict.assignment,
                        resource_id=str(doc["id"]),
                        compliant=not verdict.matched,
                        effect=verdict.effect.value,
                    )
                )
        return verdicts


def parse_scope(scope: str) -> str:
    parts = scope.rstrip("/").split("/")
    ok = (len(parts) == 3 and parts[1] == "subscriptions") or (
        len(parts) == 5 and parts[1] == "subscriptions" and parts[3].lower() == "resourcegroups"
    )
    if not ok or parts[0] != "":
        raise InvalidRequest(f"scope {scope!r}: expected /subscriptions/SUB or /subscriptions/SUB/resourceGroups/RG")
    return scope.rstrip("/")
