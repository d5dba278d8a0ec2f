"""attestation layer: the paravisor's attestation client — per CVM, inside the TEE (like Azure's VMPL0 paravisor).

It attests the CVM at launch and again after every live migration, holds the current token and hands it to
the guest (a cvm-io mailbox blob the guest fetches), so the guest needs no agent of its own.  Optionally it
presents each token to a key-release service and keeps the released data key for the guest.

How it reaches the secure processor: SNP guest messages under VMPCK0, relayed by the (untrusted) host.
VMPCK0 comes from the SNP secrets page in guest memory.  Its own state — the last message sequence number,
the current token and the chip it was issued for — lives in a page of guest-private memory
(``STATE_GPA``), so it migrates with the VM, and the paravisor on the destination continues the same
VMPCK0 sequence (the firmware carries the sequence numbers in the mutable-state bundle).

State page layout (little-endian)::

    0x000 "CVMPARA1" magic      0x008 u64 last_seqno     0x010 u32 token_len   0x014 u32 key_len
    0x018 64 bytes chip_id of the last report            0x058 48 bytes reported TCB text (ASCII, zero padded)
    0x088 32 bytes data key (if released)                0x0A8 32 bytes reserved  0x0C8 token (<= 3896 bytes)

Imports only abi and this package: the same code would run in a real CVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import AttestationReport, Product
from cvmotion.attestation.token import decode_unverified
from cvmotion.errors import CvmError, UsageError

__all__ = ["STATE_GPA", "Attestation", "Paravisor", "ParavisorHost"]

STATE_GPA = 0x6000
SECRETS_GPA = 0x7000
VMPCK0_OFFSET = 0x20
_MAGIC = b"CVMPARA1"
_HEAD = struct.Struct("<8sQII64s48s32s32s")
_TOKEN_OFFSET = _HEAD.size
_PAGE = 4096
MAX_TOKEN = _PAGE - _TOKEN_OFFSET


class ParavisorHost(Protocol):
    """What the VM process provides: guest memory, the host relay, endpoints, the guest mailbox, events."""

    def read_guest(self, gpa: int, length: int) -> bytes: ...

    def write_guest(self, gpa: int, data: bytes) -> None: ...

    def relay_guest_request(self, message: bytes) -> bytes: ...

    def endorsements(self) -> bytes | None: ...

    def publish_token(self, token: bytes) -> None: ...

    def emit(self, kind: str, data: dict[str, Any]) -> None: ...


AttestFn = Callable[[bytes, bytes | None, bytes], str]  # (report, chain PEM, runtime data JSON) -> JWT
ReleaseFn = Callable[[str], bytes]  # token -> data key


@dataclass(frozen=True, slots=True)
class Attestation:
    token: str
    jti: str
    chip_id: str
    tcb: str
    platform: str
    issued_at: float
    reason: str


class Paravisor:
    """One CVM's paravisor. Thread-safe: one attestation at a time."""

    def __init__(
        self,
        host: ParavisorHost,
        vm_name: str,
        attest: AttestFn,
        *,
        release_key: ReleaseFn | None = None,
        runtime_data: Callable[[], bytes] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._vm = vm_name
        self._attest = attest
        self._release_key = release_key
        self._runtime_data = runtime_data
        self._clock = clock
        self._lock = threading.Lock()
        self.current: Attestation | None = None

    # -- state in guest memory ---------------------------------------------------------------------

    def _load(self) -> tuple[int, bytes, str, bytes, bytes]:
        raw = self._host.read_guest(STATE_GPA, _PAGE)
        magic, seqno, token_len, key_len, chip_id, tcb, key, _ = _HEAD.unpack_from(raw)
        if magic != _MAGIC:
            return 0, b"", "", b"", b""
        if token_len > MAX_TOKEN or key_len > 32:
            raise UsageError("paravisor state page is damaged")
        token = raw[_TOKEN_OFFSET : _TOKEN_OFFSET + token_len]
        return int(seqno), chip_id, tcb.rstrip(b"\0").decode("ascii", "replace"), key[:key_len], token

    def _save(self, seqno: int, chip_id: bytes, tcb: str, key: bytes, token: bytes) -> None:
        if len(token) > MAX_TOKEN:
            raise UsageError(f"attestation token of {len(token)} bytes does not fit the state page")
        head = _HEAD.pack(
            _MAGIC, seqno, len(token), len(key), chip_id.ljust(64, b"\0"), tcb.encode()[:48], key.ljust(32, b"\0"), b""
        )
        self._host.write_guest(STATE_GPA, head + token)

    # -- attestation -------------------------------------------------------------------------------

    def attest(self, reason: str) -> Attestation:
        """Get a fresh report through a guest message, exchange it for a token, publish it to the guest."""
        with self._lock:
            seqno, old_chip, old_tcb, key, old_token = self._load()
            vmpck0 = self._host.read_guest(SECRETS_GPA + VMPCK0_OFFSET, 32)
            runtime = (
                self._runtime_data()
                if self._runtime_data
                else json.dumps(
                    {"vm": self._vm, "reason": reason, "nonce": os.urandom(16).hex()}, separators=(",", ":")
                ).encode()
            )
            report_data = hashlib.sha256(runtime).digest() + bytes(32)  # MAA's binding of runtime data
            channel = GuestChannel(vmpck0, last_seqno=seqno)
            response = self._host.relay_guest_request(channel.report_request(report_data))
            payload = channel.open_response(response)
            # The firmware consumed two sequence numbers; record them before anything else can fail.
            self._save(channel.last_seqno, old_chip, old_tcb, key, old_token)
            rsp = ReportRsp.from_bytes(payload)
            if rsp.status != 0:
                raise UsageError(f"the secure processor refused the report request (status {rsp.status:#x})")
            report = AttestationReport.from_bytes(rsp.report)
            product = report.cpuid_product or Product.GENOA
            tcb = report.tcb(report.reported_tcb, product).describe()
            token = self._attest(rsp.report, self._host.endorsements(), runtime)
            if self._release_key is not None:
                key = self._release_key(token)[:32]
            self._save(channel.last_seqno, report.chip_id, tcb, key, token.encode())
            self._host.publish_token(token.encode())
            _, claims = decode_unverified(token)
            result = Attestation(
                token=token,
                jti=str(claims.get("jti", "")),
                chip_id=report.chip_id.hex(),
                tcb=tcb,
                platform=str(claims.get("x-cvmotion-platform", "")),
                issued_at=self._clock(),
                reason=reason,
            )
            self.current = result
            return result

    def boot(self) -> Attestation:
        attestation = self.attest("launch")
        self._host.emit(
            "Attested",
            {"vm": self._vm, "jti": attestation.jti, "chip_id": attestation.chip_id, "tcb": attestation.tcb,
             "platform": attestation.platform, "key_released": self.data_key_fingerprint() is not None},
        )  # fmt: skip
        return attestation

    def after_migration(self, resumed_at: float) -> Attestation:
        """Re-attest on the destination; the event carries old and new chip, TCB and token ids."""
        _, old_chip, old_tcb, old_key, old_token = self._load()
        old_claims: dict[str, Any] = {}
        if old_token:
            try:
                _, old_claims = decode_unverified(old_token.decode())
            except CvmError:
                old_claims = {}
        attestation = self.attest("post-migration")
        new_key = self.data_key()
        self._host.emit(
            "PostMigrationAttestation",
            {
                "vm": self._vm,
                "old_chip_id": old_chip.hex(),
                "new_chip_id": attestation.chip_id,
                "old_tcb": old_tcb,
                "new_tcb": attestation.tcb,
                "old_token_id": old_claims.get("jti"),
                "new_token_id": attestation.jti,
                "old_token_expires": old_claims.get("exp"),
                "resumed_at": resumed_at,
                "attested_at": attestation.issued_at,
                "latency_ms": round((attestation.issued_at - resumed_at) * 1000, 1),
                "data_key_unchanged": bool(old_key) and old_key == new_key,
                "platform": attestation.platform,
            },
        )
        return attestation

    def token(self) -> str | None:
        return self.current.token if self.current else None

    def data_key(self) -> bytes | None:
        key = self._load()[3]
        return key or None

    def data_key_fingerprint(self) -> str | None:
        key = self.data_key()
        return hashlib.sha256(key).hexdigest()[:16] if key else None
