"""firmware layer: ``SecureProcessor``, the command interface the untrusted host uses to drive the emulated AMD-SP.

The host holds a ``SecureProcessor`` and guest handles (ASID-like integers) and nothing else: no method
returns a VMPCK, the VMRK, the chip secret or an endorsement private key.  Guest memory stays with the
caller (the VMM); pages are passed in as buffers.

Guest lifecycle (SNP ABI command names; any other order is ``FirmwareError(INVALID_GUEST_STATE)``):

```
 launch_start(policy) ──► LAUNCH ──launch_update(page)*──► launch_finish(id_block?, host_data) ──► RUNNING
                             │                                                                    │
                             └── activate() (binds the ASID; allowed in LAUNCH or RUNNING) ────────┤
                                                                   guest_request() needs RUNNING+activated
 decommission() from any state frees the handle.
```
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NewType, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cvmotion.abi.snp import GuestPolicy, Product, SigningKey, TcbVersion
from cvmotion.errors import FirmwareError, FirmwareStatus, UsageError
from cvmotion.files import PRIVATE, write_atomic
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.context import ContextFlag, GuestContext, GuestState, OpState
from cvmotion.firmware.guest_request import Signers, handle_guest_request
from cvmotion.firmware.id_block import verify_id_block
from cvmotion.firmware.keys import RandomSource, derive_vcek, system_random
from cvmotion.firmware.launch import PAGE_SIZE, LaunchDigest, PageType, check_cpuid_page, check_launch_policy
from cvmotion.firmware.launch import write_secrets_page as _write_secrets_page
from cvmotion.firmware.migration import MigrationFirmware
from cvmotion.firmware.sp_seal import open_sealed, seal
from cvmotion.firmware.sp_snapshot import SpSnapshot, check_sealable, decode, encode
from cvmotion.firmware.vlek import UnwrappedVlek, unwrap_vlek

__all__ = ["EndorsementSource", "ExtCerts", "GuestHandle", "GuestInfo", "PlatformStatus", "SecureProcessor"]

GuestHandle = NewType("GuestHandle", int)
MAX_GUESTS = 509  # SNP ASIDs on Milan/Genoa (CPUID Fn8000_001F ECX minus the SEV-ES range): RESOURCE_LIMIT beyond
_MAX_GPA = 1 << 52
# Op-states in which the host may destroy a guest: a runnable guest (the owner deletes the VM) or a failed import.
# An import in progress is given up with import_discard, which fails it too (no commit receipt can follow).
_DECOMMISSIONABLE = frozenset({OpState.RUNNABLE, OpState.FAILED})
_VLEK_FILE, _VLEK_CERT_FILE = "vlek.bin", "vlek.der"


class EndorsementSource(Protocol):
    """Where the host gets the VCEK/VLEK certificates it hands out with reports (a KDS, or its cache)."""

    def vcek_der(self, product: Product, hwid: bytes, tcb: TcbVersion) -> bytes: ...

    def cert_chain_pem(self, product: Product) -> bytes: ...

    def vlek_chain_pem(self, product: Product) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PlatformStatus:
    """SNP_PLATFORM_STATUS plus the identity the host may know (all public)."""

    emulated: bool
    product: Product
    api_major: int
    api_minor: int
    build_id: int
    current_tcb: TcbVersion
    committed_tcb: TcbVersion
    reported_tcb: TcbVersion
    guest_count: int
    vlek_en: bool


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """Public facts about one guest (SNP_GUEST_STATUS-like): nothing secret."""

    state: GuestState
    op_state: OpState
    activated: bool
    policy: GuestPolicy
    measurement: bytes
    host_data: bytes


@dataclass(frozen=True, slots=True)
class ExtCerts:
    """What SNP_GET_EXT_REPORT's certificate table carries: the endorsement key cert and its chain."""

    signing_key: SigningKey
    endorsement_der: bytes
    chain_pem: bytes  # ASK (or ASVK) then ARK

    def pem(self) -> bytes:
        vcek = x509.load_der_x509_certificate(self.endorsement_der)
        return vcek.public_bytes(serialization.Encoding.PEM) + self.chain_pem


