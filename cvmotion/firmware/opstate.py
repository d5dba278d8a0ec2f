"""firmware layer: the migration op-state machines of a guest context and the stream ordering rules.

Pure logic (no crypto, no I/O), shared by the emulated secure processor and the exhaustive model check in
the test suite, so the model checks the very transitions the firmware runs.

Source (export) op-states::

        start_export            pause              start token
  RUNNABLE ─────────► LIVE_EXPORT ─────► PAUSED_EXPORT ─────────► POST_EXPORT ──► DECOMMISSIONED
     ▲                    │                  │                        │ (commit confirmed)
     └──── local abort ───┴──────────────────┘                        │
     └──────────────────── abort token (MAC'd under K_b) ─────────────┘

Destination (import) op-states::

  MEMORY_IMPORT ──first state bundle──► STATE_IMPORT ──start token──► POST_IMPORT ──activate──► RUNNABLE
        │                                   │                       (commit: no abort token
        └───────────── any failure ─────────┴──► FAILED (terminal)   can be produced any more)

Rules that make a fork impossible (DESIGN section 6):
- the source can run only in RUNNABLE; it emits the start token only when paused with every page exported
  and clean, and from then on it is frozen;
- the destination runs only after verifying the start token;
- a frozen source resumes only with an abort token, which the destination produces only before commit and
  whose production makes the destination FAILED for ever.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError, FirmwareStatus

__all__ = [
    "ExportOpState",
    "ExportSession",
    "ImportOpState",
    "ImportRules",
    "STATE_BUNDLES",
]


class ExportOpState(enum.Enum):
    RUNNABLE = "RUNNABLE"
    LIVE_EXPORT = "LIVE_EXPORT"
    PAUSED_EXPORT = "PAUSED_EXPORT"
    POST_EXPORT = "POST_EXPORT"
    DECOMMISSIONED = "DECOMMISSIONED"


class ImportOpState(enum.Enum):
    MEMORY_IMPORT = "MEMORY_IMPORT"
    STATE_IMPORT = "STATE_IMPORT"
    POST_IMPORT = "POST_IMPORT"
    RUNNABLE = "RUNNABLE"
    FAILED = "FAILED"


# The state bundles a destination must hold before it may commit.
STATE_BUNDLES = frozenset({BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE})


def _bad_state(what: str, state: enum.Enum) -> FirmwareError:
    return FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"{what} not allowed in op-state {state.value}")


@dataclass(slots=True)
class ExportSession:
    """Source-side op-state and the per-stream counters the sender must use (sender never reuses an IV)."""

    state: ExportOpState = ExportOpState.RUNNABLE
    epoch: int = 0
    bundles_in_epoch: int = 0
    mb_counters: dict[int, int] = field(default_factory=dict)
    iv_counters: dict[int, int] = field(default_factory=dict)
    state_exported: set[BundleType] = field(default_factory=set)

    @property
    def can_run(self) -> bool:
        return self.state is ExportOpState.RUNNABLE

    def start(self) -> None:
        if self.state is not ExportOpState.RUNNABLE:
            raise _bad_state("EXPORT_START", self.state)
        self.state = ExportOpState.LIVE_EXPORT

    def pause(self) -> None:
        if self.state is not ExportOpState.LIVE_EXPORT:
            raise _bad_state("EXPORT_PAUSE", self.state)
        self.state = ExportOpState.PAUSED_EXPORT

    def next_slot(self, stream: int, units: int, kind: BundleType) -> tuple[int, int, int]:
        """Reserve (mb_counter, epoch, iv_counter) for a bundle of ``units`` payload units on ``stream``."""
        if kind is BundleType.MEMORY and self.state not in (ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT):
            raise _bad_state("EXPORT_MEM", self.state)
        if kind in STATE_BUNDLES and self.state is not ExportOpState.PAUSED_EXPORT:
            raise _bad_state(f"EXPORT_{kind.name}", self.state)
        mb = self.mb_counters.get(stream, 0)
        iv = self.iv_counters.get(stream, 0)
        self.mb_counters[stream] = mb + 1
        self.iv_counters[stream] = iv + 1 + units
        if kind is not BundleType.EPOCH_TOKEN and kind is not BundleType.START_TOKEN:
            self.bundles_in_epoch += 1
        if kind in STATE_BUNDLES:
            self.state_exported.add(kind)
        return mb, self.epoch, iv

    def close_epoch(self) -> int:
        """Account for an epoch token: returns total_mb of the closing epoch and opens the next one."""
        if self.state not in (ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT):
            raise _bad_state("EXPORT_TRACK (epoch token)", self.state)
        total = self.bundles_in_epoch
        self.epoch += 1
        self.bundles_in_epoch = 0
        return total

    def emit_start_token(self, *, all_pages_clean: bool) -> int:
        """Freeze the source for good; returns total_mb of the final epoch."""
        if self.state is not ExportOpState.PAUSED_EXPORT:
            raise _bad_state("EXPORT_TRACK (start token)", self.state)
        if not all_pages_clean:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "start token refused: dirty or unexported pages")
        if self.state_exported != STATE_BUNDLES:
            missing = ", ".join(sorted(k.name for k in STATE_BUNDLES - self.state_exported))
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"start token refused: {missing} not exported")
        self.state = ExportOpState.POST_EXPORT
        return self.bundles_in_epoch

    def abort_local(self) -> None:
        """Abort before the start token: the source may resume on its own authority."""
        if self.state not in (ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT):
            raise _bad_state("EXPORT_ABORT without token", self.state)
        self.state = ExportOpState.RUNNABLE

    def abort_with_token(self) -> None:
        """Called only after the abort token's MAC under K_b verified."""
        if self.state is ExportOpState.RUNNABLE:
            return  # already resumed by a local abort; a duplicate token changes nothing
        if self.state is not ExportOpState.POST_EXPORT and self.state not in (
            ExportOpState.LIVE_EXPORT,
            ExportOpState.PAUSED_EXPORT,
        ):
            raise _bad_state("EXPORT_ABORT with token", self.state)
        self.state = ExportOpState.RUNNABLE

    def decommission(self) -> None:
        if self.state not in (ExportOpState.POST_EXPORT, ExportOpState.RUNNABLE):
            raise _bad_state("DECOMMISSION", self.state)
        self.state = ExportOpState.DECOMMISSIONED


