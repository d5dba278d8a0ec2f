"""platformd: the platform process's command protocol — the secure processor's and the MA's boundary.

Two kinds of callers connect to ``platform.sock``; the first command says which one a connection is, and from then
on the enum of that role *is* its allowlist (``server.PlatformService`` refuses anything else before a handler
runs; there is no second list)::

    host daemon (untrusted)   host_hello, then HostCommand: the SNP command interface (launch, guest-request relay,
                              decommission), the migration commands over shared rings of ciphertext, and the three
                              MA relay commands
    VM process (hardware)     vm_attach (with its memfd), then VmProcessCommand

The ``ma_*`` firmware calls that move keys are no command at all: only the MA inside the platform process makes
them. Each command has a typed request (its ``*Args`` TypedDict: the RPC header arguments; bulk data rides in the
blob) and a typed answer. No answer to a host command holds plaintext guest memory or key material. Pure data:
nothing here imports the firmware, so the untrusted host speaks the protocol without the hardware's code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NotRequired, TypedDict

__all__ = [
    "SERVED_INLINE",
    "ExportArgs",
    "ExportMemoryArgs",
    "ExportStartArgs",
    "ExportStateArgs",
    "GuestInfo",
    "HandleArgs",
    "HostCommand",
    "ImportArgs",
    "ImportBundleArgs",
    "ImportStatus",
    "LaunchArgs",
    "LaunchResult",
    "MaDeliverArgs",
    "MaDestBeginArgs",
    "MaReport",
    "MaSourceBeginArgs",
    "PlatformIdentity",
    "RingArgs",
    "VmAttachArgs",
    "VmAttached",
    "VmDirtyArgs",
    "VmHandleArgs",
    "VmProcessCommand",
]


class HostCommand(StrEnum):
    """What the (untrusted) host daemon may send the platform process."""

    HOST_HELLO = "host_hello"
    STATUS = "status"
    EXT_CERTS = "ext_certs"
    LAUNCH = "launch"
    GUEST_REQUEST = "guest_request"
    GUEST_INFO = "guest_info"
    CAN_RUN = "can_run"
    DECOMMISSION = "decommission"
    VM_HANDLE = "vm_handle"
    RING_ATTACH = "ring_attach"
    RING_DETACH = "ring_detach"
    EXPORT_START = "export_start"
    EXPORT_IMMUTABLE = "export_immutable"
    EXPORT_MEMORY = "export_memory"
    EXPORT_EPOCH_TOKEN = "export_epoch_token"
    EXPORT_PAUSE = "export_pause"
    EXPORT_STATE = "export_state"
    EXPORT_START_TOKEN = "export_start_token"
    EXPORT_FINAL = "export_final"
    EXPORT_SWITCHOVER = "export_switchover"
    EXPORT_ABORT = "export_abort"
    EXPORT_ABORT_WITH_TOKEN = "export_abort_with_token"
    EXPORT_FINISH = "export_finish"
    EXPORT_STATUS = "export_status"
    IMPORT_BUNDLE = "import_bundle"
    IMPORT_ABORT = "import_abort"
    IMPORT_ACTIVATE = "import_activate"
    IMPORT_COMMIT_RECEIPT = "import_commit_receipt"
    IMPORT_STATUS = "import_status"
    IMPORT_DISCARD = "import_discard"
    MA_SOURCE_BEGIN = "ma_source_begin"
    MA_DEST_BEGIN = "ma_dest_begin"
    MA_DELIVER = "ma_deliver"
    # A memory-preserving update: the SP seals its state for the next platform process (``platformd.succession``)
    # and this process exits; the answer is that exit (the sealed file is the result).
    SEAL_STATE = "seal_state"


# Served by the reader that reads them (``ipc.rpc``'s inline methods): the stop-and-copy's commands, each inside a
# migration's blackout, and the import, whose committing call activates and runs the guest.
SERVED_INLINE = frozenset(
    {
        HostCommand.EXPORT_SWITCHOVER,
        HostCommand.EXPORT_PAUSE,
        HostCommand.EXPORT_STATE,
        HostCommand.EXPORT_FINAL,
        HostCommand.EXPORT_START_TOKEN,
        HostCommand.IMPORT_BUNDLE,
        HostCommand.IMPORT_ACTIVATE,
    }
)


class VmProcessCommand(StrEnum):
    """What a VM process (the hardware of one VM, checked by its kernel credentials) may send."""

    VM_ATTACH = "vm_attach"
    VM_DETACH = "vm_detach"
    VM_DIRTY = "vm_dirty"
    CAN_RUN = "can_run"


# -- requests (host) ------------------------------------------------------------------------------------


class HandleArgs(TypedDict):
    """A command on one VM guest: the handle the platform bound to a VM's hardware."""

    handle: int


class LaunchArgs(TypedDict):
    vm: str
    policy: int
    ranges: list[list[int]]  # [gpa, length], page-aligned, at most 64, never the secrets page
    host_data: str  # 32 bytes, hex


class VmHandleArgs(TypedDict):
    vm: str


class RingArgs(TypedDict):
    ring: str


class ExportArgs(TypedDict):
    handle: int
    stream: int


class ExportStartArgs(TypedDict):
    handle: int
    vm: str  # the hardware the guest runs on: the platform checks it is the guest's own


class ExportStateArgs(ExportArgs):
    kind: str  # BundleType name: VCPU_STATE, DEVICE_STATE, MUTABLE_STATE


class ExportMemoryArgs(ExportArgs):
    ring: str
    bundles: list[list[int]]  # [ring offset, capacity, pages] each; the blob holds the GFNs of all, in order


class ImportArgs(TypedDict):
    vm: str


class ImportBundleArgs(ImportArgs):
    ring: str
    bundles: list[list[int]]  # [ring offset, length] each, in stream order
    # If the batch ends with the start token and it commits: activate the guest and run it in the same command.
    activate: NotRequired[bool]


class MaSourceBeginArgs(TypedDict):
    vm: str
    handle: int
    session_id: str  # hex; the blob is the VM's migration policy document


class MaDestBeginArgs(TypedDict):
    vm: str
    session_id: str


class MaDeliverArgs(TypedDict):
    session_id: str
    role: str  # "source" | "destination"; the blob is the peer MA's frame


# -- requests (VM process) -----------------------------------------------------------------------------


class VmAttachArgs(TypedDict):
    name: str
    memory: int
    mode: str  # the fd is the guest memfd
    # Re-attaching to a restarted platform process: the hardware token the previous one gave (hex).
    reattach: NotRequired[str]


class VmAttached(TypedDict):
    token: str  # hex: proves this process is this VM's hardware to the next platform process (kept in memory only)


class VmDirtyArgs(TypedDict):
    name: str  # the blob is u64 GFNs


# -- answers -------------------------------------------------------------------------------------------


class PlatformIdentity(TypedDict):
    emulated: bool
    product: str
    chip_id: str
    reported_tcb: int
    reported_tcb_text: str
    committed_tcb: int
    api: str
    build: int
    guests: int


class LaunchResult(TypedDict):
    handle: int
    measurement: str


class GuestInfo(TypedDict):
    state: str
    op_state: str
    measurement: str
    host_data: str
    policy: int


class ImportStatus(TypedDict):
    state: str
    handle: int | None


class MaReport(TypedDict, total=False):
    """A migration agent's answer: frames to relay, its session state, and (once established) a public summary."""

    state: str
    messages: list[str]  # base64 frames for the peer MA
    summary: dict[str, Any]
    error: str
    error_kind: str
    violations: list[str]
    peer_done: bool
