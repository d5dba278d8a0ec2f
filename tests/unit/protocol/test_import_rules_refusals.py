"""Each refusal of the migration op-states and the firmware's migration commands, one at a time.

The stream attacks (test_stream_attacks_refused) are caught by several checks at once (a reordered bundle
breaks both its counters); here every check is the only thing between one violation and its acceptance, so
removing any one of them fails a test (``make mutants`` keeps that true).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mig_harness import MEMORY, FakeHardware, LaunchedGuest, Session, filled_session

from cvmotion.abi.guest_msg import GuestChannel, GuestFieldSelect, KeyReq, KeyRsp, RootKey
from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError
from cvmotion.firmware.opstate import STATE_BUNDLES, ExportOpState, ExportSession, ImportOpState, ImportRules
from cvmotion.firmware.vendor import Vendor
from cvmotion.vmm.memory import GuestMemory

pytestmark = pytest.mark.timeout(60)

MEM, VCPU, DEV, MUT = BundleType.MEMORY, BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE


def _rules_after_one_bundle() -> ImportRules:
    """Stream 0 took one memory bundle of 3 pages: next mb_counter 1, next IV counter 4, epoch 0."""
    rules = ImportRules()
    assert rules.check_bundle(0, MEM, 0, 0, 0)
    rules.accept_bundle(0, MEM, 3)
    return rules


# -- ImportRules.check_bundle: each field refused on its own ------------------------------------------------


def test_the_honest_next_bundle_is_accepted() -> None:
    assert _rules_after_one_bundle().check_bundle(0, MEM, 1, 0, 4)


@pytest.mark.parametrize(
    ("mb", "epoch", "iv", "what"),
    [
        (2, 0, 4, "mb_counter skips one"),
        (0, 0, 4, "mb_counter repeats"),
        (1, 1, 4, "epoch ahead"),
        (1, 0, 3, "IV counter reused"),
        (1, 0, 5, "IV counter skips"),
    ],  # fmt: skip
    ids=["mb-skip", "mb-repeat", "epoch", "iv-reuse", "iv-skip"],
)
def test_one_wrong_field_is_refused(mb: int, epoch: int, iv: int, what: str) -> None:
    assert not _rules_after_one_bundle().check_bundle(0, MEM, mb, epoch, iv), what


@pytest.mark.parametrize("state", [ImportOpState.FAILED, ImportOpState.POST_IMPORT, ImportOpState.RUNNABLE])
def test_no_bundle_after_failure_or_commit(state: ImportOpState) -> None:
    rules = _rules_after_one_bundle()
    rules.state = state
    assert not rules.check_bundle(0, MEM, 1, 0, 4)


def test_the_guest_context_is_never_a_stream_bundle() -> None:
    assert not _rules_after_one_bundle().check_bundle(0, BundleType.IMMUTABLE_STATE, 1, 0, 4)


def test_a_state_bundle_twice_fails_the_import() -> None:
    rules = _rules_after_one_bundle()
    rules.accept_bundle(0, VCPU, 1)
    assert rules.state is ImportOpState.STATE_IMPORT
    rules.accept_bundle(0, VCPU, 1)
    assert rules.state is ImportOpState.FAILED


# -- ImportRules.commit -------------------------------------------------------------------------------------


def _ready_to_commit(*kinds: BundleType) -> ImportRules:
    rules = _rules_after_one_bundle()
    for kind in kinds:
        rules.accept_bundle(0, kind, 1)
    return rules


def test_commit_with_every_state_bundle() -> None:
    rules = _ready_to_commit(VCPU, DEV, MUT)
    assert rules.commit(4)
    assert rules.state is ImportOpState.POST_IMPORT


@pytest.mark.parametrize("missing", sorted(STATE_BUNDLES, key=int), ids=lambda k: k.name)
def test_no_commit_without_a_state_bundle(missing: BundleType) -> None:
    rules = _ready_to_commit(*(k for k in (VCPU, DEV, MUT) if k is not missing))
    assert not rules.commit(3)  # the total is right: only the missing state refuses
    assert rules.state is ImportOpState.STATE_IMPORT


def test_no_commit_once_an_abort_token_was_issued() -> None:
    rules = _ready_to_commit(VCPU, DEV, MUT)
    rules.abort_token_issued = True  # even were the state left importing, the token forbids the commit
    assert not rules.commit(4)


# -- ExportSession.emit_start_token ---------------------------------------------------------------------


@pytest.mark.parametrize("missing", sorted(STATE_BUNDLES, key=int), ids=lambda k: k.name)
def test_no_start_token_before_every_state_bundle(missing: BundleType) -> None:
    session = ExportSession()
    session.start()
    session.pause()
    for kind in STATE_BUNDLES - {missing}:
        session.next_slot(0, 1, kind)
    with pytest.raises(FirmwareError, match=missing.name):
        session.emit_start_token(all_pages_clean=True)
    assert session.state is ExportOpState.PAUSED_EXPORT


# -- MigrationFirmware: single-use keys, one export at a time ---------------------------------------------


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Session:
    return filled_session(emulated_vendor, tmp_path, 31)


def test_forward_key_installed_once(session: Session) -> None:
    s = session
    s.setup()
    mig = s.dst_sp.migration
    with pytest.raises(FirmwareError, match="forward key already installed"):
        mig.ma_import_install_forward_key(s.ref, bytes(32))


def test_backward_key_generated_once(session: Session) -> None:
    s = session
    s.setup()
    with pytest.raises(FirmwareError, match="backward key already generated"):
        s.dst_sp.migration.ma_import_generate_backward_key(s.ref)


def test_one_export_session_at_a_time(session: Session) -> None:
    s = session
    s.setup()
    with pytest.raises(FirmwareError, match="already in progress"):
        s.src.sp.migration.ma_export_prepare(s.src.handle, bytes(16))
    assert s.src.sp.migration.export_status(s.src.handle) == ExportOpState.LIVE_EXPORT.value


def test_a_gfn_beyond_the_destinations_memory_fails_the_import(session: Session) -> None:
    s = session
    s.dst_hw = FakeHardware(GuestMemory(MEMORY // 4))  # the host gave the import a smaller VM
    s.setup()
    s.send_pages([0x200, (MEMORY >> 12) - 1])
    with pytest.raises(Exception, match="integrity check failed"):
        s.deliver()
    assert s.dst_sp.migration.import_state(s.ref) == "FAILED"


# -- guest messages: derived keys ---------------------------------------------------------------------------


def _channel(guest: LaunchedGuest, vmpck_id: int) -> GuestChannel:
    secrets = guest.hw.memory.read(0x1000, 4096)
    key = secrets[0x20 + 32 * vmpck_id : 0x40 + 32 * vmpck_id]
    return GuestChannel(key, vmpck_id=vmpck_id)


def _key(guest: LaunchedGuest, channel: GuestChannel, req: KeyReq) -> KeyRsp:
    return KeyRsp.from_bytes(channel.open_response(guest.sp.guest_request(guest.handle, channel.key_request(req))))


def test_a_derived_key_for_a_more_privileged_vmpl_is_refused(session: Session) -> None:
    guest = session.src
    vmpl1 = _channel(guest, 1)
    assert _key(guest, vmpl1, KeyReq(root_key=RootKey.VMRK, vmpl=1)).status == 0
    refused = _key(guest, vmpl1, KeyReq(root_key=RootKey.VMRK, vmpl=0))
    assert refused.status != 0
    assert refused.derived_key == bytes(32)


def test_a_derived_key_for_a_future_guest_svn_is_refused(session: Session) -> None:
    guest = session.src
    vmpl0 = _channel(guest, 0)
    fields = GuestFieldSelect.GUEST_SVN
    assert _key(guest, vmpl0, KeyReq(guest_field_select=fields, guest_svn=0)).status == 0
    refused = _key(guest, vmpl0, KeyReq(guest_field_select=fields, guest_svn=1))
    assert refused.status != 0
    assert refused.derived_key == bytes(32)
