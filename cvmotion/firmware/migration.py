"""firmware layer: the secure processor's migration commands: export and import of a guest, sealed bundles.

The untrusted host drives these commands and carries their output; the firmware alone holds the session keys
and the plaintext.  Keys come from the migration agents (MA, trusted, inside the TEE) through ``ma_*`` calls,
which the host-facing command interface never exposes.

Source::

    ma_export_prepare(h, session_id) -> K_f      (MA; K_f travels to the peer MA inside RA-TLS)
    ma_export_install_backward_key(h, K_b)       (MA)
    export_start(h, hw)                          RUNNABLE -> LIVE_EXPORT
    export_immutable(h, stream) -> bundle        the guest context, sealed
    export_memory(h, stream, gfns, out) -> n     pages read from guest memory, sealed into ``out``
    export_epoch_token(h, stream) -> bundle
    export_pause(h)                              LIVE_EXPORT -> PAUSED_EXPORT (the VM is paused and held)
    export_switchover(h, stream)                 LIVE_EXPORT -> POST_EXPORT in one operation: pause, hold,
                                                 the last pages, state and start token (or PAUSED_EXPORT and
                                                 the pages left, when they need more than one bundle)
    export_state(h, stream, kind) -> bundle      vCPU / device / mutable guest state, sealed
    export_start_token(h, stream) -> bundle      PAUSED_EXPORT -> POST_EXPORT: only if every page is clean
    export_abort(h)                              before the start token: back to RUNNABLE
    export_abort_with_token(h, token)            a frozen source resumes only with the destination's token
    export_finish(h, receipt)                    POST_EXPORT -> decommissioned: only with the destination's
                                                 commit receipt (MAC under K_b over the session and start token)

Destination::

    import_prepare(session_id, hw) -> h          a context waiting for keys and the immutable state
    ma_import_install_forward_key(h, K_f)        (MA)
    ma_import_generate_backward_key(h) -> K_b    (MA)
    import_bundle(h, bundle)                     any bundle of any stream; immutable state first
    import_abort(h) -> abort token               only before commit; the context becomes FAILED for ever
    import_activate(h)                           after the start token: restores vCPU state, RUNNABLE
    import_commit_receipt(h) -> receipt          after the start token: the source's proof of commit

Every import failure is the same opaque ``IntegrityError`` and makes the import context FAILED.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.abi import wire
from cvmotion.abi.gfns import sorted_union
from cvmotion.abi.wire import BundleHeader, BundleType, EntryFlag
from cvmotion.errors import AbiError, CvmError, FirmwareError, FirmwareStatus, IntegrityError
from cvmotion.firmware.context import GuestContext, OpState
from cvmotion.firmware.mig_pages import gcm_ivs, memory_entries, page_aads, page_reads, page_views
from cvmotion.firmware.native_gcm import buffer_address
from cvmotion.firmware.native_gcm import load as load_native_gcm
from cvmotion.firmware.opstate import STATE_BUNDLES, ExportOpState, ExportSession, ImportOpState, ImportRules

if TYPE_CHECKING:
    from cvmotion.firmware.device import GuestHandle, SecureProcessor

__all__ = [
    "KEY_SIZE",
    "GuestHardware",
    "GuestMemoryAccess",
    "MigrationFirmware",
    "Switchover",
]

KEY_SIZE = 32
PAGE = wire.PAGE_SIZE
_ZERO_PAGE = bytes(PAGE)
_UNIT = PAGE + wire.TAG_SIZE  # one sealed page: ciphertext || tag
# The order the state bundles are sealed and sent in (the destination imports them in any order before the token).
STATE_ORDER = (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE)
_MUTABLE = struct.Struct("<4Q")
_ABORT_REASON_IMPORT_FAILED = 1


class GuestMemoryAccess(Protocol):
    """Guest RAM as the secure processor reaches it (the real one reads DRAM; ours maps the VM's memfd)."""

    def view(self, gpa: int, length: int) -> memoryview: ...

    def populated_ranges(self, skip: Sequence[tuple[int, int]] = ()) -> Sequence[tuple[int, int]]:
        """GPA ranges ``(gpa, length)`` of populated memory; ``skip``: ranges known populated, not looked at again."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``."""
        ...

    def write_pages(self, gfns: npt.NDArray[np.uint64], data: bytes | bytearray | memoryview) -> None:
        """Store whole pages, ``data`` in ``gfns`` order (an import writes guest memory only through this)."""
        ...

    def page_offsets(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Where each GFN's page lies in the memory file; a ``CvmError`` if one is not guest RAM."""
        ...

    def pages(self) -> npt.NDArray[np.uint64]:
        """Guest memory as a ``(pages, 512)`` array of words, indexed by ``page_offsets() // 4096`` (no copy)."""
        ...


class GuestHardware(Protocol):
    """The rest of the emulated hardware of one VM, as the secure processor needs it during migration."""

    @property
    def memory(self) -> GuestMemoryAccess: ...

    @property
    def gfn_limit(self) -> int:
        """One past the highest guest frame number."""
        ...

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        """GFNs written since the firmware last asked (``fresh``: also harvest the hardware log now)."""
        ...

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        """Confirm the vCPUs are paused and keep them so until the firmware allows them to run; then harvest the
        hardware log: the GFNs written since the firmware last asked (``take_dirty(fresh=True)``, in the same
        round trip to the hardware)."""
        ...

    def capture_state(self) -> tuple[bytes, bytes]:
        """(vCPU state, device state) of the paused VM."""
        ...

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        """``capture_state()`` then ``take_dirty(fresh=True)``, in one round trip to the hardware."""
        ...

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        """Pause the vCPUs and hold them (``hold_paused``), then ``capture_and_harvest``: one round trip."""
        ...

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        """Load the imported state; ``run``: then release the vCPUs (the firmware is activating the guest)."""
        ...


@dataclass(slots=True)
class _Export:
    session_id: bytes
    k_f: bytes
    aead: AESGCM
    k_b: bytes | None = None
    hw: GuestHardware | None = None
    session: ExportSession = field(default_factory=ExportSession)
    clean: npt.NDArray[np.bool_] | None = None
    # Guest memory populated when the export started (the SP's own look at the memfd, not the host's word): the
    # start token needs every page of these, and of any populated since, exported after its last write.
    populated: list[tuple[int, int]] = field(default_factory=list)
    captured: tuple[bytes, bytes] | None = None  # (vCPU, device) state, taken once: the VM stays held paused
    start_token_digest: bytes | None = None  # what a commit receipt must name: the start token this SP emitted
    # Restored from a sealed SP state (sp_snapshot): the hardware binding and the clean-page map did not survive,
    # so nothing more may be sealed and the guest may not run until the export is aborted or finished.
    detached: bool = False

    def populated_now(self) -> list[tuple[int, int]]:
        """Every range populated at the export's start or since (a page only leaves the memfd by a punched hole, and
        then it is still asked for: stricter, never looser); only the gaps of ``populated`` are looked at again."""
        assert self.hw is not None
        return self.populated + list(self.hw.memory.populated_ranges(skip=self.populated))


@dataclass(frozen=True, slots=True)
class Switchover:
    """``export_switchover``'s answer: the final bundles (the last pages' memory bundle, if any, the state bundles,
    the start token) and how many pages went in them; or, when too many pages were left for one bundle, those
    pages (``pending``) and no bundles: the export is held paused (PAUSED_EXPORT), as after ``export_pause``."""

    bundles: list[bytes] = field(default_factory=list)
    pages: int = 0
    pending: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))


