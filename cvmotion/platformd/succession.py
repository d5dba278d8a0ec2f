"""platformd: the platform process across a memory-preserving update — its SP state sealed, then reopened.

The host asks the running platform to ``seal_state``: the SP seals every guest context (``firmware.sp_seal``)
together with this process's own bindings, which no host command may set::

    {"vms": {name: {"handle": int | null, "token": hex, "claimed": bool}}, "ma": int | null}

``handle`` is the guest the VM's hardware runs (the SP bound it at launch or import); ``token`` is the random
hardware token this platform gave the VM process at its first ``vm_attach``, which only that process holds
(in memory).  The file ``sp-state.sealed`` is ciphertext; the platform then exits.  The next platform
process (``--succeed FD``, started before the VMs paused: ``host.succession``) opens it once, and a VM process
that re-attaches with its token gets its guest back; any other process attaching under that name gets claimed
hardware and no guest.  The old MA's context is decommissioned: the new process launches its own MA.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import selectors
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmotion.errors import IntegrityError, UsageError
from cvmotion.files import PRIVATE, write_atomic
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.sp_seal import SEALED_FILE

__all__ = ["Bindings", "RestoredVm", "SuccessorLink", "open_sealed_state", "seal_bindings", "token_matches"]

log = logging.getLogger("cvmotion.platformd")

TOKEN_SIZE = 32
REFUSED_SUFFIX = ".refused"


@dataclass(frozen=True, slots=True)
class RestoredVm:
    handle: GuestHandle | None  # the guest its hardware runs (None: attached, not launched yet)
    token: bytes
    claimed: bool = True


@dataclass(frozen=True, slots=True)
class Bindings:
    vms: dict[str, RestoredVm]
    ma: GuestHandle | None

    def to_bytes(self) -> bytes:
        vms = {
            name: {"handle": vm.handle, "token": vm.token.hex(), "claimed": vm.claimed} for name, vm in self.vms.items()
        }
        return json.dumps({"vms": vms, "ma": self.ma}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Bindings:
        try:
            doc = json.loads(raw)
            vms = {
                str(name): RestoredVm(
                    None if vm["handle"] is None else GuestHandle(int(vm["handle"])),
                    bytes.fromhex(vm["token"]),
                    bool(vm["claimed"]),
                )
                for name, vm in doc["vms"].items()
            }
            return cls(vms, None if doc["ma"] is None else GuestHandle(int(doc["ma"])))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError() from exc  # sealed with the SP state: a shape error is still a refusal


def seal_bindings(sp: SecureProcessor, bindings: Bindings, data_dir: Path) -> int:
    """Seal the SP state with ``bindings`` into ``data_dir/sp-state.sealed``; the SP refuses everything after."""
    blob = sp.seal_state(bindings.to_bytes())
    write_atomic(data_dir / SEALED_FILE, blob, mode=PRIVATE)
    return len(blob)


def open_sealed_state(data_dir: Path, endorsements: Any) -> tuple[SecureProcessor, Bindings] | None:
    """The SP a predecessor sealed, if there is a sealed state; None when there is none.

    A sealed state this chip refuses (replayed, tampered, forged, opened already) is kept aside as
    ``sp-state.sealed.refused`` and the platform starts with no guests: the VMs it held stay stopped.
    """
    from cvmotion.firmware.chip import Chip

    path = data_dir / SEALED_FILE
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        sp, extra = SecureProcessor.restore_sealed(Chip.load(data_dir), blob, endorsements=endorsements)
        bindings = Bindings.from_bytes(extra)
    except IntegrityError:
        log.error("the sealed secure-processor state was refused: starting with no guests")
        os.replace(path, path.with_name(SEALED_FILE + REFUSED_SUFFIX))
        return None
    path.unlink()
    return sp, bindings


def token_matches(expected: bytes, given: object) -> bool:
    if not isinstance(given, str) or len(given) != 2 * TOKEN_SIZE:
        return False
    try:
        raw = bytes.fromhex(given)
    except ValueError:
        return False
    return hmac.compare_digest(expected, raw)


@dataclass
class SuccessorLink:
    """A platform process started ahead of a hand-over (``--succeed FD``): it says "R" once loaded, waits for
    "G", waits for its predecessor to exit, and says "S" once it serves."""

    sock: socket.socket

    @classmethod
    def from_fd(cls, fd: int) -> SuccessorLink:
        return cls(socket.socket(fileno=fd))

    def ready_and_wait(self, predecessor: int | None, timeout: float = 600.0) -> None:
        self.sock.sendall(b"R")
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            if not sel.select(timeout) or self.sock.recv(1) != b"G":
                raise UsageError("the hand-over was abandoned")
        if predecessor is not None:
            deadline = time.monotonic() + 30
            while not _gone(predecessor):
                if time.monotonic() > deadline:
                    raise UsageError(f"the predecessor platform (pid {predecessor}) did not exit")
                time.sleep(0.002)

    def serving(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"S")
            self.sock.close()


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")
