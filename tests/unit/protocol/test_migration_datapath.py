"""firmware.migration's data path (firmware.mig_pages): the per-page IVs and AADs, the zero test, the metadata
parse, and the import's "nothing reaches guest memory before every tag of the bundle verified" rule."""

from __future__ import annotations

import ctypes
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mig_harness import MEMORY, FakeHardware, Session, launch_guest, new_sp

from cvmotion.abi import wire
from cvmotion.abi.gfns import long_runs, sorted_union
from cvmotion.abi.wire import BundleType, bundle_capacity
from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError, MalformedStructure
from cvmotion.firmware import mig_pages, native_gcm
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.vendor import Vendor
from cvmotion.vmm.memory import GuestMemory

PAGE = wire.PAGE_SIZE


NATIVE = native_gcm.load()
PATHS = [
    pytest.param("native", marks=pytest.mark.skipif(NATIVE is None, reason="native/cvmgcm.c not built")),
    "python",
]


def _use(sp: SecureProcessor, path: str) -> None:
    """Seal/open through the native shim (one OpenSSL call per bundle) or page by page in Python."""
    sp.migration._native = NATIVE if path == "native" else None


@pytest.fixture(params=PATHS)
def session(emulated_vendor: Vendor, tmp_path: Path, request: pytest.FixtureRequest) -> Session:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    s = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))
    _use(src.sp, request.param)
    _use(s.dst_sp, request.param)
    s.setup()
    s.deliver()  # the immutable state
    s.bundles.clear()
    return s


def _seal(s: Session, gfns: list[int], stream: int = 0) -> bytes:
    out = bytearray(bundle_capacity(wire.MAX_PAGES_PER_BUNDLE))
    n = s.src.sp.migration.export_memory(s.src.handle, stream, np.asarray(gfns, dtype=np.uint64), memoryview(out))
    return bytes(out[:n])


def test_ivs_and_aads_are_the_wire_formats() -> None:
    rng = random.Random(11)
    for _ in range(50):
        first, count, stream = rng.randrange(1 << 62), rng.randrange(1, 40), rng.randrange(1 << 16)
        ivs = mig_pages.gcm_ivs(first, count, stream)
        assert [bytes(ivs[12 * k : 12 * k + 12]) for k in range(count)] == [
            wire.gcm_iv(first + k, stream) for k in range(count)
        ]
        head = rng.randbytes(wire.HEADER_SIZE)
        entries = [rng.randrange(1 << 52) << 12 | rng.randrange(2) for _ in range(count)]
        aads = mig_pages.page_aads(head, np.asarray(entries, dtype=np.uint64))
        assert [bytes(aads[32 * k : 32 * k + 32]) for k in range(count)] == [
            wire.aad_for_page(head, e) for e in entries
        ]


def test_zero_test_finds_a_single_byte_in_long_and_short_runs() -> None:
    memory = GuestMemory(MEMORY)
    try:
        long_run = list(range(0x200, 0x240))  # vectorised
        scattered = [0x300, 0x302, 0x307]  # compared page by page
        for gfn in (0x205, 0x23F, 0x302):
            memory.write((gfn << 12) + PAGE - 1, b"\x01")  # only the last byte of the page
        for gfn in (0x210, 0x307):
            memory.write(gfn << 12, b"\x80")  # only the first byte: decided by the first word alone
        gfns = np.asarray(long_run + scattered, dtype=np.uint64)
        nonzero, addresses, mapped = mig_pages.page_reads(memory, gfns)
        expected = [g in (0x205, 0x210, 0x23F, 0x302, 0x307) for g in long_run + scattered]
        assert nonzero.tolist() == expected
        assert addresses[1] - addresses[0] == PAGE
        assert ctypes.string_at(int(addresses[-3]), PAGE) == memory.read(0x300 << 12, PAGE)
        views = mig_pages.page_views(memory, gfns)
        assert [bytes(v) for v in views[:2]] == [memory.read(0x200 << 12, PAGE), memory.read(0x201 << 12, PAGE)]
        del views, mapped  # the mapping cannot close while views of it exist
    finally:
        memory.close()


def test_zero_test_matches_a_byte_compare_on_random_pages() -> None:
    rng = random.Random(17)
    memory = GuestMemory(MEMORY)
    try:
        gfns = sorted(rng.sample(range(0x200, 0x600), 300))  # runs and scattered pages
        for gfn in gfns:
            if rng.random() < 0.5:  # the rest stay zero
                memory.write((gfn << 12) + rng.randrange(PAGE), bytes([rng.randrange(1, 256)]))
        nonzero, _addresses, mapped = mig_pages.page_reads(memory, np.asarray(gfns, dtype=np.uint64))
        del mapped
        assert nonzero.tolist() == [memory.read(g << 12, PAGE) != bytes(PAGE) for g in gfns]
    finally:
        memory.close()


