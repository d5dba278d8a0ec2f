"""firmware.launch: the launch digest equals sev-snp-measure's GCTX (the oracle); order and policy checks."""

from __future__ import annotations

import struct

import pytest
from fw_helpers import PROBE_POLICY
from hypothesis import given, settings
from hypothesis import strategies as st
from sevsnpmeasure.gctx import GCTX

from cvmotion.errors import FirmwareError, FirmwareStatus
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.keys import SeededRandom
from cvmotion.firmware.launch import PAGE_SIZE, VMSA_GPA, LaunchDigest, PageType, check_cpuid_page

rand = SeededRandom(7, "launch-test")


def _oracle(ops: list[tuple[PageType, int, bytes]]) -> bytes:
    gctx = GCTX()
    for page_type, gpa, data in ops:
        if page_type is PageType.NORMAL:
            gctx.update_normal_pages(gpa, data)
        elif page_type is PageType.VMSA:
            gctx.update_vmsa_page(data)
        elif page_type is PageType.ZERO:
            gctx.update_zero_pages(gpa, len(data))
        elif page_type is PageType.UNMEASURED:
            gctx.update_unmeasured_pages(gpa, len(data))
        elif page_type is PageType.SECRETS:
            gctx.update_secrets_page(gpa)
        else:
            gctx.update_cpuid_page(gpa)
    return bytes(gctx.ld())


def _firmware(sp: SecureProcessor, ops: list[tuple[PageType, int, bytes]]) -> bytes:
    handle = sp.launch_start(PROBE_POLICY)
    for page_type, gpa, data in ops:
        if page_type in (PageType.SECRETS, PageType.CPUID, PageType.ZERO):
            sp.launch_update(handle, gpa, page_type, bytearray(data))
        elif page_type is PageType.UNMEASURED:
            sp.launch_update(handle, gpa, page_type, length=len(data))
        else:
            sp.launch_update(handle, gpa, page_type, data)
    return sp.guest_info(handle).measurement


def _empty_cpuid() -> bytes:
    return bytes(PAGE_SIZE)


@pytest.mark.parametrize(
    "ops",
    [
        [(PageType.NORMAL, 0x0, rand(3 * PAGE_SIZE))],
        [(PageType.ZERO, 0x10000, bytes(4 * PAGE_SIZE))],
        [(PageType.UNMEASURED, 0x20000, bytes(2 * PAGE_SIZE))],
        [(PageType.SECRETS, 0x5000, bytes(PAGE_SIZE))],
        [(PageType.CPUID, 0x6000, _empty_cpuid())],
        [(PageType.VMSA, VMSA_GPA, rand(PAGE_SIZE))],
        [
            (PageType.NORMAL, 0xFFFF_0000, rand(2 * PAGE_SIZE)),
            (PageType.ZERO, 0x1000, bytes(PAGE_SIZE)),
            (PageType.SECRETS, 0x3000, bytes(PAGE_SIZE)),
            (PageType.CPUID, 0x4000, _empty_cpuid()),
            (PageType.UNMEASURED, 0x8000, bytes(PAGE_SIZE)),
            (PageType.VMSA, VMSA_GPA, rand(PAGE_SIZE)),
            (PageType.VMSA, VMSA_GPA, rand(PAGE_SIZE)),
        ],
    ],
    ids=["normal", "zero", "unmeasured", "secrets", "cpuid", "vmsa", "ovmf-like-mix"],
)
def test_launch_digest_matches_gctx(sp: SecureProcessor, ops: list[tuple[PageType, int, bytes]]) -> None:
    assert _firmware(sp, ops) == _oracle(ops)


_page_types = st.sampled_from([t for t in PageType if t is not PageType.VMSA])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(_page_types, st.integers(0, 0xFFFFF), st.integers(1, 3), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=8,
    )
)
def test_launch_digest_property(steps: list[tuple[PageType, int, int, bytes]]) -> None:
    """Any sequence of updates: LaunchDigest (the primitive the SP runs) agrees with GCTX."""
    ops: list[tuple[PageType, int, bytes]] = []
    ours = LaunchDigest()
    for page_type, gfn, pages, fill in steps:
        single = page_type in (PageType.SECRETS, PageType.CPUID)
        size = PAGE_SIZE if single else pages * PAGE_SIZE
        data = (fill * size)[:size] if page_type is PageType.NORMAL else bytes(size)
        ops.append((page_type, gfn * PAGE_SIZE, data))
        for off in range(0, size, PAGE_SIZE):
            ours.measure(page_type, gfn * PAGE_SIZE + off, data[off : off + PAGE_SIZE])
    assert ours.value == _oracle(ops)


def test_one_byte_changes_the_digest(sp: SecureProcessor) -> None:
    page = bytearray(rand(PAGE_SIZE))
    first = _firmware(sp, [(PageType.NORMAL, 0, bytes(page))])
    page[0x7FF] ^= 1
    assert _firmware(sp, [(PageType.NORMAL, 0, bytes(page))]) != first
    assert _firmware(sp, [(PageType.NORMAL, PAGE_SIZE, bytes(page))]) != first