@dataclass(slots=True)
class _Import:
    session_id: bytes
    hw: GuestHardware | None  # None once restored from a sealed SP state (only receipts are asked then)
    k_f: bytes | None = None
    aead: AESGCM | None = None
    k_b: bytes | None = None
    rules: ImportRules = field(default_factory=ImportRules)
    ctx: GuestContext | None = None
    handle: GuestHandle | None = None
    states: dict[BundleType, bytes] = field(default_factory=dict)
    start_token_digest: bytes | None = None  # the start token that committed this import
    # Bundles' pages are opened into a scratch buffer each (one per bundle being written: the streams' imports
    # write guest memory in parallel, outside the firmware's lock) and written from there.
    scratch_free: list[memoryview] = field(default_factory=list)
    writing: int = 0  # memory bundles verified and accepted whose pages are still being written

    # ImportRules.claim_gpa for whole bundles: one flag per guest page, for the epoch ``claimed_epoch``.
    claimed: npt.NDArray[np.bool_] | None = None
    claimed_epoch: int = -1

    def take_scratch(self) -> memoryview:
        if self.scratch_free:
            return self.scratch_free.pop()
        return memoryview(bytearray(wire.MAX_PAGES_PER_BUNDLE * PAGE))

    def claim_gfns(self, gfns: npt.NDArray[np.uint64], gfn_limit: int) -> bool:
        """Claim every GFN of a bundle for the current epoch: False if one was claimed in it already, or twice here.

        The flags are allocated again (calloc: untouched pages cost nothing) when the epoch moved on, as
        ``ImportRules.close_epoch`` clears its set.
        """
        if self.claimed is None or self.claimed_epoch != self.rules.epoch:
            self.claimed = np.zeros(gfn_limit, dtype=np.bool_)
            self.claimed_epoch = self.rules.epoch
        rows = gfns.astype(np.intp)
        if self.claimed[rows].any():
            return False
        ordered = np.sort(rows)
        if (ordered[1:] == ordered[:-1]).any():
            return False
        self.claimed[rows] = True
        return True


_Write = tuple[npt.NDArray[np.uint64], memoryview]  # a verified bundle's GFNs and their pages, to write


