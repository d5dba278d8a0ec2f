"""control layer (portal): what a VM page shows — its attestation token and its moves, gathered from the API,
the VM's host and the events.

The attestation token is public (relying parties are given it), so the page reads it from the host that
runs the VM, after the API has confirmed the user may read the VM.  Its claims are decoded for display
only; relying parties verify the signature against the attestation service's JWKS.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx

from cvmotion.control.portal.common import host_json

__all__ = ["attestation_of", "decode_claims", "moves_of"]


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
    """postMigrationAttestation events by migration id (and by destination host as a fallback key)."""
    out: dict[str, dict[str, Any]] = {}
    for event in events:
        if not str(event.get("type", "")).endswith("postMigrationAttestation"):
            continue
        data = event.get("data") or {}
        for key in ("migrationId", "migration", "operation"):
            if data.get(key):
                out[str(data[key])] = data
    return out


def _first(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, ""):
            return node
    return None


async def moves_of(
    client: httpx.AsyncClient, ops: list[dict[str, Any]], hosts: dict[str, Any], events: list[dict[str, Any]]
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
            stats = await host_json(client, source["properties"]["apiUrl"], f"/v1/migrations/{mig_id}")
        stats = stats or {}
        recorded = migrated.get(str(mig_id), {})
        attest = pma.get(str(mig_id)) or pma.get(str(op.get("id"))) or {}
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
            "token_before": _first(attest, "old.tokenId", "oldTokenId", "old.jti", "before.jti"),
            "token_after": _first(attest, "new.tokenId", "newTokenId", "new.jti", "after.jti"),
            "chip_before": _first(attest, "old.chipId", "oldChipId", "before.chipId")
            or (source or {}).get("properties", {}).get("chipId"),
            "chip_after": _first(attest, "new.chipId", "newChipId", "after.chipId")
            or (dest or {}).get("properties", {}).get("chipId"),
            "tcb_before": _first(attest, "old.tcb", "oldTcb", "before.tcb"),
            "tcb_after": _first(attest, "new.tcb", "newTcb", "after.tcb"),
        }

    return list(await asyncio.gather(*(one(op) for op in migrations)))