def test_secrets_page_layout(sp: SecureProcessor) -> None:
    handle = sp.launch_start(PROBE_POLICY)
    page = bytearray(b"\xaa" * PAGE_SIZE)  # the SP overwrites every byte
    sp.launch_update(handle, 0x1000, PageType.SECRETS, page)
    version, imien, fms = struct.unpack_from("<III", page, 0)
    assert version == 3
    assert imien == 0
    # Genoa is family 0x19 model 0x11 stepping 1: CPUID Fn0000_0001_EAX = 0x00A10F11.
    assert fms == 0x00A10F11
    keys = [bytes(page[0x20 + 0x20 * i : 0x40 + 0x20 * i]) for i in range(4)]
    assert len(set(keys)) == 4
    assert all(any(k) for k in keys)
    assert not any(page[0xA0:])
    other = sp.launch_start(PROBE_POLICY)
    second = bytearray(PAGE_SIZE)
    sp.launch_update(other, 0x1000, PageType.SECRETS, second)
    assert second[0x20:0xA0] != page[0x20:0xA0]  # every guest gets its own VMPCKs


def test_read_only_secrets_buffer_is_refused(sp: SecureProcessor) -> None:
    handle = sp.launch_start(PROBE_POLICY)
    with pytest.raises(FirmwareError, match="writable") as info:
        sp.launch_update(handle, 0x1000, PageType.SECRETS, bytes(PAGE_SIZE))
    assert info.value.status is FirmwareStatus.INVALID_PARAM


def test_zero_page_buffer_is_zeroed(sp: SecureProcessor) -> None:
    handle = sp.launch_start(PROBE_POLICY)
    page = bytearray(b"\x55" * 2 * PAGE_SIZE)
    sp.launch_update(handle, 0x1000, PageType.ZERO, page)
    assert not any(page)


@pytest.mark.parametrize(
    ("gpa", "data", "status"),
    [
        (0x800, bytes(PAGE_SIZE), FirmwareStatus.INVALID_ADDRESS),
        (0x1000, bytes(100), FirmwareStatus.INVALID_LENGTH),
        ((1 << 52) - PAGE_SIZE, bytes(2 * PAGE_SIZE), FirmwareStatus.INVALID_ADDRESS),
    ],
    ids=["unaligned", "partial-page", "beyond-52-bit"],
)
def test_bad_update_ranges(sp: SecureProcessor, gpa: int, data: bytes, status: FirmwareStatus) -> None:
    handle = sp.launch_start(PROBE_POLICY)
    with pytest.raises(FirmwareError) as info:
        sp.launch_update(handle, gpa, PageType.NORMAL, data)
    assert info.value.status is status


def test_cpuid_page_checks() -> None:
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<I", page, 0, 2)
    struct.pack_into("<IIQQIIII", page, 16, 0x8000001F, 0, 0, 0, 0x1, 0x2, 0x3, 0x4)
    assert check_cpuid_page(page) == 2
    struct.pack_into("<I", page, 0, 65)
    with pytest.raises(FirmwareError, match="COUNT 65"):
        check_cpuid_page(page)
    struct.pack_into("<I", page, 0, 1)
    page[16 + 0x30] = 1  # a byte after the last entry
    with pytest.raises(FirmwareError, match="reserved"):
        check_cpuid_page(page)


def test_wrong_order_is_invalid_guest_state(sp: SecureProcessor) -> None:
    handle = sp.launch_start(PROBE_POLICY)
    with pytest.raises(FirmwareError) as info:
        sp.guest_request(handle, b"\0" * 0x60)  # not RUNNING yet
    assert info.value.status is FirmwareStatus.INVALID_GUEST_STATE
    sp.launch_finish(handle)
    for call in (
        lambda: sp.launch_update(handle, 0, PageType.NORMAL, bytes(PAGE_SIZE)),
        lambda: sp.launch_finish(handle),
    ):
        with pytest.raises(FirmwareError) as info:
            call()
        assert info.value.status is FirmwareStatus.INVALID_GUEST_STATE
    with pytest.raises(FirmwareError) as info:
        sp.guest_request(handle, b"\0" * 0x60)  # RUNNING but never activated
    assert info.value.status is FirmwareStatus.INACTIVE
    sp.decommission(handle)
    with pytest.raises(FirmwareError) as info:
        sp.activate(handle)
    assert info.value.status is FirmwareStatus.INVALID_GUEST


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (0x0, "bit 17"),
        (0x20000, "SMT"),  # the platform has SMT enabled
        (0x30000 | 1 << 26, "63:26"),
        (0x30000 | 2 << 8, "ABI 2.0"),
        (0x30000 | 1 << 24, "ciphertext hiding"),
        (0x30000 | 1 << 23, "RAPL"),
    ],
    ids=["mbo-clear", "smt-denied", "reserved-bit", "abi-too-new", "ciphertext-hiding", "rapl-dis"],
)
def test_launch_start_policy_failures(sp: SecureProcessor, policy: int, match: str) -> None:
    with pytest.raises(FirmwareError, match=match) as info:
        sp.launch_start(policy)
    assert info.value.status is FirmwareStatus.POLICY_FAILURE


def test_launch_start_accepts_debug_and_migrate(sp: SecureProcessor) -> None:
    handle = sp.launch_start(0x30000 | 1 << 19 | 1 << 18 | 1 << 8 | 55)  # DEBUG, MIGRATE_MA, ABI 1.55
    assert sp.guest_info(handle).policy.debug
