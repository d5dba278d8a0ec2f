"""Root of every error cvmotion raises; the hierarchy is the contract for callers and the CLI.

```
CvmError
├── UsageError                      bad user input: sizes, SKU names, files, options       (CLI exit 1)
│   ├── NotFound                    no such VM / migration / host (HTTP 404)
│   ├── Conflict                    the name exists, or the object is busy (HTTP 409)
│   └── Unauthorized                a request without valid credentials (HTTP 401)
├── AbiError                        bytes that do not parse                                (CLI exit 1)
│   ├── MalformedStructure          wrong length or an impossible value
│   ├── ReservedNotZero(lo, hi)     a must-be-zero range is not zero
│   └── UnsupportedVersion          a version field outside what we implement
├── FirmwareError(status)           the emulated secure processor refused a command
├── KvmError(ioctl, errno)          a KVM ioctl failed
│   └── VcpuError(rip)              the vCPU stopped abnormally (triple fault, CPU exception, internal error)
├── ImageError                      a guest image that cannot be loaded
├── DeviceError                     a paravirtual device request failed or timed out (cvm-io)
├── MigrationError
│   ├── ProtocolError               a peer broke the protocol (order, version, framing)
│   ├── IntegrityError              opaque: MAC, decryption or replay check failed
│   └── Aborted                     the migration was aborted and the VM stays on the source
├── VerificationError               signature / certificate chain / binding failed          (CLI exit 2)
├── PolicyViolation(violations)     evidence verified but breaks policy; lists every rule   (CLI exit 5)
└── TokenError                      a JWT did not verify or its claims are wrong
```

Integrity failures are deliberately opaque (one message, no detail about which check failed), in the
manner of Fernet's ``InvalidToken``: an attacker who tampers with a stream learns nothing from the error.
"""

from __future__ import annotations

import enum

__all__ = [
    "AbiError",
    "Aborted",
    "Conflict",
    "CvmError",
    "DeviceError",
    "FirmwareError",
    "FirmwareStatus",
    "ImageError",
    "IntegrityError",
    "KvmError",
    "MalformedStructure",
    "MigrationError",
    "Moved",
    "NotFound",
    "PolicyViolation",
    "ProtocolError",
    "ReservedNotZero",
    "TokenError",
    "Unauthorized",
    "UnsupportedVersion",
    "UsageError",
    "VcpuError",
    "VerificationError",
]


class CvmError(Exception):
    """Base class of every error raised on purpose by cvmotion."""


class UsageError(CvmError):
    """The caller gave an argument or a file that cannot be used."""


class NotFound(UsageError):
    """The named object does not exist here."""


class Conflict(UsageError):
    """The name is taken, or the object is in a state that forbids the request."""


class Unauthorized(UsageError):
    """The request carries no credential, or one that does not verify (one message: no detail which check)."""


class Moved(Conflict):
    """The object lives on another host now (a completed live migration); ``location`` is where to ask."""

    def __init__(self, message: str, location: str) -> None:
        super().__init__(message)
        self.location = location


class AbiError(CvmError):
    """Bytes that do not parse as the structure the spec describes."""


class MalformedStructure(AbiError):
    """Wrong length, or a field holding a value the spec does not allow."""


class ReservedNotZero(AbiError):
    """A must-be-zero range holds a non-zero byte (go-sev-guest's ``mbz`` check)."""

    def __init__(self, structure: str, lo: int, hi: int) -> None:
        super().__init__(f"{structure}: reserved bytes {lo:#x}..{hi - 1:#x} must be zero")
        self.structure = structure
        self.lo = lo
        self.hi = hi


class UnsupportedVersion(AbiError):
    """A version field outside the range this implementation understands."""


class FirmwareStatus(enum.IntEnum):
    """SNP firmware status codes (SEV-SNP ABI specification, "Status Codes" table)."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27


class FirmwareError(CvmError):
    """The emulated secure processor refused a command with an SNP status code."""

    def __init__(self, status: FirmwareStatus, message: str = "") -> None:
        text = f"firmware status {status.name} ({status.value:#x})"
        super().__init__(f"{text}: {message}" if message else text)
        self.status = status


class KvmError(CvmError):
    """A KVM ioctl failed; carries the ioctl name and errno."""

    def __init__(self, ioctl: str, errno: int, message: str = "") -> None:
        text = f"{ioctl} failed with errno {errno}"
        super().__init__(f"{text}: {message}" if message else text)
        self.ioctl = ioctl
        self.errno = errno


class VcpuError(KvmError):
    """The vCPU stopped abnormally (triple fault, CPU exception, internal error); names the last RIP."""

    def __init__(self, message: str, *, rip: int | None = None, ioctl: str = "KVM_RUN", errno: int = 0) -> None:
        CvmError.__init__(self, message if rip is None else f"{message} (last RIP {rip:#x})")
        self.ioctl = ioctl
        self.errno = errno
        self.rip = rip


class DeviceError(CvmError):
    """A paravirtual device request failed or got no answer in time."""


class ImageError(CvmError):
    """A guest image that is not a loadable multiboot v1 ELF kernel, or does not fit."""


class MigrationError(CvmError):
    """Base class of migration failures."""


class ProtocolError(MigrationError):
    """A peer sent something out of order, of the wrong version, or badly framed."""


class IntegrityError(MigrationError):
    """Opaque integrity failure: authentication, decryption, ordering or replay. No detail, on purpose."""

    def __init__(self) -> None:
        super().__init__("integrity check failed")


class NotConverged(MigrationError):
    """Pre-copy ran its rounds and the last dirty set would still pause the guest past the downtime limit; the
    VM runs on at the source (``force_switchover`` trades the limit for completion)."""


class Aborted(MigrationError):
    """The migration was aborted; the VM stays on (or resumes on) the source."""


class VerificationError(CvmError):
    """Evidence whose signature, certificate chain or key binding does not verify."""


class PolicyViolation(CvmError):
    """Evidence that verified but breaks policy; carries every violated rule, not just the first."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("; ".join(violations) if violations else "policy violation")
        self.violations = list(violations)


class TokenError(CvmError):
    """A token that does not verify, has expired, or carries the wrong claims."""