def test_metadata_parse_matches_the_abi_parser() -> None:
    entries = [(0x1234 + i) << 12 | (i & 1) for i in range(7)]
    meta = wire.pack_memory_metadata(entries)
    assert mig_pages.memory_entries(meta).tolist() == list(wire.parse_memory_metadata(meta))
    bad = [
        meta[:6],  # too short
        struct.pack("<HHI", 7, 1, 0) + meta[8:],  # reserved field
        struct.pack("<HHI", 8, 0, 0) + meta[8:],  # count does not match
        meta[:8] + struct.pack("<Q", (0x99 << 12) | 0x2) + meta[16:],  # a reserved flag bit
    ]
    for metadata in bad:
        with pytest.raises(MalformedStructure):
            wire.parse_memory_metadata(metadata)
        with pytest.raises(MalformedStructure):
            mig_pages.memory_entries(metadata)


def test_scattered_pages_and_zero_pages_round_trip(session: Session) -> None:
    rng = random.Random(3)
    gfns = sorted(rng.sample(range(0x200, 0x800), 300)) + list(range(0x900, 0x940))
    for gfn in gfns:
        if gfn % 5:  # every fifth page stays zero: it travels as a flag
            session.src.hw.guest_write(gfn << 12, rng.randbytes(PAGE))
    for i in range(0, len(gfns), 128):
        session.dst_sp.migration.import_bundle(session.ref, _seal(session, gfns[i : i + 128], stream=0))
    for gfn in gfns:
        assert session.dst_hw.memory.read(gfn << 12, PAGE) == session.src.hw.memory.read(gfn << 12, PAGE)


def test_a_bad_tag_on_the_last_page_leaves_guest_memory_untouched(session: Session) -> None:
    gfns = list(range(0x200, 0x210))
    for gfn in gfns:
        session.src.hw.guest_write(gfn << 12, bytes([gfn & 0xFF]) * PAGE)
    bundle = bytearray(_seal(session, gfns))
    bundle[-1] ^= 1  # the last page's tag
    with pytest.raises(IntegrityError):
        session.dst_sp.migration.import_bundle(session.ref, bytes(bundle))
    assert all(session.dst_hw.memory.read(g << 12, PAGE) == bytes(PAGE) for g in gfns)
    assert session.dst_sp.migration.import_state(session.ref) == "FAILED"


def test_a_gpa_twice_in_one_bundle_fails_the_import(session: Session) -> None:
    session.src.hw.guest_write(0x200 << 12, b"x" * PAGE)
    bundle = _seal(session, [0x200, 0x201, 0x200])  # the source firmware seals what it is asked
    with pytest.raises(IntegrityError):
        session.dst_sp.migration.import_bundle(session.ref, bundle)


def test_a_gpa_in_two_bundles_of_one_epoch_fails_the_import_and_in_the_next_epoch_is_new(session: Session) -> None:
    session.src.hw.guest_write(0x200 << 12, b"x" * PAGE)
    mig = session.dst_sp.migration
    mig.import_bundle(session.ref, _seal(session, [0x200, 0x201]))
    mig.import_bundle(session.ref, session.src.sp.migration.export_epoch_token(session.src.handle, 0))
    session.src.hw.guest_write(0x200 << 12, b"y" * PAGE)
    mig.import_bundle(session.ref, _seal(session, [0x200]))  # a dirty round: the page again, in epoch 1
    assert session.dst_hw.memory.read(0x200 << 12, PAGE) == b"y" * PAGE
    replay = _seal(session, [0x202, 0x200])  # sealed honestly again, but epoch 1 has 0x200 already
    with pytest.raises(IntegrityError):
        mig.import_bundle(session.ref, replay)
    assert session.dst_hw.memory.read(0x200 << 12, PAGE) == b"y" * PAGE


@pytest.mark.parametrize("where", ["beyond memory", "in the PCI hole"])
def test_a_gfn_outside_ram_is_refused_by_the_source(emulated_vendor: Vendor, tmp_path: Path, where: str) -> None:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    src.hw = FakeHardware(GuestMemory((3 << 30) + (16 << 20)))  # sparse: RAM below 3 GiB and above 4 GiB
    s = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))
    s.setup()
    gfn = src.hw.gfn_limit if where == "beyond memory" else (3 << 30) >> 12
    with pytest.raises(FirmwareError) as info:
        _seal(s, [0x200, gfn])
    assert info.value.status is FirmwareStatus.INVALID_ADDRESS


class _CountingHardware(FakeHardware):
    captures: int = 0

    def capture_state(self) -> tuple[bytes, bytes]:
        self.captures += 1
        return super().capture_state()


