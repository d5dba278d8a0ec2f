"""bench helper: what machine a figure was measured on, and waiting for it to be quiet."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import cryptography
import numpy as np
from cryptography.hazmat.backends.openssl import backend

from cvmotion.firmware import native_gcm

__all__ = ["machine_facts", "wait_quiet"]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _kvm_module() -> str:
    modules = Path("/proc/modules").read_text() if Path("/proc/modules").exists() else ""
    names = [line.split()[0] for line in modules.splitlines() if line.startswith("kvm")]
    if names:
        return ", ".join(names)
    return "kvm (built in)" if Path("/dev/kvm").exists() else "no /dev/kvm"


def machine_facts(extra: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU, cores, memory, kernel, KVM flavour, Python and crypto library versions, load when measured."""
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "kvm": _kvm_module(),
        "hypervisor": "yes" if " hypervisor" in flags else "no",
        "aes-ni": "yes" if " aes" in flags else "no",
        "vaes": "yes" if " vaes" in flags else "no",
        "python": platform.python_version(),
        "cryptography": f"{cryptography.__version__} ({backend.openssl_version_text()})",
        "numpy": np.__version__,
        "sp-native-gcm": _native_gcm(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **(extra or {}),
    }


def _native_gcm() -> str:
    """The OpenSSL the SP's native per-page AES-GCM binds here (``firmware.native_gcm``), or why there is none."""
    if os.environ.get("CVMOTION_NATIVE_GCM", "1") == "0":
        return "off (CVMOTION_NATIVE_GCM=0): cryptography page by page"
    gcm = native_gcm.load()
    return gcm.version if gcm is not None else "not built: cryptography page by page"


def wait_quiet(max_load: float, timeout: float) -> float:
    """Wait (at most ``timeout`` s) until the 1-minute load average is below ``max_load``; returns it.

    The reference machine is shared: other jobs' load changes every figure.  This waits for a quiet
    moment, and the caller records the load it got.
    """
    deadline = time.monotonic() + timeout
    while (load := os.getloadavg()[0]) > max_load and time.monotonic() < deadline:
        time.sleep(2)
    return load
