"""VmState bytes: round trip, versioning, and tampering is rejected with a clear AbiError."""

from __future__ import annotations

import ctypes
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.abi import kvm as abi
from cvmotion.errors import AbiError, MalformedStructure, UnsupportedVersion
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.devices.cvmio import CvmIoState
from cvmotion.vmm.devices.serial import SerialState
from cvmotion.vmm.emu_backend import EmuMachineState
from cvmotion.vmm.kvm_backend import KvmMachineState
from cvmotion.vmm.snapshot import STATE_VERSION, VmState
from cvmotion.vmm.vcpu import EmuVcpuState, KvmVcpuState


def kvm_state(vcpus: int = 2) -> VmState:
    def blob(cls: type[ctypes.Structure], fill: int) -> bytes:
        return bytes([fill]) * ctypes.sizeof(cls)

    cpus = tuple(
        KvmVcpuState(
            i, abi.MpState.RUNNABLE if i == 0 else abi.MpState.UNINITIALIZED,
            blob(abi.KvmRegs, i + 1), blob(abi.KvmSregs, 2), bytes(4096), blob(abi.KvmXcrs, 3),
            blob(abi.KvmDebugregs, 4), blob(abi.KvmLapicState, 5), 2_445_426, bytes(abi.KvmCpuidEntry2()) * 3,
            ((0x10, 123456789), (0xC0000080, 0)), blob(abi.KvmVcpuEvents, 6),
        )
        for i in range(vcpus)
    )  # fmt: skip
    machine = KvmMachineState(cpus, bytes(48), tuple(bytes(520) for _ in range(3)))
    return VmState(
        STATE_VERSION, BackendKind.KVM, 64 << 20, vcpus, machine, SerialState(lcr=3), CvmIoState(7, ((1, b"tok"),)), "x"
    )


def emu_state() -> VmState:
    machine = EmuMachineState((EmuVcpuState(0, True, (("EIP", 0x100000), ("EAX", 5))), EmuVcpuState(1, False, ())))
    return VmState(STATE_VERSION, BackendKind.EMULATED, 16 << 20, 2, machine, SerialState(), CvmIoState(), "y")


@pytest.mark.parametrize("state", [kvm_state(), emu_state()], ids=["kvm", "emulated"])
def test_round_trip(state: VmState) -> None:
    assert VmState.from_bytes(state.to_bytes()) == state


def test_version_and_magic_and_checksum() -> None:
    data = bytearray(kvm_state().to_bytes())
    with pytest.raises(UnsupportedVersion, match="version 2"):  # checked before the checksum
        VmState.from_bytes(bytes(data[:8]) + b"\x02\x00" + bytes(data[10:]))
    with pytest.raises(MalformedStructure, match="magic"):
        VmState.from_bytes(b"X" + bytes(data[1:]))
    data[-1] ^= 0xFF
    with pytest.raises(MalformedStructure, match="checksum"):
        VmState.from_bytes(bytes(data))


def test_missing_vcpu_field_is_named() -> None:
    state = kvm_state(vcpus=1)
    data = state.to_bytes()
    head = data[:12] + (2).to_bytes(4, "little") + data[16:0x1C]
    body = data[0x20:]
    claims_two = head + zlib.crc32(body, zlib.crc32(head)).to_bytes(4, "little") + body
    with pytest.raises(MalformedStructure, match=r"missing record .*\[1\]"):
        VmState.from_bytes(claims_two)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_abi_errors(data: bytes) -> None:
    with pytest.raises(AbiError):
        VmState.from_bytes(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2000), st.integers(1, 255))
def test_flipped_bytes_never_parse_silently_wrong(offset: int, flip: int) -> None:
    data = bytearray(emu_state().to_bytes())
    offset %= len(data)
    data[offset] ^= flip
    with pytest.raises(AbiError):
        VmState.from_bytes(bytes(data))
