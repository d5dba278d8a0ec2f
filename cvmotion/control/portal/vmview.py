"""control layer (portal): what a VM page shows — its attestation token and its moves, gathered from the API,
the VM's host and the events.

The attestation token is public (relying parties are given it), so the page reads it from the host that
runs the VM, after the API has confirmed the user may read the VM.  Its claims are decoded for display
only; relying parties verify the signature against the attestation service's JWKS.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from typing import Any

import httpx

from cvmotion.control.portal.common import host_json

__all__ = ["StatsCache", "attestation_of", "decode_claims", "moves_of"]

StatsCache = dict[tuple[str, str], dict[str, Any]]  # (source API URL, migration id) -> its settled status


def decode_claims(token: str) -> dict[str, Any]:
    """A JWT's payload (unverified: shown, never trusted); ``{}`` when it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, json.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


async def attestation_of(client: httpx.AsyncClient, vm: dict[str, Any], hosts: dict[str, Any]) -> dict[str, Any]:
    """The VM's current token as its host reports it (``{"unavailable": reason}`` when it cannot be read)."""
    view = vm.get("properties", {}).get("instanceView", {})
    host = hosts.get(view.get("host") or "")
    if host is None:
        return {"unavailable": "the VM has no host"}
    answer = await host_json(client, host["properties"]["apiUrl"], f"/v1/vms/{view.get('hostVmName')}/attestation")
    if answer is None:
        return {"unavailable": f"host {host['name']} did not answer"}
    if not answer.get("token"):
        return {"unavailable": "the VM's paravisor has not attested yet"}
    claims = decode_claims(str(answer["token"]))
    return {
        "jti": answer.get("jti"),
        "chip_id": answer.get("chip_id"),
        "tcb": answer.get("tcb"),
        "platform": answer.get("platform") or claims.get("x-cvmotion-platform"),
        "issued_at": answer.get("issued_at"),
        "reason": answer.get("reason"),
        "claims": claims,
    }


def _pma_index(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """postMigrationAttestation events by the operation of the move they follow (same transaction, in order)."""
    out: dict[str, dict[str, Any]] = {}
    last_op = ""
    for event in events:
        etype, data = str(event.get("type", "")), event.get("data") or {}
        if etype == "cvmotion.migration.completed":
            last_op = str(data.get("operation") or "")
        elif etype.endswith("postMigrationAttestation"):
            key = str(data.get("operation") or data.get("migrationId") or last_op or f"event-{event.get('id')}")
            out[key] = data
            last_op = ""
    return out


def _in_place(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory-preserving updates (the ladder's in-place fallback): the VM paused on its host, not moved."""
    out = []
    for i, event in enumerate(events):
        if event.get("type") != "cvmotion.maintenance.fallback":
            continue
        data = event.get("data") or {}
        nxt = events[i + 1] if i + 1 < len(events) else {}
        attest = (nxt.get("data") or {}) if str(nxt.get("type", "")).endswith("postMigrationAttestation") else {}
        out.append(
            {
                "at": event.get("time"), "from": data.get("from"), "to": data.get("from"),
                "method": data.get("method") or "MemoryPreservingUpdate", "status": "Succeeded",
                "step": "", "error": None, "total_ms": None, "downtime_ms": data.get("pauseMs"), "bytes": None,
                "round": None, "remaining": None, "mbps": None, "live_status": None,
                **_tokens(attest, {}, {}),
            }
        )  # fmt: skip
    return out


def _tokens(attest: dict[str, Any], source: dict[str, Any], dest: dict[str, Any]) -> dict[str, Any]:
    """The token (id, chip, TCB) before and after a move; without the event, the hosts' chips."""
    return {
        "token_before": _first(attest, "old.tokenId", "oldTokenId"),
        "token_after": _first(attest, "new.tokenId", "newTokenId"),
        "chip_before": _first(attest, "old.chipId", "oldChipId") or source.get("properties", {}).get("chipId"),
        "chip_after": _first(attest, "new.chipId", "newChipId") or dest.get("properties", {}).get("chipId"),
        "tcb_before": _first(attest, "old.tcb", "oldTcb"),
        "tcb_after": _first(attest, "new.tcb", "newTcb"),
    }


def _first(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, ""):
            return node
    return None


_SETTLED = ("completed", "failed", "cancelled")
_CACHE_MAX = 2048


async def _stats(client: httpx.AsyncClient, cache: StatsCache, base: str, mig_id: str) -> dict[str, Any] | None:
    """A migration's status from its source; a settled one is remembered (it never changes again)."""
    key = (base, mig_id)
    if key in cache:
        return cache[key]
    stats = await host_json(client, base, f"/v1/migrations/{mig_id}")
    if stats is not None and stats.get("status") in _SETTLED:
        if len(cache) >= _CACHE_MAX:
            cache.pop(next(iter(cache)))
        cache[key] = stats
    return stats


async def moves_of(
    client: httpx.AsyncClient,
    ops: list[dict[str, Any]],
    hosts: dict[str, Any],
    events: list[dict[str, Any]],
    cache: StatsCache | None = None,
) -> list[dict[str, Any]]:
    """The VM's migrations, newest first: when, from -> to, method, times, bytes, and the token before/after."""
    migrations = [op for op in ops if op.get("name") == "Migrate"][:20]
    pma = _pma_index(events)
    migrated = {
        str((e.get("data") or {}).get("migration")): e.get("data") or {}
        for e in events
        if str(e.get("type", "")).endswith("VmMigrated")
    }

    async def one(op: dict[str, Any]) -> dict[str, Any]:
        source = hosts.get(op.get("host") or "")
        mig_id = op.get("migrationId")
        stats = None
        if source is not None and mig_id:
            stats = await _stats(client, {} if cache is None else cache, source["properties"]["apiUrl"], mig_id)
        stats = stats or {}
        recorded = migrated.get(str(mig_id), {})
        attest = pma.get(str(op.get("id"))) or pma.get(str(mig_id)) or {}
        dest = hosts.get(op.get("targetHost") or "")
        ram = stats.get("ram") or {}
        return {
            "at": op.get("createdAt"),
            "from": op.get("host"),
            "to": op.get("targetHost"),
            "method": "LiveMigration",
            "status": op.get("status"),
            "step": op.get("step"),
            "error": (op.get("error") or {}).get("message"),
            "total_ms": stats.get("total-time", recorded.get("total-time")),
            "downtime_ms": stats.get("downtime", recorded.get("downtime")),
            "bytes": ram.get("transferred"),
            "round": ram.get("dirty-sync-count"),
            "remaining": ram.get("remaining"),
            "mbps": ram.get("mbps"),
            "live_status": stats.get("status"),
            **_tokens(attest, source or {}, dest or {}),
        }

    moves = list(await asyncio.gather(*(one(op) for op in migrations))) + _in_place(events)
    # Newest first; operation times are epoch seconds, event times RFC 3339: compare as epoch seconds.
    return sorted(moves, key=lambda m: _epoch(m["at"]), reverse=True)


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
