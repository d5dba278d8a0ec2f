"""agent layer: the migration agent's (MA's) own identity — a measured guest context on its host's secure processor.

Like Intel's MigTD, each host's MA runs "inside the TEE, measured": ``MigrationAgentIdentity.launch(sp)`` runs
the SNP launch flow for it (LAUNCH_START with the MA policy — SMT allowed, no MIGRATE_MA, no DEBUG —,
LAUNCH_UPDATE of the MA image pages, a SECRETS page from which the MA takes its VMPCK0, LAUNCH_FINISH,
ACTIVATE) and from then on obtains attestation reports through real, encrypted SNP guest messages
(``GuestChannel``), exactly as a guest would.  Its launch digest (MEASUREMENT in every report it gets) is a
function of the image only, and ``expected_ma_measurement()`` computes it offline so operators can pin it.

The image is deterministic: ``MA_VERSION``, then every source file of the code the MA runs
(``MEASURED_SOURCES``: the agent, the platform process that serves it (platformd) and the VM-process protocol
it speaks to hardware (vmd), the firmware it drives, abi, the attestation verifier, ipc, vmm, errors and
files — each as its path relative to the package, length, bytes, in sorted order), zero-padded to whole pages::

    GPA 0x100000 + 0x1000*i   NORMAL pages: the image          (PAGE_INFO chain, SNP ABI SNP_LAUNCH_UPDATE)
    GPA 0x1000                SECRETS page (contents not measured; the SP fills it with the VMPCKs)

Emulation note: there is no separate MA VM here; the MA's code runs in the platform process, and the
"image" stands for it.  Changing any source file it runs changes the measurement, as rebuilding a real MA would.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import AttestationReport, GuestPolicy, PolicyFlag, Product
from cvmotion.errors import FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.launch import PAGE_SIZE, LaunchDigest, PageType

if TYPE_CHECKING:
    from cvmotion.firmware.device import GuestHandle, SecureProcessor

__all__ = [
    "IMAGE_GPA",
    "MA_POLICY",
    "MA_VERSION",
    "MEASURED_SOURCES",
    "SECRETS_GPA",
    "MigrationAgentIdentity",
    "expected_ma_measurement",
    "measured_files",
    "ma_image",
]

MA_VERSION = "cvmotion-migration-agent/1"
MA_POLICY = GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.SMT)  # no MIGRATE_MA, no DEBUG
IMAGE_GPA = 0x100000
SECRETS_GPA = 0x1000
_MAX_IMAGE = 16 << 20
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


# Every package and module whose code the MA runs in the platform process: the agent itself, the platform
# process around it (platformd) and the hardware protocol it speaks (vmd), the secure processor it drives
# (firmware), the byte formats (abi), the verifier it judges peers with (attestation), the RPC and file
# plumbing (ipc, files) and what the SP maps guest memory with (vmm), plus the error types.
MEASURED_SOURCES = (
    "abi",
    "agent",
    "attestation",
    "firmware",
    "ipc",
    "platformd",
    "vmd",
    "vmm",
    "errors.py",
    "files.py",
)


def measured_files() -> list[Path]:
    """The source files in this build's MA image, in image order (paths relative to the ``cvmotion`` package)."""
    files: list[Path] = []
    for name in MEASURED_SOURCES:
        target = _PACKAGE_DIR / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return [path.relative_to(_PACKAGE_DIR) for path in files]


@functools.cache
def ma_image() -> bytes:
    """This build's MA image: the version string and every measured source, page aligned (module docstring)."""
    parts = [MA_VERSION.encode() + b"\0"]
    for rel in measured_files():
        data = (_PACKAGE_DIR / rel).read_bytes()
        parts.append(f"{rel.as_posix()}\0{len(data)}\0".encode() + data)
    return _pad(b"".join(parts))