class MigrationFirmware:
    """Migration commands of one ``SecureProcessor``; reach it as ``sp.migration``."""

    # The most pages export_switchover seals itself; beyond it the host's streams carry them, sealed, sent and
    # imported in parallel with the state and the start token instead of one after the other. Inline, each page
    # costs its seal, the copy through the answer and its open in series (~10-40 us a page under this nested KVM,
    # traced); the streams' way costs two more host commands (~1-2 ms) and overlaps the rest. A busy guest's
    # 300-1,000 final pages measured 14.5 ms median blackout inline (8 bundles allowed) and 9.3 ms by the streams
    # (AMD EPYC, 2026-12-06, 12 runs each); a few pages left by an idle guest are still cheaper inline.
    switchover_pages = wire.MAX_PAGES_PER_BUNDLE // 4

    def __init__(self, sp: SecureProcessor) -> None:
        self._sp = sp
        self._lock = threading.Lock()
        # Signalled when an import's guest-memory writes finish (they run outside the lock).
        self._written = threading.Condition(self._lock)
        self._exports: dict[GuestHandle, _Export] = {}
        self._imports: dict[int, _Import] = {}
        self._next_import = 1
        # One OpenSSL call per bundle when the native shim is built (native/cvmgcm.c), else one per page.
        self._native = load_native_gcm()

    # -- shared ------------------------------------------------------------------------------------

    def can_run(self, handle: GuestHandle) -> bool:
        """Whether the hardware may run this guest's vCPUs (asked by the VM before every resume)."""
        with self._lock:
            if self._sp.stopped:
                return False
            exp = self._exports.get(handle)
            if exp is not None:
                if exp.detached:
                    return False
                return exp.session.can_run or exp.session.state is ExportOpState.LIVE_EXPORT
            return self._sp._guest_op_state(handle) is OpState.RUNNABLE

    # -- source ------------------------------------------------------------------------------------

    def ma_export_prepare(self, handle: GuestHandle, session_id: bytes) -> bytes:
        """(MA only) A fresh forward key K_f for one session; single use."""
        if len(session_id) != wire.SESSION_ID_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "session id must be 16 bytes")
        with self._lock:
            ctx = self._sp._guest_ctx(handle)
            if not ctx.policy.migrate_ma:
                raise FirmwareError(FirmwareStatus.POLICY_FAILURE, "guest policy does not allow migration (MIGRATE_MA)")
            if handle in self._exports and self._exports[handle].session.state is not ExportOpState.RUNNABLE:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "an export is already in progress")
            k_f = os.urandom(KEY_SIZE)
            self._exports[handle] = _Export(session_id=session_id, k_f=k_f, aead=AESGCM(k_f))
            return k_f

    def ma_export_install_backward_key(self, handle: GuestHandle, k_b: bytes) -> None:
        """(MA only) The destination's backward key, which authenticates its abort token."""
        if len(k_b) != KEY_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "K_b must be 32 bytes")
        with self._lock:
            exp = self._export(handle, ExportOpState.RUNNABLE)
            exp.k_b = k_b

    def _export(self, handle: GuestHandle, *states: ExportOpState, detached_ok: bool = False) -> _Export:
        self._sp._check_live()
        exp = self._exports.get(handle)
        if exp is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"guest {handle} has no export session")
        if exp.detached and not detached_ok:
            raise FirmwareError(
                FirmwareStatus.INVALID_GUEST_STATE, f"export of guest {handle} lost its hardware: abort or finish it"
            )
        if states and exp.session.state not in states:
            raise FirmwareError(
                FirmwareStatus.INVALID_GUEST_STATE, f"export of guest {handle} is {exp.session.state.value}"
            )
        return exp

    def export_start(self, handle: GuestHandle, hw: GuestHardware) -> None:
        with self._lock:
            exp = self._export(handle, ExportOpState.RUNNABLE)
            if exp.k_b is None:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "no backward key installed (session setup)")
            exp.session.start()
            exp.hw = hw
            exp.clean = np.zeros(hw.gfn_limit, dtype=np.bool_)
            # Walking the populated set costs ~8 ms per GiB here: done now, so the start token (inside the guest's
            # downtime) only looks for what was populated since.
            exp.populated = list(hw.memory.populated_ranges())
            self._sp._set_op_state(handle, OpState.LIVE_EXPORT)

    def _seal(self, exp: _Export, stream: int, kind: BundleType, metadata: bytes, payload: bytes | None) -> bytes:
        units = 0 if payload is None else 1
        mb, epoch, iv = exp.session.next_slot(stream, units, kind)
        size = wire.HEADER_SIZE + len(metadata) + wire.MAC_SIZE
        header = BundleHeader(size=size, stream=stream, type=kind, mb_counter=mb, epoch=epoch, iv_counter=iv)
        head = header.to_bytes()
        mac = exp.aead.encrypt(wire.gcm_iv(iv, stream), b"", head + metadata)
        if payload is None:
            return head + metadata + mac
        return head + metadata + mac + exp.aead.encrypt(wire.gcm_iv(iv + 1, stream), payload, head)

    def export_immutable(self, handle: GuestHandle, stream: int) -> bytes:
        """The guest context (keys, measurement, policy...) sealed: the first bundle of a session."""
        with self._lock:
            exp = self._export(handle, ExportOpState.LIVE_EXPORT)
            ctx = self._sp._guest_ctx(handle)
            blob = exp.session_id + ctx.to_bytes()
            return self._seal(exp, stream, BundleType.IMMUTABLE_STATE, wire.pack_payload_metadata(len(blob)), blob)

    def export_memory(
        self, handle: GuestHandle, stream: int, gfns: Sequence[int] | npt.NDArray[np.uint64], out: memoryview
    ) -> int:
        """Seal the current contents of ``gfns`` into ``out``; returns the bundle length.

        Zero pages travel as a flag. Before reading, the firmware folds in the writes the hardware logged
        since it last looked, so "exported and clean" is exact when the start token is requested.
        """
        count = len(gfns)
        if not 0 < count <= wire.MAX_PAGES_PER_BUNDLE:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"1..{wire.MAX_PAGES_PER_BUNDLE} pages per bundle")
        with self._lock:
            exp = self._export(handle, ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT)
            return self._export_memory(exp, stream, np.asarray(gfns, dtype=np.uint64), out)

    def _export_memory(self, exp: _Export, stream: int, gfn_array: npt.NDArray[np.uint64], out: memoryview) -> int:
        hw, clean = exp.hw, exp.clean
        assert hw is not None
        assert clean is not None
        if int(gfn_array.max()) >= hw.gfn_limit:
            raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, "GFN beyond guest memory")
        dirty = hw.take_dirty(fresh=False)
        if len(dirty):
            clean[dirty.astype(np.intp)] = False
        try:
            nonzero, addresses, mapped = page_reads(hw.memory, gfn_array)
        except CvmError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, "GFN outside guest RAM") from exc
        entries = (gfn_array << np.uint64(12)) | (~nonzero).astype(np.uint64) * np.uint64(EntryFlag.ZERO)
        data = np.flatnonzero(nonzero).tolist()
        metadata = wire.pack_memory_metadata(entries.tolist())
        mb, epoch, iv = exp.session.next_slot(stream, len(data), BundleType.MEMORY)
        size = wire.HEADER_SIZE + len(metadata) + wire.MAC_SIZE
        head = BundleHeader(
            size=size, stream=stream, type=BundleType.MEMORY, mb_counter=mb, epoch=epoch, iv_counter=iv
        ).to_bytes()
        total = size + len(data) * _UNIT
        if len(out) < total:
            raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"output buffer needs {total:#x} bytes")
        out[: wire.HEADER_SIZE] = head
        out[wire.HEADER_SIZE : size - wire.MAC_SIZE] = metadata
        out[size - wire.MAC_SIZE : size] = exp.aead.encrypt(wire.gcm_iv(iv, stream), b"", head + metadata)
        if data:
            # One AES-GCM per page, AAD = header || GPA entry: a page cannot move to another GPA or bundle.
            ivs = gcm_ivs(iv + 1, len(data), stream)
            aads = page_aads(head, entries[data])
            native = self._native
            if native is not None:
                # The whole bundle in one call: the pages' addresses (``mapped`` keeps them mapped).
                sealed = out[size:total]
                if not native.seal_pages(exp.k_f, ivs, addresses[data], aads, 32, buffer_address(sealed)):
                    raise FirmwareError(FirmwareStatus.INVALID_CONFIG, "AES-GCM failed")
            else:
                pages = page_views(hw.memory, gfn_array)
                encrypt_into = exp.aead.encrypt_into
                off = size
                for k, i in enumerate(data):
                    encrypt_into(
                        ivs[12 * k : 12 * k + 12], pages[i], aads[32 * k : 32 * k + 32], out[off : off + _UNIT]
                    )
                    off += _UNIT
        clean[gfn_array.astype(np.intp)] = True
        del mapped
        return total

    def export_epoch_token(self, handle: GuestHandle, stream: int) -> bytes:
        with self._lock:
            exp = self._export(handle, ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT)
            epoch = exp.session.epoch
            total = exp.session.close_epoch()
            mb, _, iv = exp.session.next_slot(stream, 0, BundleType.EPOCH_TOKEN)
            return self._token(
                exp, stream, BundleType.EPOCH_TOKEN, mb, epoch, iv, wire.pack_epoch_token_metadata(total)
            )

    def _token(
        self, exp: _Export, stream: int, kind: BundleType, mb: int, epoch: int, iv: int, metadata: bytes
    ) -> bytes:
        size = wire.HEADER_SIZE + len(metadata) + wire.MAC_SIZE
        head = BundleHeader(size=size, stream=stream, type=kind, mb_counter=mb, epoch=epoch, iv_counter=iv).to_bytes()
        return head + metadata + exp.aead.encrypt(wire.gcm_iv(iv, stream), b"", head + metadata)

    def export_pause(self, handle: GuestHandle) -> npt.NDArray[np.uint64]:
        """The VM must be paused; from here on the hardware keeps it paused unless the firmware says run.

        Returns every populated page whose last write was not exported, by the firmware's own clean map once the
        hardware held the VM and harvested its log: the last ones the host must export.  Not only the fresh
        harvest: a write the firmware learned of earlier (the VM process hands it every harvest) and folded in
        while sealing other pages is unexported too, and an engine whose own view lost it (a restarted dirty log)
        could otherwise never complete.  The host learns nothing its own honest harvests would not tell it.
        """
        with self._lock:
            exp = self._export(handle, ExportOpState.LIVE_EXPORT)
            assert exp.hw is not None
            assert exp.clean is not None
            exp.session.pause()
            self._sp._set_op_state(handle, OpState.PAUSED_EXPORT)
            try:
                dirty = exp.hw.hold_paused()
            except Exception:
                exp.session.state = ExportOpState.LIVE_EXPORT
                self._sp._set_op_state(handle, OpState.LIVE_EXPORT)
                raise
            if len(dirty):
                exp.clean[dirty.astype(np.intp)] = False
            populated = exp.populated_now()
            return _unexported(exp.clean, populated)

    def export_state(self, handle: GuestHandle, stream: int, kind: BundleType) -> bytes:
        """vCPU, device or mutable guest state of the paused VM, sealed."""
        if kind not in STATE_BUNDLES:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"{kind.name} is not a state bundle")
        with self._lock:
            exp = self._export(handle, ExportOpState.PAUSED_EXPORT)
            return self._export_state(exp, handle, stream, kind)

    def _export_state(self, exp: _Export, handle: GuestHandle, stream: int, kind: BundleType) -> bytes:
        assert exp.hw is not None
        if kind is BundleType.MUTABLE_STATE:
            blob = _MUTABLE.pack(*self._sp._guest_ctx(handle).msg_seqnos)
        else:
            if exp.captured is None:
                exp.captured = exp.hw.capture_state()
            vcpu, device = exp.captured
            blob = vcpu if kind is BundleType.VCPU_STATE else device
        return self._seal(exp, stream, kind, wire.pack_payload_metadata(len(blob)), blob)

    def export_final(self, handle: GuestHandle, stream: int) -> list[bytes]:
        """The stop-and-copy's tail as one firmware operation: the vCPU, device and mutable state bundles, then
        the start token.  The hardware captures the state and harvests its dirty log in one round trip; with the
        firmware lock held throughout, that harvest is as fresh as the one ``export_start_token`` makes alone.
        After ``export_switchover`` the state was captured at the hold and the VM stayed held since, so only the
        harvest is made (capturing again cost 0.4-0.7 ms of a busy guest's blackout, traced)."""
        with self._lock:
            exp = self._export(handle, ExportOpState.PAUSED_EXPORT)
            assert exp.hw is not None
            if exp.captured is None:
                vcpu, device, dirty = exp.hw.capture_and_harvest()
                exp.captured = (vcpu, device)
            else:
                dirty = exp.hw.take_dirty(fresh=True)
            bundles = [self._export_state(exp, handle, stream, kind) for kind in STATE_ORDER]
            bundles.append(self._export_start_token(exp, handle, stream, dirty))
            return bundles

    def export_switchover(self, handle: GuestHandle, stream: int) -> Switchover:
        """The whole stop-and-copy as one firmware operation, when what is left fits one memory bundle.

        The hardware pauses and holds the VM, captures its state and harvests its dirty log in one round trip;
        the firmware then seals, itself, every populated page not exported since its last write (its own clean
        map decides, not the host's list), the state bundles and the start token, all under one lock hold.  When
        more than ``switchover_pages`` pages are left it stops after the hold, as ``export_pause`` does, and
        names them: the host sends them over its streams (``export_memory``, pipelined with the destination's
        import) and ends with ``export_final``.
        """
        with self._lock:
            exp = self._export(handle, ExportOpState.LIVE_EXPORT)
            hw, clean = exp.hw, exp.clean
            assert hw is not None
            assert clean is not None
            exp.session.pause()
            self._sp._set_op_state(handle, OpState.PAUSED_EXPORT)
            try:
                vcpu, device, dirty = hw.pause_capture_harvest()
            except Exception:
                exp.session.state = ExportOpState.LIVE_EXPORT
                self._sp._set_op_state(handle, OpState.LIVE_EXPORT)
                raise
            exp.captured = (vcpu, device)
            if len(dirty):
                clean[dirty.astype(np.intp)] = False
            populated = exp.populated_now()
            left = _unexported(clean, populated)
            if len(left) > self.switchover_pages:
                return Switchover(pending=left)
            bundles: list[bytes] = []
            if len(left):
                step = wire.MAX_PAGES_PER_BUNDLE
                out = memoryview(bytearray(wire.bundle_capacity(min(step, len(left)))))
                for i in range(0, len(left), step):
                    bundles.append(bytes(out[: self._export_memory(exp, stream, left[i : i + step], out)]))
            bundles += [self._export_state(exp, handle, stream, kind) for kind in STATE_ORDER]
            # The start token rests on a harvest made after every page it certifies was read. When this command
            # sealed pages, that is a harvest of its own, after the sealing: a write while the SP read them
            # (hardware that broke the hold, a DMA device left running) is a dirty page, and the token is refused,
            # as export_final's would be. When it sealed none, every certified page was read before the hold's
            # harvest above, which is already that harvest: a second would be one more round trip to the hardware
            # inside the blackout and would certify nothing more. The token also checks every populated page
            # itself, over the ranges looked up above (more memory could only be populated through the hold).
            dirty = hw.take_dirty(fresh=True) if len(left) else dirty[:0]
            token = self._export_start_token(exp, handle, stream, dirty, populated=populated)
            bundles.append(token)
            return Switchover(bundles=bundles, pages=len(left))

    def export_start_token(self, handle: GuestHandle, stream: int) -> bytes:
        """The point of no return for the source: only when every populated page went out after its last write."""
        with self._lock:
            exp = self._export(handle, ExportOpState.PAUSED_EXPORT)
            assert exp.hw is not None
            return self._export_start_token(exp, handle, stream, exp.hw.take_dirty(fresh=True))

    def _export_start_token(
        self,
        exp: _Export,
        handle: GuestHandle,
        stream: int,
        dirty: npt.NDArray[np.uint64],
        *,
        populated: list[tuple[int, int]] | None = None,
    ) -> bytes:
        """``dirty``: a harvest of the hardware log made while the VM was held, under this same lock hold;
        ``populated``: the populated ranges, if looked up already in this same lock hold with the VM held."""
        clean = exp.clean
        assert clean is not None
        if len(dirty):
            clean[dirty.astype(np.intp)] = False
        if populated is None:
            populated = exp.populated_now()
        all_clean = all(bool(clean[gpa >> 12 : (gpa + length) >> 12].all()) for gpa, length in populated)
        epoch = exp.session.epoch
        total = exp.session.emit_start_token(all_pages_clean=all_clean)
        mb, _, iv = exp.session.next_slot(stream, 0, BundleType.START_TOKEN)
        self._sp._set_op_state(handle, OpState.POST_EXPORT)
        meta = wire.pack_start_token_metadata(exp.session_id, total)
        token = self._token(exp, stream, BundleType.START_TOKEN, mb, epoch, iv, meta)
        exp.start_token_digest = hashlib.sha256(token).digest()
        return token

    def export_abort(self, handle: GuestHandle) -> None:
        """Abort before the start token: the guest may run again here. The session keys are destroyed."""
        with self._lock:
            exp = self._export(
                handle,
                ExportOpState.LIVE_EXPORT,
                ExportOpState.PAUSED_EXPORT,
                ExportOpState.RUNNABLE,
                detached_ok=True,
            )
            if exp.session.state is not ExportOpState.RUNNABLE:
                exp.session.abort_local()
            del self._exports[handle]
            self._sp._set_op_state(handle, OpState.RUNNABLE)

    def export_abort_with_token(self, handle: GuestHandle, token: bytes) -> None:
        """Resume a frozen source: only with an abort token MAC'd under K_b for this session."""
        with self._lock:
            exp = self._export(handle, detached_ok=True)
            if exp.k_b is None or not _check_abort_token(exp.k_b, exp.session_id, token):
                raise IntegrityError()
            exp.session.abort_with_token()
            del self._exports[handle]
            self._sp._set_op_state(handle, OpState.RUNNABLE)

    def export_finish(self, handle: GuestHandle, receipt: bytes) -> None:
        """The destination proved it committed: destroy the source context (SNP_DECOMMISSION).

        The proof is the destination firmware's commit receipt, MAC'd under K_b and naming this session and
        the start token this SP emitted; nothing the untrusted hosts say in plaintext can stand in for it.
        Without a valid receipt the source stays frozen (recoverable): one opaque ``IntegrityError``.
        """
        with self._lock:
            exp = self._export(handle, ExportOpState.POST_EXPORT, detached_ok=True)
            if (
                exp.k_b is None
                or exp.start_token_digest is None
                or not _check_commit_receipt(exp.k_b, exp.session_id, exp.start_token_digest, receipt)
            ):
                raise IntegrityError()
            exp.session.decommission()
            del self._exports[handle]
            self._sp._decommission_migrated(handle)

    def export_status(self, handle: GuestHandle) -> str:
        with self._lock:
            exp = self._exports.get(handle)
            return exp.session.state.value if exp else ExportOpState.RUNNABLE.value

    # -- destination -------------------------------------------------------------------------------

    def import_prepare(self, session_id: bytes, hw: GuestHardware) -> int:
        if len(session_id) != wire.SESSION_ID_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "session id must be 16 bytes")
        with self._lock:
            self._sp._check_live()
            ref = self._next_import
            self._next_import += 1
            self._imports[ref] = _Import(session_id=session_id, hw=hw)
            return ref

    def _import(self, ref: int) -> _Import:
        self._sp._check_live()
        imp = self._imports.get(ref)
        if imp is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no import context {ref}")
        return imp

    def ma_import_install_forward_key(self, ref: int, k_f: bytes) -> None:
        """(MA only) K_f from the source MA; single use."""
        if len(k_f) != KEY_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "K_f must be 32 bytes")
        with self._lock:
            imp = self._import(ref)
            if imp.k_f is not None:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "forward key already installed")
            imp.k_f, imp.aead = k_f, AESGCM(k_f)

    def ma_import_generate_backward_key(self, ref: int) -> bytes:
        """(MA only) K_b, which later authenticates an abort token to the source."""
        with self._lock:
            imp = self._import(ref)
            if imp.k_b is not None:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "backward key already generated")
            imp.k_b = os.urandom(KEY_SIZE)
            return imp.k_b

    def import_state(self, ref: int) -> str:
        with self._lock:
            return self._import(ref).rules.state.value

    def import_handle(self, ref: int) -> GuestHandle | None:
        with self._lock:
            return self._import(ref).handle

    def import_bundle(self, ref: int, bundle: bytes | bytearray | memoryview) -> BundleType:
        """Authenticate and apply one bundle. Any failure: FAILED for ever and one opaque IntegrityError.

        A memory bundle is verified, counted and its GPAs claimed under the lock; its pages then go to guest memory
        outside it, so the streams' imports overlap their writes (the first touch of fresh memory is the costliest
        step of an import).  Anything else waits for every write in flight first: an epoch token or the start
        token certifies that all pages before it are in memory, and a later epoch may write the same GPAs.
        """
        buf = memoryview(bundle)
        with self._lock:
            imp = self._import(ref)
            if len(buf) <= 6 or buf[6] != BundleType.MEMORY:  # the header as claimed; the MAC decides below
                self._written.wait_for(lambda: imp.writing == 0)
            try:
                kind, write = self._apply(imp, buf)
            except (IntegrityError, InvalidTag, AbiError, FirmwareError, ValueError, IndexError) as exc:
                self._fail_import(imp)
                raise IntegrityError() from exc
            if write is None:
                return kind
            imp.writing += 1
        gfns, scratch = write
        written = False
        try:
            assert imp.hw is not None
            imp.hw.memory.write_pages(gfns, scratch[: len(gfns) * PAGE])
            written = True
        except CvmError as exc:
            raise IntegrityError() from exc
        finally:
            with self._lock:
                if not written:  # counted as accepted, not in memory: nothing may certify this import now
                    self._fail_import(imp)
                imp.scratch_free.append(scratch)
                imp.writing -= 1
                self._written.notify_all()
        return kind

    def _fail_import(self, imp: _Import) -> None:
        imp.rules.fail()
        if imp.handle is not None and not imp.rules.committed:
            self._sp._set_op_state(imp.handle, OpState.FAILED)

    def _apply(self, imp: _Import, buf: memoryview) -> tuple[BundleType, _Write | None]:
        if imp.aead is None or imp.rules.state is ImportOpState.FAILED:
            raise IntegrityError()
        header = BundleHeader.from_bytes(buf)
        if header.size > len(buf):
            raise IntegrityError()
        head = bytes(buf[: wire.HEADER_SIZE])
        metadata = bytes(buf[wire.HEADER_SIZE : header.size - wire.MAC_SIZE])
        mac = bytes(buf[header.size - wire.MAC_SIZE : header.size])
        # The MAC first: nothing of an unauthenticated bundle is interpreted beyond its header's length.
        imp.aead.decrypt(wire.gcm_iv(header.iv_counter, header.stream), mac, head + metadata)
        kind = header.type
        rest = buf[header.size :]
        if kind is BundleType.IMMUTABLE_STATE:
            return self._import_immutable(imp, header, head, metadata, rest), None
        if imp.ctx is None:
            raise IntegrityError()
        rules = imp.rules
        if not rules.check_bundle(header.stream, kind, header.mb_counter, header.epoch, header.iv_counter):
            raise IntegrityError()
        write = None
        if kind is BundleType.MEMORY:
            write = self._import_memory(imp, header, head, metadata, rest)
        elif kind in STATE_BUNDLES:
            length = wire.parse_payload_metadata(metadata)
            if len(rest) != length + wire.TAG_SIZE:
                raise IntegrityError()
            iv = wire.gcm_iv(header.iv_counter + 1, header.stream)
            imp.states[kind] = imp.aead.decrypt(iv, bytes(rest), head)
            rules.accept_bundle(header.stream, kind, 1)
        elif kind is BundleType.EPOCH_TOKEN:
            if len(rest):
                raise IntegrityError()
            rules.accept_bundle(header.stream, kind, 0)
            if not rules.close_epoch(wire.parse_epoch_token_metadata(metadata)):
                raise IntegrityError()
        elif kind is BundleType.START_TOKEN:
            session_id, total = wire.parse_start_token_metadata(metadata)
            if len(rest) or session_id != imp.session_id:
                raise IntegrityError()
            rules.accept_bundle(header.stream, kind, 0)
            if not rules.commit(total):
                raise IntegrityError()
            imp.start_token_digest = hashlib.sha256(buf[: header.size]).digest()
            self._commit(imp)
        else:
            raise IntegrityError()
        if rules.state is ImportOpState.FAILED:
            raise IntegrityError()
        return kind, write

    def _import_immutable(
        self, imp: _Import, header: BundleHeader, head: bytes, metadata: bytes, rest: memoryview
    ) -> BundleType:
        rules = imp.rules
        if imp.ctx is not None or (header.stream, header.mb_counter, header.epoch, header.iv_counter) != (
            header.stream,
            rules.mb_counters.get(header.stream, 0),
            0,
            rules.iv_next.get(header.stream, 0),
        ):
            raise IntegrityError()
        length = wire.parse_payload_metadata(metadata)
        if len(rest) != length + wire.TAG_SIZE:
            raise IntegrityError()
        assert imp.aead is not None
        blob = imp.aead.decrypt(wire.gcm_iv(header.iv_counter + 1, header.stream), bytes(rest), head)
        if blob[: wire.SESSION_ID_SIZE] != imp.session_id:
            raise IntegrityError()
        ctx = GuestContext.from_bytes(blob[wire.SESSION_ID_SIZE :])
        if ctx.product is not self._sp.product:
            # Same product family only (DESIGN section 6, migration policy); the MA checked it before keys.
            raise IntegrityError()
        ctx.op_state = OpState.MEMORY_IMPORT
        imp.ctx = ctx
        imp.handle = self._sp._adopt_context(ctx)
        rules.accept_bundle(header.stream, BundleType.IMMUTABLE_STATE, 1)
        return BundleType.IMMUTABLE_STATE

    def _import_memory(
        self, imp: _Import, header: BundleHeader, head: bytes, metadata: bytes, rest: memoryview
    ) -> _Write:
        """Verify a memory bundle's pages into a scratch buffer and accept it: the caller writes them."""
        hw = imp.hw
        if hw is None:
            raise IntegrityError()
        entries = memory_entries(metadata)
        gfns = entries >> np.uint64(12)
        is_data = (entries & np.uint64(EntryFlag.ZERO)) == 0
        data = np.flatnonzero(is_data).tolist()
        if len(rest) != len(data) * _UNIT or int(gfns.max()) >= hw.gfn_limit:
            raise IntegrityError()
        # A GPA at most once per epoch (ImportRules.claim_gpa, for a whole bundle at once): a replayed page
        # could roll memory back.
        if not imp.claim_gfns(gfns, hw.gfn_limit):
            raise IntegrityError()
        rules = imp.rules
        # Pages are opened into a scratch buffer in entry order, then written to guest memory in one call: nothing
        # of a bundle reaches guest memory before all its tags verified (runs of fresh pages go with one write
        # each, a page-table fault per page costs more than the copy on this hardware; scattered pages at once).
        scratch = imp.take_scratch()
        try:
            self._open_pages(imp, header, head, entries, is_data, data, rest, scratch)
        except BaseException:
            imp.scratch_free.append(scratch)
            raise
        rules.accept_bundle(header.stream, BundleType.MEMORY, len(data))
        return gfns, scratch

    def _open_pages(
        self,
        imp: _Import,
        header: BundleHeader,
        head: bytes,
        entries: npt.NDArray[np.uint64],
        is_data: npt.NDArray[np.bool_],
        data: list[int],
        rest: memoryview,
        scratch: memoryview,
    ) -> None:
        assert imp.aead is not None
        for i in np.flatnonzero(~is_data).tolist():
            scratch[i * PAGE : (i + 1) * PAGE] = _ZERO_PAGE
        if data:
            ivs = gcm_ivs(header.iv_counter + 1, len(data), header.stream)
            aads = page_aads(head, entries[data])
            native = self._native
            if native is not None:
                assert imp.k_f is not None
                if data[-1] >= len(scratch) // PAGE:  # memory_entries bounds it already; raw addresses follow
                    raise IntegrityError()
                outs = np.uint64(buffer_address(scratch)) + np.asarray(data, dtype=np.uint64) * np.uint64(PAGE)
                if native.open_pages(imp.k_f, ivs, rest, aads, 32, outs) != 0:
                    raise IntegrityError()
            else:
                decrypt_into = imp.aead.decrypt_into
                off = 0
                for k, i in enumerate(data):
                    decrypt_into(
                        ivs[12 * k : 12 * k + 12],
                        rest[off : off + _UNIT],
                        aads[32 * k : 32 * k + 32],
                        scratch[i * PAGE : (i + 1) * PAGE],
                    )
                    off += _UNIT

    def _commit(self, imp: _Import) -> None:
        ctx, handle = imp.ctx, imp.handle
        assert ctx is not None
        assert handle is not None
        seqnos = _MUTABLE.unpack(imp.states[BundleType.MUTABLE_STATE])
        ctx.msg_seqnos = list(seqnos)
        ctx.op_state = OpState.POST_IMPORT

    def import_activate(self, ref: int, *, run: bool = False) -> GuestHandle:
        """After commit: hand the vCPU and device state to the hardware and make the guest runnable here.

        ``run``: the hardware also runs the guest once restored, in the same round trip (the firmware decided to
        activate it: with its lock held nothing can observe the moment between the two)."""
        with self._lock:
            imp = self._import(ref)
            if imp.rules.state is not ImportOpState.POST_IMPORT:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"import is {imp.rules.state.value}")
            assert imp.ctx is not None
            assert imp.handle is not None
            assert imp.hw is not None  # only restored imports lack it, and none is restored in POST_IMPORT
            imp.hw.restore_state(imp.states[BundleType.VCPU_STATE], imp.states[BundleType.DEVICE_STATE], run=run)
            imp.rules.activate()
            imp.ctx.op_state = OpState.RUNNABLE
            return imp.handle

    def import_commit_receipt(self, ref: int) -> bytes:
        """The proof of commit for the source (after the start token verified); the same bytes every time."""
        with self._lock:
            imp = self._import(ref)
            if not imp.rules.committed or imp.k_b is None or imp.start_token_digest is None:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"import is {imp.rules.state.value}")
            return _make_commit_receipt(imp.k_b, imp.session_id, imp.start_token_digest)

    def import_abort(self, ref: int) -> bytes:
        """Give up before commit: FAILED for ever, and an abort token that lets the source resume."""
        with self._lock:
            imp = self._import(ref)
            if imp.k_b is None or not imp.rules.issue_abort_token():
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "committed imports cannot be aborted")
            if imp.handle is not None:
                self._sp._set_op_state(imp.handle, OpState.FAILED)
            return _make_abort_token(imp.k_b, imp.session_id, _ABORT_REASON_IMPORT_FAILED)

    def import_discard(self, ref: int) -> None:
        """Forget a FAILED (or never-started) import; a committed one cannot be discarded this way."""
        with self._lock:
            imp = self._import(ref)
            if imp.rules.committed:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "committed import")
            imp.rules.fail()  # no bundle starts a write from here on
            self._written.wait_for(lambda: imp.writing == 0)  # and none is left writing to the hardware
            handle = imp.handle
            del self._imports[ref]
        if handle is not None:
            self._sp._decommission_migrated(handle)

    def forget(self, handle: GuestHandle) -> None:
        """A decommissioned RUNNABLE guest's prepared (never started) export session goes with it."""
        with self._lock:
            exp = self._exports.get(handle)
            if exp is not None and exp.session.state is ExportOpState.RUNNABLE:
                del self._exports[handle]