def test_vcpu_and_device_state_are_captured_once_per_pause(emulated_vendor: Vendor, tmp_path: Path) -> None:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    counting = _CountingHardware(src.hw.memory)
    src.hw = counting
    s = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))
    s.run_precopy(random.Random(1), rounds=0)
    s.switchover(final_gfns=[])
    assert counting.captures == 1
    s.deliver()
    assert s.dst_sp.migration.import_state(s.ref) == "POST_IMPORT"
    kinds = [wire.BundleHeader.from_bytes(b).type for _, b in s.bundles]
    assert kinds[-4:] == [
        BundleType.VCPU_STATE,
        BundleType.DEVICE_STATE,
        BundleType.MUTABLE_STATE,
        BundleType.START_TOKEN,
    ]


def test_sorted_union_is_numpys_union() -> None:
    rng = np.random.default_rng(5)
    for sizes in ([], [0], [1], [7, 0, 3], [100, 100, 1], [5000]):
        parts = [rng.integers(0, 300, size=n).astype(np.uint64) for n in sizes]
        expected = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        got = sorted_union(*parts)
        assert got.dtype == np.uint64
        assert got.tolist() == expected.tolist()


def test_long_runs_split_runs_from_scattered_values() -> None:
    values = np.array([3, 4, 5, 6, 9, 20, 21, 22, 30], dtype=np.int64)
    runs, rest = long_runs(values, 3)
    assert runs == [(0, 4), (5, 8)]
    assert rest.tolist() == [False] * 4 + [True] + [False] * 3 + [True]
    none, everything = long_runs(values, 5)
    assert none == []
    assert everything.all()
    empty_runs, empty_rest = long_runs(np.zeros(0, dtype=np.int64), 1)
    assert empty_runs == []
    assert len(empty_rest) == 0


@pytest.mark.skipif(NATIVE is None, reason="native/cvmgcm.c not built")
@pytest.mark.parametrize(("seal_with", "open_with"), [("native", "python"), ("python", "native")])
def test_native_and_python_paths_speak_the_same_format(
    emulated_vendor: Vendor, tmp_path: Path, seal_with: str, open_with: str
) -> None:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    s = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))
    s.setup()
    s.deliver()
    s.bundles.clear()
    _use(src.sp, seal_with)
    _use(s.dst_sp, open_with)
    rng = random.Random(11)
    gfns = sorted(rng.sample(range(0x200, 0x600), 200))
    for gfn in gfns:
        src.hw.guest_write(gfn << 12, rng.randbytes(PAGE))
    s.dst_sp.migration.import_bundle(s.ref, _seal(s, gfns[:100]))
    s.dst_sp.migration.import_bundle(s.ref, _seal(s, gfns[100:]))
    for gfn in gfns:
        assert s.dst_hw.memory.read(gfn << 12, PAGE) == src.hw.memory.read(gfn << 12, PAGE)


@pytest.mark.skipif(NATIVE is None, reason="native/cvmgcm.c not built")
def test_native_shim_matches_cryptography_and_refuses_any_flipped_bit() -> None:
    assert NATIVE is not None
    rng = random.Random(5)
    key, n = rng.randbytes(32), 9
    pages = [bytearray(rng.randbytes(PAGE)) for _ in range(n)]
    ivs, aads = memoryview(rng.randbytes(12 * n)), memoryview(rng.randbytes(32 * n))
    addresses = np.array([native_gcm.buffer_address(memoryview(p)) for p in pages], dtype=np.uint64)
    out = bytearray((PAGE + 16) * n)
    assert NATIVE.seal_pages(key, ivs, addresses, aads, 32, native_gcm.buffer_address(memoryview(out)))
    aead = AESGCM(key)
    for i in range(n):
        expected = aead.encrypt(bytes(ivs[12 * i : 12 * i + 12]), bytes(pages[i]), bytes(aads[32 * i : 32 * i + 32]))
        assert out[(PAGE + 16) * i : (PAGE + 16) * (i + 1)] == expected
    back = [bytearray(PAGE) for _ in range(n)]
    targets = np.array([native_gcm.buffer_address(memoryview(b)) for b in back], dtype=np.uint64)
    assert NATIVE.open_pages(key, ivs, memoryview(out), aads, 32, targets) == 0
    assert back == pages
    for where in (5, PAGE + 3, (PAGE + 16) * (n - 1) + PAGE + 15):  # a page, a tag, the last tag
        bad = bytearray(out)
        bad[where] ^= 0x40
        assert NATIVE.open_pages(key, ivs, memoryview(bad), aads, 32, targets) == 1
    bad_aad = bytearray(aads)
    bad_aad[-1] ^= 1
    assert NATIVE.open_pages(key, ivs, memoryview(out), memoryview(bad_aad), 32, targets) == 1
    with pytest.raises(ValueError, match="sizes"):
        NATIVE.open_pages(key, ivs, memoryview(out)[:-1], aads, 32, targets)
