"""firmware.sp_snapshot: migrations across a restart of the SP (platform process), and rollback as a fork.

A guest mid-export comes back in the same op-state but not runnable until its export is aborted or finished;
an older save of an exported guest cannot resurrect it; an import in flight cannot be sealed at all.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from mig_harness import Session, fill_guest, launch_guest, new_sp

from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError
from cvmotion.firmware.context import OpState
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.vendor import Vendor


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Session:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    fill_guest(src, random.Random(11))
    return Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))


def _restart_src(s: Session, vendor: Vendor) -> None:
    """The source's platform process restarts: seal, open in a new SP of the same chip."""
    blob = s.src.sp.seal_state()
    s.src.sp, _ = SecureProcessor.restore_sealed(s.src.sp._chip, blob, endorsements=Kds(vendor))


def test_live_export_comes_back_detached_and_not_runnable(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    s.run_precopy(random.Random(2), rounds=1)
    assert s.src.sp.migration.can_run(s.src.handle)
    _restart_src(s, emulated_vendor)
    mig = s.src.sp.migration
    assert s.src.sp.guest_info(s.src.handle).op_state is OpState.LIVE_EXPORT
    assert not mig.can_run(s.src.handle)
    with pytest.raises(FirmwareError) as err:
        mig.export_memory(s.src.handle, 0, [0x200], memoryview(bytearray(1 << 16)))
    assert err.value.status is FirmwareStatus.INVALID_GUEST_STATE
    with pytest.raises(FirmwareError):
        mig.export_pause(s.src.handle)
    mig.export_abort(s.src.handle)  # before the start token a local abort is safe: no destination can run it
    assert mig.can_run(s.src.handle)
    assert s.src.sp.guest_info(s.src.handle).op_state is OpState.RUNNABLE


def test_frozen_source_finishes_with_the_receipt_after_restart(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    s.run_precopy(random.Random(3), rounds=1)
    s.switchover()
    _restart_src(s, emulated_vendor)
    assert s.src.sp.guest_info(s.src.handle).op_state is OpState.POST_EXPORT
    assert not s.src.sp.migration.can_run(s.src.handle)
    s.deliver()
    s.dst_sp.migration.import_activate(s.ref)
    s.src.sp.migration.export_finish(s.src.handle, s.dst_sp.migration.import_commit_receipt(s.ref))
    with pytest.raises(FirmwareError):
        s.src.sp.guest_info(s.src.handle)


def test_frozen_source_resumes_with_the_abort_token_after_restart(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    s.run_precopy(random.Random(4), rounds=1)
    s.switchover()
    s.deliver(s.bundles[:-1])  # the start token never arrives
    _restart_src(s, emulated_vendor)
    token = s.dst_sp.migration.import_abort(s.ref)
    s.src.sp.migration.export_abort_with_token(s.src.handle, token)
    assert s.src.sp.migration.can_run(s.src.handle)


def test_replayed_save_cannot_resurrect_an_exported_guest(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    chip = s.src.sp._chip
    before_export = s.src.sp.seal_state()  # the host keeps a copy of the save taken while the guest was RUNNABLE
    s.src.sp, _ = SecureProcessor.restore_sealed(chip, before_export, endorsements=Kds(emulated_vendor))
    s.run_precopy(random.Random(5), rounds=1)
    s.switchover()
    s.deliver()
    s.dst_sp.migration.import_activate(s.ref)
    s.src.sp.migration.export_finish(s.src.handle, s.dst_sp.migration.import_commit_receipt(s.ref))
    s.src.sp.seal_state()  # the next maintenance
    # Opening the older save would make the guest runnable here while it runs on the destination: a fork.
    with pytest.raises(IntegrityError):
        SecureProcessor.restore_sealed(chip, before_export, endorsements=Kds(emulated_vendor))


def test_no_seal_while_an_import_is_in_flight(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    s.run_precopy(random.Random(6), rounds=1)
    s.deliver()
    with pytest.raises(FirmwareError) as err:
        s.dst_sp.seal_state()
    assert err.value.status is FirmwareStatus.INVALID_GUEST_STATE
    assert not s.dst_sp.stopped


def test_activated_import_keeps_its_receipt_across_restart(session: Session, emulated_vendor: Vendor) -> None:
    s = session
    s.run_precopy(random.Random(8), rounds=1)
    s.switchover()
    s.deliver()
    handle = s.dst_sp.migration.import_activate(s.ref)
    receipt = s.dst_sp.migration.import_commit_receipt(s.ref)
    blob = s.dst_sp.seal_state()
    dst, _ = SecureProcessor.restore_sealed(s.dst_sp._chip, blob, endorsements=Kds(emulated_vendor))
    assert dst.migration.import_commit_receipt(s.ref) == receipt
    assert dst.migration.can_run(handle)
    s.src.sp.migration.export_finish(s.src.handle, receipt)