def _unexported(clean: npt.NDArray[np.bool_], populated: list[tuple[int, int]]) -> npt.NDArray[np.uint64]:
    """GFNs of the pages in ``populated`` whose last write was not exported (ranges all clean cost one test)."""
    parts = []
    for gpa, length in populated:
        lo, hi = gpa >> 12, (gpa + length) >> 12
        if not clean[lo:hi].all():
            parts.append((np.flatnonzero(~clean[lo:hi]) + lo).astype(np.uint64))
    return sorted_union(*parts) if parts else np.zeros(0, dtype=np.uint64)


def _make_abort_token(k_b: bytes, session_id: bytes, reason: int) -> bytes:
    meta = wire.pack_abort_token_metadata(session_id, reason)
    return _backward_token(k_b, BundleType.ABORT_TOKEN, _ABORT_IV_COUNTER, meta)


def _check_abort_token(k_b: bytes, session_id: bytes, token: bytes) -> bool:
    meta = _open_backward_token(k_b, BundleType.ABORT_TOKEN, _ABORT_IV_COUNTER, token)
    try:
        return meta is not None and hmac.compare_digest(wire.parse_abort_token_metadata(meta)[0], session_id)
    except AbiError:
        return False


_ABORT_IV_COUNTER = 0
_RECEIPT_IV_COUNTER = 1  # the two backward-key tokens never share a GCM nonce under K_b