class SecureProcessor:
    """One host's emulated AMD-SP. Thread-safe: every command holds one lock, as the SP serialises commands."""

    def __init__(
        self, chip: Chip, *, endorsements: EndorsementSource | None = None, rng: RandomSource = system_random
    ) -> None:
        self._chip = chip
        self._endorsements = endorsements
        self._rng = rng
        self._lock = threading.Lock()
        self._guests: dict[GuestHandle, GuestContext] = {}
        self._digests: dict[GuestHandle, LaunchDigest] = {}
        self._next_handle = 1
        self._vcek = derive_vcek(chip.chip_secret, chip.product, chip.reported_tcb)
        self._vlek: UnwrappedVlek | None = None
        self._vlek_cert: bytes | None = None
        self._cert_cache: dict[tuple[SigningKey, TcbVersion], ExtCerts] = {}
        self._migration: MigrationFirmware | None = None
        self._stopped = False  # sealed its state (seal_state): it serves nothing more, its keys are gone
        self._reload_vlek()

    @classmethod
    def open(
        cls, data_dir: Path, *, endorsements: EndorsementSource | None = None, rng: RandomSource = system_random
    ) -> SecureProcessor:
        """The SP of the chip persisted in ``data_dir`` (a restarted host keeps its identity)."""
        return cls(Chip.load(data_dir), endorsements=endorsements, rng=rng)

    @classmethod
    def restore_sealed(
        cls,
        chip: Chip,
        blob: bytes,
        *,
        endorsements: EndorsementSource | None = None,
        rng: RandomSource = system_random,
    ) -> tuple[SecureProcessor, bytes]:
        """The SP of ``chip`` with the state a previous SP of this chip sealed (``seal_state``), and the
        caller's extra bytes sealed with it.  The blob opens once, and only the newest one: a replayed, forged
        or tampered blob is one opaque ``IntegrityError`` (``sp_seal``)."""
        snap = decode(open_sealed(chip, blob))
        sp = cls(chip, endorsements=endorsements, rng=rng)
        sp._guests = {GuestHandle(h): ctx for h, ctx in snap.guests.items()}
        sp._next_handle = snap.next_handle
        if snap.exports or snap.imports:
            mig = sp.migration
            mig._exports = {GuestHandle(h): exp for h, exp in snap.exports.items()}
            mig._imports = dict(snap.imports)
            mig._next_import = snap.next_import
        return sp, snap.extra

    # -- platform ----------------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def data_dir(self) -> Path:
        """Where this chip's identity and its replay-protected storage live (emulated hardware storage)."""
        return self._chip.data_dir

    def _check_live(self) -> None:
        if self._stopped:
            raise FirmwareError(FirmwareStatus.INVALID_PLATFORM_STATE, "this secure processor sealed its state")

    def seal_state(self, extra: bytes = b"") -> bytes:
        """Seal every guest context (and the migrations' keys and counters) for the next SP of this chip, then stop.

        The state is sealed under a key derived from the chip secret and bound to a fresh generation of the
        chip's replay-protected counter (``sp_seal``); ``extra`` (the platform process's own bindings) is
        sealed with it.  From here on this SP refuses every command and forgets its keys, so no guest can
        advance here after the copy was taken (its sequence numbers would roll back on the next SP).
        """
        mig = self._migration
        with mig._lock if mig is not None else contextlib.nullcontext(), self._lock:
            self._check_live()
            check_sealable({int(h): c for h, c in self._guests.items()}, mig)
            snap = SpSnapshot(
                next_handle=self._next_handle,
                guests={int(h): c for h, c in self._guests.items()},
                exports={int(h): e for h, e in mig._exports.items()} if mig is not None else {},
                imports=dict(mig._imports) if mig is not None else {},
                next_import=mig._next_import if mig is not None else 1,
                extra=bytes(extra),
            )
            blob = seal(self._chip, encode(snap))
            self._stopped = True
            self._guests.clear()
            self._digests.clear()
            if mig is not None:
                mig._exports.clear()
                mig._imports.clear()
            return blob

    @property
    def product(self) -> Product:
        return self._chip.product

    def get_id(self) -> bytes:
        """SNP GET_ID: the 64-byte CHIP_ID (public: it is in every report)."""
        return self._chip.chip_id

    def platform_status(self) -> PlatformStatus:
        chip = self._chip
        with self._lock:
            return PlatformStatus(
                emulated=True,
                product=chip.product,
                api_major=chip.firmware.major,
                api_minor=chip.firmware.minor,
                build_id=chip.firmware.build,
                current_tcb=chip.current_tcb,
                committed_tcb=chip.committed_tcb,
                reported_tcb=chip.reported_tcb,
                guest_count=len(self._guests),
                vlek_en=self._vlek is not None,
            )

    def update_tcb(self, current: TcbVersion, *, reported: TcbVersion | None = None, commit: bool = False) -> None:
        """Install firmware at ``current`` (test hook and ``cvmotion platform set-tcb``): new reported TCB, new VCEK.

        A loaded VLEK certified for another TCB is unloaded; the host must load one for the new TCB.
        """
        with self._lock:
            self._check_live()
            self._chip = self._chip.set_tcb(current, reported=reported, commit=commit)
            self._vcek = derive_vcek(self._chip.chip_secret, self._chip.product, self._chip.reported_tcb)
            if self._vlek is not None and self._vlek.tcb != self._chip.reported_tcb:
                self._vlek, self._vlek_cert = None, None

    def vlek_load(self, hashstick: bytes, cert_der: bytes) -> None:
        """SNP_VLEK_LOAD: unwrap a vendor-issued VLEK for this chip; persisted so a restart reloads it."""
        with self._lock:
            self._install_vlek(hashstick, cert_der)
            write_atomic(self._chip.data_dir / _VLEK_FILE, hashstick, mode=PRIVATE)
            write_atomic(self._chip.data_dir / _VLEK_CERT_FILE, cert_der)

    def _install_vlek(self, hashstick: bytes, cert_der: bytes) -> None:
        vlek = unwrap_vlek(self._chip.chip_secret, hashstick)
        if vlek.product is not self._chip.product:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"VLEK is for {vlek.product.value}")
        if vlek.tcb != self._chip.reported_tcb:
            raise FirmwareError(
                FirmwareStatus.BAD_SVN,
                f"VLEK TCB {vlek.tcb.describe()} != reported TCB {self._chip.reported_tcb.describe()}",
            )
        try:
            cert_key = x509.load_der_x509_certificate(cert_der).public_key()
        except ValueError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_CERTIFICATE, "VLEK certificate is not DER X.509") from exc
        if cert_key != vlek.key.public_key():
            raise FirmwareError(FirmwareStatus.INVALID_CERTIFICATE, "VLEK certificate is for another key")
        self._vlek, self._vlek_cert = vlek, cert_der

    def _reload_vlek(self) -> None:
        stick, cert = self._chip.data_dir / _VLEK_FILE, self._chip.data_dir / _VLEK_CERT_FILE
        if stick.exists() and cert.exists():
            try:
                self._install_vlek(stick.read_bytes(), cert.read_bytes())
            except FirmwareError:
                self._vlek, self._vlek_cert = None, None  # issued for an older TCB: stays unloaded

    def get_ext_certs(self, signing_key: SigningKey | None = None) -> ExtCerts:
        """The certificates for reports signed by ``signing_key`` (default: what KEY_SEL 0 signs with)."""
        with self._lock:
            chip = self._chip
            # SigningKey.VCEK is 0 (falsy): compare with None, never use `or` here.
            kind = signing_key if signing_key is not None else (SigningKey.VLEK if self._vlek else SigningKey.VCEK)
            cached = self._cert_cache.get((kind, chip.reported_tcb))
            if cached is not None:
                return cached
            if kind is SigningKey.VLEK:
                if self._vlek_cert is None:
                    raise FirmwareError(FirmwareStatus.INVALID_KEY, "no VLEK is loaded")
                certs = ExtCerts(kind, self._vlek_cert, self._source().vlek_chain_pem(chip.product))
            elif kind is SigningKey.VCEK:
                source = self._source()
                der = source.vcek_der(chip.product, chip.hwid, chip.reported_tcb)
                certs = ExtCerts(kind, der, source.cert_chain_pem(chip.product))
            else:
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"no certificates for {kind.name}")
            self._cert_cache[(kind, chip.reported_tcb)] = certs
            return certs

    def _source(self) -> EndorsementSource:
        if self._endorsements is None:
            raise UsageError("this secure processor has no endorsement source (KDS) configured")
        return self._endorsements

    # -- guest lifecycle ---------------------------------------------------------------------------

    def _guest(self, handle: GuestHandle, *states: GuestState) -> GuestContext:
        self._check_live()
        ctx = self._guests.get(handle)
        if ctx is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no guest with handle {handle}")
        if states and ctx.state not in states:
            wanted = " or ".join(s.name for s in states)
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"guest {handle} is {ctx.state.name}, not {wanted}")
        return ctx

    def _add(self, ctx: GuestContext) -> GuestHandle:
        self._check_live()
        if len(self._guests) >= MAX_GUESTS:
            raise FirmwareError(FirmwareStatus.RESOURCE_LIMIT, f"all {MAX_GUESTS} guest slots are in use")
        handle = GuestHandle(self._next_handle)
        self._next_handle += 1
        self._guests[handle] = ctx
        return handle

    def launch_start(self, policy: int | GuestPolicy, *, gosvw: bytes = bytes(16)) -> GuestHandle:
        """SNP_GCTX_CREATE + SNP_LAUNCH_START: check the policy, create a context with fresh secrets."""
        raw = policy.to_u64() if isinstance(policy, GuestPolicy) else policy
        with self._lock:
            chip = self._chip
            checked = check_launch_policy(
                raw,
                product=chip.product,
                api_major=chip.firmware.major,
                api_minor=chip.firmware.minor,
                platform_info=chip.platform_info,
            )
            if len(gosvw) != 16:
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, "GOSVW is 16 bytes")
            ctx = GuestContext.new(
                chip.product, checked, chip.current_tcb, self._rng, launch_mit_vector=chip.mit_vector, gosvw=gosvw
            )
            handle = self._add(ctx)
            self._digests[handle] = LaunchDigest()
            return handle

    def launch_update(
        self,
        handle: GuestHandle,
        gpa: int,
        page_type: PageType,
        data: bytes | bytearray | memoryview | None = None,
        *,
        length: int | None = None,
    ) -> None:
        """SNP_LAUNCH_UPDATE for one or more contiguous pages starting at ``gpa``.

        NORMAL: ``data`` (whole pages) is measured.  VMSA: one page of ``data``.  ZERO / UNMEASURED:
        ``length`` bytes (or ``data``'s length; a writable ZERO buffer is zeroed).  SECRETS: ``data`` is a
        writable 4 KiB buffer the SP fills with the secrets page.  CPUID: ``data`` is checked.
        """
        page_type = PageType(page_type)
        with self._lock:
            ctx = self._guest(handle, GuestState.LAUNCH)
            size = len(data) if data is not None else (length if length is not None else PAGE_SIZE)
            if size <= 0 or size % PAGE_SIZE:
                raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"length {size:#x} is not a positive page multiple")
            if gpa % PAGE_SIZE or gpa < 0 or gpa + size > _MAX_GPA:
                raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, f"GPA {gpa:#x}+{size:#x} is not a valid page range")
            if page_type in (PageType.NORMAL, PageType.VMSA, PageType.SECRETS, PageType.CPUID) and data is None:
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"a {page_type.name} update needs the page data")
            if page_type in (PageType.VMSA, PageType.SECRETS, PageType.CPUID) and size != PAGE_SIZE:
                raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"a {page_type.name} update is one page")
            view = memoryview(data) if data is not None else None
            if page_type is PageType.SECRETS and view is not None:
                if view.readonly:
                    raise FirmwareError(FirmwareStatus.INVALID_PARAM, "the SECRETS page buffer must be writable")
                _write_secrets_page(view, vmpcks=ctx.vmpcks, fms=self._chip.cpuid.fms, gosvw=ctx.gosvw)
            elif page_type is PageType.CPUID and view is not None:
                check_cpuid_page(view)
            elif page_type is PageType.ZERO and view is not None and not view.readonly:
                view[:] = bytes(size)
            digest = self._digests[handle]
            for offset in range(0, size, PAGE_SIZE):
                page = view[offset : offset + PAGE_SIZE] if view is not None else None
                digest.measure(page_type, gpa + offset, page)
            ctx.launch_digest = digest.value

    def launch_finish(
        self,
        handle: GuestHandle,
        *,
        host_data: bytes = bytes(32),
        id_block: bytes | None = None,
        id_auth: bytes | None = None,
        author_key_en: bool = False,
    ) -> None:
        """SNP_LAUNCH_FINISH: verify the optional ID block, bind HOST_DATA, move the guest to RUNNING."""
        with self._lock:
            ctx = self._guest(handle, GuestState.LAUNCH)
            if len(host_data) != 32:
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, "HOST_DATA is 32 bytes")
            if (id_block is None) != (id_auth is None) or (author_key_en and id_block is None):
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, "ID_BLOCK and ID_AUTH come together")
            if id_block is not None and id_auth is not None:
                ctx.identity = verify_id_block(
                    id_block,
                    id_auth,
                    launch_digest=ctx.launch_digest,
                    policy=ctx.policy.to_u64(),
                    author_key_en=author_key_en,
                )
                ctx.flags |= ContextFlag.ID_BLOCK_EN
            ctx.host_data = bytes(host_data)
            ctx.state = GuestState.RUNNING
            del self._digests[handle]

    def activate(self, handle: GuestHandle) -> None:
        """SNP_ACTIVATE: bind the guest to its ASID (in LAUNCH or RUNNING)."""
        with self._lock:
            ctx = self._guest(handle, GuestState.LAUNCH, GuestState.RUNNING)
            ctx.flags |= ContextFlag.ACTIVATED

    def guest_request(self, handle: GuestHandle, request: bytes) -> bytes:
        """SNP_GUEST_REQUEST: relay an opaque guest message; returns the opaque response."""
        with self._lock:
            ctx = self._guest(handle, GuestState.RUNNING)
            if not ctx.flags & ContextFlag.ACTIVATED:
                raise FirmwareError(FirmwareStatus.INACTIVE, f"guest {handle} is not activated")
            # A guest keeps running during live export (its sequence numbers then travel in the mutable-state
            # bundle); anywhere else outside RUNNABLE it cannot be executing, so it cannot be asking.
            if ctx.op_state not in (OpState.RUNNABLE, OpState.LIVE_EXPORT):
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"guest {handle} is {ctx.op_state.name}")
            signers = Signers(vcek=self._vcek, vlek=self._vlek.key if self._vlek else None)
            return handle_guest_request(ctx, self._chip, signers, bytes(request))

    def guest_info(self, handle: GuestHandle) -> GuestInfo:
        with self._lock:
            ctx = self._guest(handle)
            return GuestInfo(
                state=ctx.state,
                op_state=ctx.op_state,
                activated=bool(ctx.flags & ContextFlag.ACTIVATED),
                policy=ctx.policy,
                measurement=ctx.launch_digest,
                host_data=ctx.host_data,
            )

    def decommission(self, handle: GuestHandle) -> None:
        """SNP_DECOMMISSION: destroy the context and its keys.

        Refused while the context may be the only copy of a migrating guest: during an export (LIVE, PAUSED or
        POST_EXPORT: abort first, or finish with the destination's commit receipt) and during an import
        (MEMORY/STATE_IMPORT: ``import_discard`` fails it; POST_IMPORT: the frozen source waits for its receipt).
        """
        with self._lock:
            ctx = self._guest(handle)
            if ctx.op_state not in _DECOMMISSIONABLE:
                raise FirmwareError(
                    FirmwareStatus.INVALID_GUEST_STATE, f"DECOMMISSION not allowed in op-state {ctx.op_state.name}"
                )
            self._destroy(handle)
        if self._migration is not None:
            self._migration.forget(handle)

    def _destroy(self, handle: GuestHandle) -> None:
        del self._guests[handle]
        self._digests.pop(handle, None)

    # -- for the migration commands (cvmotion.firmware.migration), same trust domain ------------------

    @property
    def migration(self) -> MigrationFirmware:
        """The export/import commands of this secure processor."""
        with self._lock:
            if self._migration is None:
                self._migration = MigrationFirmware(self)
            return self._migration

    def _guest_ctx(self, handle: GuestHandle) -> GuestContext:
        with self._lock:
            return self._guest(handle, GuestState.RUNNING)

    def _guest_op_state(self, handle: GuestHandle) -> OpState | None:
        with self._lock:
            ctx = self._guests.get(handle)
            return None if ctx is None else ctx.op_state

    def _set_op_state(self, handle: GuestHandle, op_state: OpState) -> None:
        with self._lock:
            ctx = self._guests.get(handle)
            if ctx is not None:
                ctx.op_state = op_state

    def _decommission_migrated(self, handle: GuestHandle) -> None:
        """The migration firmware's own DECOMMISSION: after a verified commit receipt, or of a failed import."""
        with self._lock:
            self._guest(handle)
            self._destroy(handle)

    def _adopt_context(self, ctx: GuestContext) -> GuestHandle:
        """Install a context that arrived inside the SP (issue 4's import path, after decrypting it)."""
        with self._lock:
            return self._add(ctx)
