"""Helpers shared by the VM integration tests (backends, guest images, a VM factory that cleans up)."""

from __future__ import annotations

import pytest

from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.images import guest_dir, load_image
from cvmotion.vmm.kvm import kvm_usable
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.loader import KernelImage
from cvmotion.vmm.vm import MachineConfig, Vm

KVM_OK, _KVM_REASON = kvm_usable()

BACKENDS = [
    pytest.param(
        BackendKind.KVM,
        id="kvm",
        marks=[pytest.mark.kvm, pytest.mark.skipif(not KVM_OK, reason=f"/dev/kvm unusable: {_KVM_REASON}")],
    ),
    pytest.param(BackendKind.EMULATED, id="emulated"),
]


def require_image(name: str) -> KernelImage:
    if not (guest_dir() / f"{name}.elf").is_file():
        pytest.skip(f"guest image {name} not built (run `make guests`)")
    return load_image(name)


class VmFactory:
    def __init__(self, backend: BackendKind) -> None:
        self.backend = backend
        self.vms: list[Vm] = []

    def boot(self, image: str, cmdline: str = "", memory: int = 16 * MIB, vcpus: int = 1, **kw: bool) -> Vm:
        vm = Vm.create(MachineConfig(memory, vcpus, self.backend, **kw), require_image(image), cmdline)
        self.vms.append(vm)
        vm.start()
        return vm

    def adopt(self, vm: Vm) -> Vm:
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