def _backward_token(k_b: bytes, kind: BundleType, iv_counter: int, meta: bytes) -> bytes:
    size = wire.HEADER_SIZE + len(meta) + wire.MAC_SIZE
    head = BundleHeader(
        size=size, stream=wire.BACKWARD_STREAM, type=kind, mb_counter=0, epoch=0, iv_counter=iv_counter
    ).to_bytes()
    return head + meta + AESGCM(k_b).encrypt(wire.gcm_iv(iv_counter, wire.BACKWARD_STREAM), b"", head + meta)


def _make_commit_receipt(k_b: bytes, session_id: bytes, start_token_digest: bytes) -> bytes:
    meta = wire.pack_commit_receipt_metadata(session_id, start_token_digest)
    return _backward_token(k_b, BundleType.COMMIT_RECEIPT, _RECEIPT_IV_COUNTER, meta)


def _check_commit_receipt(k_b: bytes, session_id: bytes, start_token_digest: bytes, receipt: bytes) -> bool:
    meta = _open_backward_token(k_b, BundleType.COMMIT_RECEIPT, _RECEIPT_IV_COUNTER, receipt)
    try:
        if meta is None:
            return False
        sid, digest = wire.parse_commit_receipt_metadata(meta)
    except AbiError:
        return False
    return hmac.compare_digest(sid, session_id) and hmac.compare_digest(digest, start_token_digest)


def _open_backward_token(k_b: bytes, kind: BundleType, iv_counter: int, token: bytes) -> bytes | None:
    """The metadata of a backward-key token of ``kind`` whose MAC verifies under K_b, else None."""
    try:
        header = BundleHeader.from_bytes(token)
    except AbiError:
        return None
    if header.type is not kind or header.stream != wire.BACKWARD_STREAM or header.iv_counter != iv_counter:
        return None
    if header.size != len(token) or (header.mb_counter, header.epoch) != (0, 0):
        return None
    head, meta, mac = token[: wire.HEADER_SIZE], token[wire.HEADER_SIZE : -wire.MAC_SIZE], token[-wire.MAC_SIZE :]
    try:
        AESGCM(k_b).decrypt(wire.gcm_iv(iv_counter, wire.BACKWARD_STREAM), mac, head + meta)
    except (InvalidTag, ValueError):
        return None
    return meta