def _pad(image: bytes) -> bytes:
    if not image or len(image) > _MAX_IMAGE:
        raise UsageError(f"an MA image is 1 byte .. {_MAX_IMAGE:#x} bytes, not {len(image):#x}")
    return image + bytes(-len(image) % PAGE_SIZE)


def _measure(image: bytes) -> bytes:
    digest = LaunchDigest()
    for offset in range(0, len(image), PAGE_SIZE):
        digest.measure(PageType.NORMAL, IMAGE_GPA + offset, image[offset : offset + PAGE_SIZE])
    digest.measure(PageType.SECRETS, SECRETS_GPA, None)
    return digest.value


@functools.cache
def _default_measurement() -> bytes:
    return _measure(ma_image())


def expected_ma_measurement(image: bytes | None = None) -> bytes:
    """The 48-byte launch digest an MA launched from ``image`` (default: this build's) reports as MEASUREMENT."""
    return _default_measurement() if image is None else _measure(_pad(image))


class MigrationAgentIdentity:
    """One host's MA as a guest context on its secure processor; thread-safe (one guest request at a time)."""

    def __init__(self, sp: SecureProcessor, handle: GuestHandle, channel: GuestChannel, measurement: bytes) -> None:
        self._sp = sp
        self._handle = handle
        self._channel = channel
        self._measurement = measurement
        self._lock = threading.Lock()

    @classmethod
    def launch(cls, sp: SecureProcessor, *, image: bytes | None = None) -> MigrationAgentIdentity:
        """Launch the MA on ``sp``: START, UPDATE (image, SECRETS), FINISH, ACTIVATE.

        ``image`` replaces this build's image (tests use it to stand up an MA of another build).
        """
        pages = ma_image() if image is None else _pad(image)
        handle = sp.launch_start(MA_POLICY)
        try:
            sp.launch_update(handle, IMAGE_GPA, PageType.NORMAL, pages)
            secrets = bytearray(PAGE_SIZE)
            sp.launch_update(handle, SECRETS_GPA, PageType.SECRETS, secrets)
            vmpck0 = bytes(secrets[0x20:0x40])  # SNP ABI "Secrets Page Format": VMPCK0 at 0x20
            secrets[:] = bytes(PAGE_SIZE)  # the MA keeps VMPCK0 only
            sp.launch_finish(handle)
            sp.activate(handle)
            measurement = sp.guest_info(handle).measurement
        except BaseException:
            sp.decommission(handle)
            raise
        if measurement != expected_ma_measurement(image):
            sp.decommission(handle)
            raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, "MA launch digest differs from the offline value")
        return cls(sp, handle, GuestChannel(vmpck0), measurement)

    @property
    def sp(self) -> SecureProcessor:
        return self._sp

    @property
    def handle(self) -> GuestHandle:
        return self._handle

    @property
    def measurement(self) -> bytes:
        return self._measurement

    @property
    def product(self) -> Product:
        return self._sp.product

    def attestation_report(self, report_data: bytes) -> tuple[bytes, bytes]:
        """(report, endorsement PEM) for ``report_data``, through an encrypted MSG_REPORT_REQ at VMPL 0.

        The PEM is the certificate of the key that signed this report (VCEK or VLEK) then its ASK/ASVK and ARK.
        """
        if len(report_data) != 64:
            raise UsageError("REPORT_DATA is 64 bytes")
        with self._lock:
            request = self._channel.report_request(report_data)
            payload = self._channel.open_response(self._sp.guest_request(self._handle, request))
        rsp = ReportRsp.from_bytes(payload)
        if rsp.status != 0:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"MSG_REPORT_RSP status {rsp.status:#x}")
        signing_key = AttestationReport.from_bytes(rsp.report).key_info.signing_key
        return rsp.report, self._sp.get_ext_certs(signing_key).pem()

    def close(self) -> None:
        """Decommission the MA's guest context (its VMPCKs die with it)."""
        self._sp.decommission(self._handle)