@dataclass(slots=True)
class ImportRules:
    """Destination-side ordering rules, applied to bundles whose MAC already verified.

    Any violation makes the context FAILED (fatal). The caller turns that into an opaque IntegrityError.
    """

    state: ImportOpState = ImportOpState.MEMORY_IMPORT
    epoch: int = 0
    received_in_epoch: int = 0
    mb_counters: dict[int, int] = field(default_factory=dict)
    iv_next: dict[int, int] = field(default_factory=dict)
    gpas_in_epoch: set[int] = field(default_factory=set)
    state_received: set[BundleType] = field(default_factory=set)
    abort_token_issued: bool = False

    @property
    def can_run(self) -> bool:
        return self.state is ImportOpState.RUNNABLE

    @property
    def committed(self) -> bool:
        return self.state in (ImportOpState.POST_IMPORT, ImportOpState.RUNNABLE)

    def fail(self) -> None:
        if not self.committed:
            self.state = ImportOpState.FAILED

    def check_bundle(self, stream: int, kind: BundleType, mb_counter: int, epoch: int, iv_counter: int) -> bool:
        """Counter/epoch/order checks for one authenticated bundle. False ⇒ the caller must fail the context."""
        if self.state not in (ImportOpState.MEMORY_IMPORT, ImportOpState.STATE_IMPORT):
            return False
        if mb_counter != self.mb_counters.get(stream, 0):
            return False
        if iv_counter != self.iv_next.get(stream, 0):
            return False
        if epoch != self.epoch:
            return False
        if kind is BundleType.EPOCH_TOKEN and self.state is not ImportOpState.MEMORY_IMPORT:
            return False
        # The immutable state is accepted once, when the import context is created, never as a stream bundle.
        return kind is not BundleType.IMMUTABLE_STATE

    def accept_bundle(self, stream: int, kind: BundleType, units: int) -> None:
        """Record a bundle that passed ``check_bundle`` and whose payload authenticated."""
        self.mb_counters[stream] = self.mb_counters.get(stream, 0) + 1
        self.iv_next[stream] = self.iv_next.get(stream, 0) + 1 + units
        if kind is not BundleType.EPOCH_TOKEN and kind is not BundleType.START_TOKEN:
            self.received_in_epoch += 1
        if kind in STATE_BUNDLES:
            if kind in self.state_received:
                self.fail()
                return
            self.state_received.add(kind)
            self.state = ImportOpState.STATE_IMPORT

    def claim_gpa(self, gpa: int) -> bool:
        """A GPA may appear at most once per epoch (a replayed page could roll memory back)."""
        if gpa in self.gpas_in_epoch:
            return False
        self.gpas_in_epoch.add(gpa)
        return True

    def close_epoch(self, total_mb: int) -> bool:
        """Epoch token: the count must match what arrived (catches dropped or withheld bundles)."""
        if total_mb != self.received_in_epoch:
            return False
        self.epoch += 1
        self.received_in_epoch = 0
        self.gpas_in_epoch.clear()
        return True

    def commit(self, total_mb: int) -> bool:
        """Start token: the final epoch is complete and all state arrived; the point of no return."""
        if self.state is not ImportOpState.STATE_IMPORT or self.abort_token_issued:
            return False
        if total_mb != self.received_in_epoch or self.state_received != STATE_BUNDLES:
            return False
        self.state = ImportOpState.POST_IMPORT
        return True

    def activate(self) -> None:
        if self.state is not ImportOpState.POST_IMPORT:
            raise _bad_state("ACTIVATE (import)", self.state)
        self.state = ImportOpState.RUNNABLE

    def issue_abort_token(self) -> bool:
        """True when an abort token may be produced; producing it fails the context for ever."""
        if self.committed:
            return False
        self.state = ImportOpState.FAILED
        self.abort_token_issued = True
        return True
