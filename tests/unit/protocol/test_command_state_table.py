"""Every secure-processor command a (hostile) host can send, in every reachable op-state: the table below is the
contract (docs/design.md prints the same table, and a test keeps the two equal).

For each (command, state) the test drives a fresh migration into that state with the honest engine, then:
- ``ok``: the command, given what an honest engine would give it, succeeds;
- ``no``: the command is refused (``FirmwareError`` or the opaque ``IntegrityError``) even with the best input a
  host can have (genuine guest messages, genuine bundles, the real abort token or receipt where one exists),
  and the op-states of both ends are what they were (an import refusing a bundle is FAILED by design: ``FAIL``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mig_harness import Session, launch_guest, new_sp

from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError, IntegrityError
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor
from cvmotion.testing.hostcmd import forge_abort_token

ROOT = Path(__file__).resolve().parents[3]
SOURCE_STATES = ("RUNNABLE", "PREPARED", "LIVE_EXPORT", "PAUSED_EXPORT", "POST_EXPORT", "DECOMMISSIONED")
DEST_STATES = ("MEMORY_IMPORT", "STATE_IMPORT", "POST_IMPORT", "RUNNABLE", "FAILED")

# command -> the source (export) states in which it is allowed; every other source state refuses it.
SOURCE_TABLE: dict[str, frozenset[str]] = {
    "LAUNCH_UPDATE": frozenset(),
    "LAUNCH_FINISH": frozenset(),
    "GUEST_REQUEST": frozenset({"RUNNABLE", "PREPARED", "LIVE_EXPORT"}),
    "DECOMMISSION": frozenset({"RUNNABLE", "PREPARED"}),
    "EXPORT_START": frozenset({"PREPARED"}),
    "EXPORT_IMMUTABLE": frozenset({"LIVE_EXPORT"}),
    "EXPORT_MEMORY": frozenset({"LIVE_EXPORT", "PAUSED_EXPORT"}),
    "EXPORT_EPOCH_TOKEN": frozenset({"LIVE_EXPORT", "PAUSED_EXPORT"}),
    "EXPORT_PAUSE": frozenset({"LIVE_EXPORT"}),
    "EXPORT_STATE": frozenset({"PAUSED_EXPORT"}),
    "EXPORT_START_TOKEN": frozenset({"PAUSED_EXPORT"}),
    "EXPORT_SWITCHOVER": frozenset({"LIVE_EXPORT"}),
    "EXPORT_ABORT": frozenset({"PREPARED", "LIVE_EXPORT", "PAUSED_EXPORT"}),
    "EXPORT_ABORT_WITH_TOKEN": frozenset({"PREPARED", "LIVE_EXPORT", "PAUSED_EXPORT", "POST_EXPORT"}),
    "EXPORT_FINISH": frozenset({"POST_EXPORT"}),
}
# command -> the destination (import) states in which it is allowed.
DEST_TABLE: dict[str, frozenset[str]] = {
    "IMPORT_BUNDLE": frozenset({"MEMORY_IMPORT", "STATE_IMPORT"}),
    "IMPORT_ABORT": frozenset({"MEMORY_IMPORT", "STATE_IMPORT", "FAILED"}),
    "IMPORT_ACTIVATE": frozenset({"POST_IMPORT"}),
    "IMPORT_COMMIT_RECEIPT": frozenset({"POST_IMPORT", "RUNNABLE"}),
    "IMPORT_DISCARD": frozenset({"MEMORY_IMPORT", "STATE_IMPORT", "FAILED"}),
    "DECOMMISSION": frozenset({"RUNNABLE", "FAILED"}),
    "GUEST_REQUEST": frozenset({"RUNNABLE"}),
}


@dataclass
class World:
    """One migration driven into a chosen state; ``held`` are honest bundles not yet delivered."""

    s: Session
    held: list[tuple[int, bytes]]

    @property
    def mig_src(self):  # type: ignore[no-untyped-def]
        return self.s.src.sp.migration

    @property
    def mig_dst(self):  # type: ignore[no-untyped-def]
        return self.s.dst_sp.migration

    def source_state(self) -> str:
        try:
            self.s.src.sp.guest_info(self.s.src.handle)
        except FirmwareError:
            return "DECOMMISSIONED"
        state = self.mig_src.export_status(self.s.src.handle)
        return "PREPARED" if state == "RUNNABLE" and self.s.src.handle in self.mig_src._exports else state

    def dest_state(self) -> str:
        return str(self.mig_dst.import_state(self.s.ref))


def _session(vendor: Vendor, tmp: Path) -> Session:
    s = Session(launch_guest(new_sp(vendor, tmp / "src")), new_sp(vendor, tmp / "dst"))
    s.src.hw.guest_write(0x200000, b"a page of guest data")
    return s


def _prepare(s: Session) -> None:
    mig_src, mig_dst = s.src.sp.migration, s.dst_sp.migration
    k_f = mig_src.ma_export_prepare(s.src.handle, s.session_id)
    s.ref = mig_dst.import_prepare(s.session_id, s.dst_hw)
    mig_dst.ma_import_install_forward_key(s.ref, k_f)
    mig_src.ma_export_install_backward_key(s.src.handle, mig_dst.ma_import_generate_backward_key(s.ref))


def _live(s: Session) -> None:
    _prepare(s)
    s.src.sp.migration.export_start(s.src.handle, s.src.hw)
    s.bundles.append((0, s.src.sp.migration.export_immutable(s.src.handle, 0)))
    s.src.hw.harvest()
    ranges = s.src.hw.memory.populated_ranges()
    s.send_pages([g for gpa, length in ranges for g in range(gpa >> 12, (gpa + length) >> 12)])
    s.epoch()


def _paused(s: Session) -> None:
    _live(s)
    s.src.hw.paused = True
    s.src.sp.migration.export_pause(s.src.handle)


def _post(s: Session) -> None:
    _paused(s)
    mig = s.src.sp.migration
    s.send_pages(s.src.hw.harvest())
    for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
        s.bundles.append((0, mig.export_state(s.src.handle, 0, kind)))
    s.bundles.append((0, mig.export_start_token(s.src.handle, 0)))


def source_world(vendor: Vendor, tmp: Path, state: str) -> World:
    s = _session(vendor, tmp)
    steps: dict[str, Callable[[Session], None]] = {
        "RUNNABLE": lambda _: None,
        "PREPARED": _prepare,
        "LIVE_EXPORT": _live,
        "PAUSED_EXPORT": _paused,
        "POST_EXPORT": _post,
    }
    if state == "DECOMMISSIONED":
        _post(s)
        s.deliver()
        s.src.sp.migration.export_finish(s.src.handle, s.dst_sp.migration.import_commit_receipt(s.ref))
    else:
        steps[state](s)
    world = World(s, held=[])
    assert world.source_state() == state
    return world


def dest_world(vendor: Vendor, tmp: Path, state: str) -> World:
    s = _session(vendor, tmp)
    _post(s)
    first_state = next(i for i, (_, b) in enumerate(s.bundles) if b[6] == BundleType.VCPU_STATE)
    start = len(s.bundles) - 1
    cut = {"MEMORY_IMPORT": first_state, "STATE_IMPORT": first_state + 1, "FAILED": 1}.get(state, len(s.bundles))
    s.deliver(s.bundles[:cut])
    if state == "FAILED":
        with pytest.raises(IntegrityError):
            s.dst_sp.migration.import_bundle(s.ref, s.bundles[start][1])  # the start token, far too early
    if state == "RUNNABLE":
        s.dst_sp.migration.import_activate(s.ref)
    world = World(s, held=s.bundles[cut:])
    assert world.dest_state() == state, (world.dest_state(), state)
    return world


def _refused(call: Callable[[], object]) -> None:
    with pytest.raises((FirmwareError, IntegrityError)):
        call()


def _source_command(w: World, command: str) -> Callable[[], object]:
    s, h = w.s, w.s.src.handle
    mig, sp = w.mig_src, s.src.sp
    page = s.src.hw.memory.view(0x300000, PAGE_SIZE)
    channel = s.src.channel
    genuine_abort = None
    if command == "EXPORT_ABORT_WITH_TOKEN":
        try:
            genuine_abort = w.mig_dst.import_abort(s.ref)  # the best a host can have: the real token
        except FirmwareError:
            genuine_abort = forge_abort_token(s.session_id)
    receipt = b"\x00" * 88
    if command == "EXPORT_FINISH" and w.source_state() == "POST_EXPORT":
        s.deliver()
        receipt = w.mig_dst.import_commit_receipt(s.ref)

    def start_token() -> object:
        for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
            mig.export_state(h, 0, kind)
        return mig.export_start_token(h, 0)

    def pause() -> object:
        s.src.hw.paused = True
        return mig.export_pause(h)

    out = memoryview(bytearray(1 << 16))
    return {
        "LAUNCH_UPDATE": lambda: sp.launch_update(h, 0x300000, PageType.NORMAL, page),
        "LAUNCH_FINISH": lambda: sp.launch_finish(h),
        "GUEST_REQUEST": lambda: sp.guest_request(h, channel.report_request(bytes(64))),
        "DECOMMISSION": lambda: sp.decommission(h),
        "EXPORT_START": lambda: mig.export_start(h, s.src.hw),
        "EXPORT_IMMUTABLE": lambda: mig.export_immutable(h, 0),
        "EXPORT_MEMORY": lambda: mig.export_memory(h, 1, [0x200], out),
        "EXPORT_EPOCH_TOKEN": lambda: mig.export_epoch_token(h, 0),
        "EXPORT_PAUSE": pause,
        "EXPORT_STATE": lambda: mig.export_state(h, 0, BundleType.VCPU_STATE),
        "EXPORT_START_TOKEN": start_token,
        "EXPORT_SWITCHOVER": lambda: mig.export_switchover(h, 0),
        "EXPORT_ABORT": lambda: mig.export_abort(h),
        "EXPORT_ABORT_WITH_TOKEN": lambda: mig.export_abort_with_token(h, genuine_abort or b""),
        "EXPORT_FINISH": lambda: mig.export_finish(h, receipt),
    }[command]


def _dest_command(w: World, command: str) -> Callable[[], object]:
    mig, s = w.mig_dst, w.s
    handle = mig.import_handle(s.ref)
    nxt = w.held[0][1] if w.held else s.bundles[-1][1]
    channel = s.src.channel
    return {
        "IMPORT_BUNDLE": lambda: mig.import_bundle(s.ref, nxt),
        "IMPORT_ABORT": lambda: mig.import_abort(s.ref),
        "IMPORT_ACTIVATE": lambda: mig.import_activate(s.ref),
        "IMPORT_COMMIT_RECEIPT": lambda: mig.import_commit_receipt(s.ref),
        "IMPORT_DISCARD": lambda: mig.import_discard(s.ref),
        "DECOMMISSION": lambda: s.dst_sp.decommission(handle if handle is not None else 999),
        "GUEST_REQUEST": lambda: s.dst_sp.guest_request(
            handle if handle is not None else 999, channel.report_request(bytes(64))
        ),
    }[command]


@pytest.mark.parametrize("state", SOURCE_STATES)
@pytest.mark.parametrize("command", sorted(SOURCE_TABLE))
def test_source_command_in_state(emulated_vendor: Vendor, tmp_path: Path, command: str, state: str) -> None:
    w = source_world(emulated_vendor, tmp_path, state)
    call = _source_command(w, command)
    if state in SOURCE_TABLE[command]:
        call()
        return
    dest_before = w.dest_state() if w.s.ref else None
    _refused(call)
    assert w.source_state() == state
    if dest_before is not None and command != "EXPORT_ABORT_WITH_TOKEN":  # that one asked the destination
        assert w.dest_state() == dest_before


@pytest.mark.parametrize("state", DEST_STATES)
@pytest.mark.parametrize("command", sorted(DEST_TABLE))
def test_destination_command_in_state(emulated_vendor: Vendor, tmp_path: Path, command: str, state: str) -> None:
    w = dest_world(emulated_vendor, tmp_path, state)
    call = _dest_command(w, command)
    if state in DEST_TABLE[command]:
        call()
        return
    _refused(call)
    # A refused bundle fails the import for ever (by design) unless it had committed; nothing else moves.
    expected = "FAILED" if command == "IMPORT_BUNDLE" and state in ("MEMORY_IMPORT", "STATE_IMPORT") else state
    assert w.dest_state() == expected


def _docs_table(title: str) -> dict[str, frozenset[str]]:
    lines = (ROOT / "docs" / "design.md").read_text().splitlines()
    start = lines.index(title)
    rows: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    header = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    table = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = frozenset(h for h, c in zip(header, cells[1:], strict=True) if c == "ok")
    return table


def test_the_design_document_prints_the_same_table() -> None:
    assert _docs_table("#### Source commands × export op-state") == SOURCE_TABLE
    assert _docs_table("#### Destination commands × import op-state") == DEST_TABLE


def test_every_host_migration_command_is_in_the_table() -> None:
    from cvmotion.platformd.protocol import HostCommand

    commands = {c.name for c in HostCommand if re.match(r"(export|import)_", c.value)}
    covered = set(SOURCE_TABLE) | set(DEST_TABLE)
    # export_final is export_state x3 + export_start_token in one call; import_status/export_status only read.
    assert commands - covered <= {"EXPORT_FINAL", "EXPORT_STATUS", "IMPORT_STATUS"}, commands - covered
