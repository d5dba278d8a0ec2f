"""SKU catalogue, memory sizes, and the host-side twins of the guest workloads."""

from __future__ import annotations

import pytest

from cvmotion.abi.sku import CATALOG, find_sku, format_size, parse_memory
from cvmotion.errors import DeviceError, UsageError
from cvmotion.vmm.layout import GIB, MIB
from cvmotion.vmm.workloads import KvOp, KvStatus, MemdirtyModel, decode_response, encode_request, parse_heartbeat


@pytest.mark.parametrize(
    ("name", "vcpus", "gib"),
    [("Standard_DC2as_v5", 2, 8), ("dc96as_v5", 96, 384), ("Standard_EC20as_v5", 20, 160), ("EC96as_v5", 96, 672)],
)
def test_catalogue(name: str, vcpus: int, gib: int) -> None:
    sku = find_sku(name)
    assert (sku.vcpus, sku.memory) == (vcpus, gib * GIB)


def test_unknown_sku_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match="Standard_DC2as_v5"):
        find_sku("Standard_D2s_v5")
    assert len(CATALOG) == 36


@pytest.mark.parametrize(
    ("text", "size"), [("64M", 64 * MIB), ("8GiB", 8 * GIB), ("672G", 672 * GIB), ("16777216", 16 * MIB)]
)
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "12Q", "-1G", "1K", "1M", "1500K", "9T"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="memory size"):
        parse_memory(text)


def test_format_size() -> None:
    assert (format_size(672 * GIB), format_size(1536 * 1024), format_size(12)) == ("672 GiB", "1.5 MiB", "12 bytes")


def test_memdirty_model_matches_guest_output() -> None:
    # Printed by build/guests/memdirty.elf "dirty_mib=1 seed=1" on KVM, unicorn and QEMU alike.
    model = MemdirtyModel(dirty_mib=1, seed=1)
    assert model.checksum_at(24576) == 0x925A379B
    assert model.checksum_at(86016) == 0x16FF3F12
    with pytest.raises(UsageError, match="cannot go back"):
        model.checksum_at(10)
    assert parse_heartbeat("HB seq=3 writes=86016 csum=16ff3f12") == (3, 86016, 0x16FF3F12)
    assert parse_heartbeat("HB seq=x") is None


def test_kvstore_wire_format() -> None:
    assert encode_request(KvOp.PUT, b"k", b"vv") == b"\x02\x01\x02\x00kvv"
    assert decode_response(b"\x00\x00\x02\x00hi") == (KvStatus.OK, b"hi")
    with pytest.raises(DeviceError, match="carries"):
        decode_response(b"\x00\x00\x05\x00hi")
    with pytest.raises(UsageError):
        encode_request(KvOp.PUT, b"k" * 65)
