"""Backend choice: KVM when usable, the emulator otherwise, and an explicit ``kvm`` never silently degrades."""

from __future__ import annotations

import pytest

from cvmotion.errors import UsageError
from cvmotion.vmm import vm as vm_module
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.kvm import kvm_usable


def test_unusable_kvm_falls_back_to_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_module, "kvm_usable", lambda: (False, "open failed with errno 2: /dev/kvm: missing"))
    kind, reason = vm_module.select_backend(None)
    assert kind is BackendKind.EMULATED
    assert "/dev/kvm is unusable" in reason
    with pytest.raises(UsageError, match="--backend kvm: /dev/kvm is unusable"):
        vm_module.select_backend(BackendKind.KVM)
    assert vm_module.select_backend(BackendKind.EMULATED)[0] is BackendKind.EMULATED


def test_a_missing_device_is_reported_not_raised() -> None:
    ok, reason = kvm_usable("/nonexistent/kvm")
    assert not ok
    assert "/nonexistent/kvm" in reason
