"""firmware layer: what the secure processor's state is made of when it is sealed (``sp_seal``) and rebuilt.

The plaintext never leaves the SP except sealed.  It is a versioned JSON object:

```
{"format": 1, "next_handle": int, "next_import": int,
 "guests":  {handle: GUEST_CONTEXT hex (context.py's 0x240-byte layout: op-state, VMPCKs, seqnos, VMRK...)},
 "exports": {handle: {session_id, k_f, k_b, state, epoch, bundles_in_epoch, mb, iv, exported, start_token}},
 "imports": {ref: {session_id, handle, k_b, start_token, state}},
 "extra":   hex (the platform process's own bindings, opaque here, sealed with the rest)}
```

What comes back, and why:

- every guest context, byte for byte, so each guest has the same op-state, keys and sequence numbers;
- an export past set-up (LIVE_EXPORT, PAUSED_EXPORT, POST_EXPORT) with its keys and counters, but *detached*:
  its hardware binding and clean-page map are gone, so it may not seal another page, and the guest may not
  run (``can_run`` is False) until the host aborts it — locally before the start token, or with the
  destination's abort token after it — or finishes it with the commit receipt.  A guest that was mid-export
  never comes back runnable.  A prepared session (keys, no export yet) is dropped: its MA session is gone;
- a committed and activated import keeps what its commit receipt needs; a failed one stays failed.  An
  import in progress (MEMORY/STATE/POST_IMPORT) holds the only copy of a guest arriving, bound to hardware
  whose binding cannot be carried: the SP refuses to seal then (the host migrates nothing during maintenance).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.abi.wire import BundleType
from cvmotion.errors import CvmError, FirmwareError, FirmwareStatus, IntegrityError
from cvmotion.firmware.context import GuestContext, GuestState, OpState
from cvmotion.firmware.migration import MigrationFirmware, _Export, _Import
from cvmotion.firmware.opstate import ExportOpState, ExportSession, ImportOpState, ImportRules

if TYPE_CHECKING:
    from cvmotion.firmware.device import GuestHandle

__all__ = ["FORMAT", "SpSnapshot", "decode", "encode"]

FORMAT = 1
_IN_FLIGHT_IMPORT = frozenset({ImportOpState.MEMORY_IMPORT, ImportOpState.STATE_IMPORT, ImportOpState.POST_IMPORT})


class SpSnapshot:
    """The parts of one SP's state, in memory (the caller holds the SP's locks while it builds one)."""

    def __init__(
        self,
        *,
        next_handle: int,
        guests: dict[int, GuestContext],
        exports: dict[int, _Export],
        imports: dict[int, _Import],
        next_import: int,
        extra: bytes,
    ) -> None:
        self.next_handle = next_handle
        self.guests = guests
        self.exports = exports
        self.imports = imports
        self.next_import = next_import
        self.extra = extra


def check_sealable(guests: dict[int, GuestContext], mig: MigrationFirmware | None) -> None:
    """Refuse to seal in a state that cannot come back whole (a launch or an import half done)."""
    for handle, ctx in guests.items():
        if ctx.state is not GuestState.RUNNING:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"guest {handle} is still launching")
    if mig is not None:
        for ref, imp in mig._imports.items():
            if imp.rules.state in _IN_FLIGHT_IMPORT:
                raise FirmwareError(
                    FirmwareStatus.INVALID_GUEST_STATE, f"import {ref} is {imp.rules.state.value}: finish it first"
                )


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _unhex(value: Any) -> bytes | None:
    return None if value is None else bytes.fromhex(str(value))


def _export_record(exp: _Export) -> dict[str, Any]:
    s = exp.session
    return {
        "session_id": exp.session_id.hex(),
        "k_f": exp.k_f.hex(),
        "k_b": _hex(exp.k_b),
        "state": s.state.value,
        "epoch": s.epoch,
        "bundles_in_epoch": s.bundles_in_epoch,
        "mb": {str(k): v for k, v in s.mb_counters.items()},
        "iv": {str(k): v for k, v in s.iv_counters.items()},
        "exported": sorted(k.name for k in s.state_exported),
        "start_token": _hex(exp.start_token_digest),
    }


def _export_from(rec: dict[str, Any]) -> _Export:
    k_f = bytes.fromhex(rec["k_f"])
    session = ExportSession(
        state=ExportOpState(rec["state"]),
        epoch=int(rec["epoch"]),
        bundles_in_epoch=int(rec["bundles_in_epoch"]),
        mb_counters={int(k): int(v) for k, v in rec["mb"].items()},
        iv_counters={int(k): int(v) for k, v in rec["iv"].items()},
        state_exported={BundleType[n] for n in rec["exported"]},
    )
    return _Export(
        session_id=bytes.fromhex(rec["session_id"]),
        k_f=k_f,
        aead=AESGCM(k_f),
        k_b=_unhex(rec["k_b"]),
        session=session,
        start_token_digest=_unhex(rec["start_token"]),
        detached=True,
    )


def _import_record(imp: _Import) -> dict[str, Any]:
    return {
        "session_id": imp.session_id.hex(),
        "handle": imp.handle,
        "k_b": _hex(imp.k_b),
        "start_token": _hex(imp.start_token_digest),
        "state": imp.rules.state.value,
        "abort_token_issued": imp.rules.abort_token_issued,
    }


def _import_from(rec: dict[str, Any], guests: dict[int, GuestContext]) -> _Import:
    handle = rec["handle"]
    return _Import(
        session_id=bytes.fromhex(rec["session_id"]),
        hw=None,
        k_b=_unhex(rec["k_b"]),
        rules=ImportRules(state=ImportOpState(rec["state"]), abort_token_issued=bool(rec["abort_token_issued"])),
        ctx=None if handle is None else guests[int(handle)],
        handle=None if handle is None else _handle(int(handle)),
        start_token_digest=_unhex(rec["start_token"]),
    )


def _handle(value: int) -> GuestHandle:
    from cvmotion.firmware.device import GuestHandle

    return GuestHandle(value)


def encode(snap: SpSnapshot) -> bytes:
    exports = {
        str(h): _export_record(e) for h, e in snap.exports.items() if e.session.state is not ExportOpState.RUNNABLE
    }
    doc = {
        "format": FORMAT,
        "next_handle": snap.next_handle,
        "next_import": snap.next_import,
        "guests": {str(h): ctx.to_bytes().hex() for h, ctx in snap.guests.items()},
        "exports": exports,
        "imports": {str(r): _import_record(i) for r, i in snap.imports.items()},
        "extra": snap.extra.hex(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def decode(plaintext: bytes) -> SpSnapshot:
    """Rebuild the parts. The bytes were authenticated by the seal: a shape error here is still refused."""
    try:
        doc = json.loads(plaintext)
        if doc["format"] != FORMAT:
            raise IntegrityError()
        guests = {int(h): GuestContext.from_bytes(bytes.fromhex(c)) for h, c in doc["guests"].items()}
        exports = {int(h): _export_from(r) for h, r in doc["exports"].items()}
        imports = {int(r): _import_from(rec, guests) for r, rec in doc["imports"].items()}
        for h, exp in exports.items():
            if h not in guests or exp.session.state is ExportOpState.RUNNABLE:
                raise IntegrityError()
        for h, ctx in guests.items():
            # A context whose op-state says "exporting" without its export would be runnable by mistake.
            exporting = ctx.op_state in (OpState.LIVE_EXPORT, OpState.PAUSED_EXPORT, OpState.POST_EXPORT)
            if exporting != (h in exports):
                raise IntegrityError()
        return SpSnapshot(
            next_handle=int(doc["next_handle"]),
            guests=guests,
            exports=exports,
            imports=imports,
            next_import=int(doc["next_import"]),
            extra=bytes.fromhex(doc["extra"]),
        )
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, CvmError) as exc:
        raise IntegrityError() from exc
