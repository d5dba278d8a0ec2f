"""abi layer: the cvm-io paravirtual request device, byte for byte as ``guests/lib/cvmio.h`` defines it.

cvm-io is cvmotion's own device (there is no external spec; the C header is the contract and this
module mirrors it).  A guest rings a port I/O doorbell with the guest-physical address of a 32-byte
descriptor; the device reads the descriptor, acts, and writes ``status``/``len``/``tag`` back before the
OUT instruction completes::

    0x00 u16 op          Op
    0x02 u16 status      Status (guest writes PENDING, device writes the result)
    0x04 u32 flags       must be zero
    0x08 u64 buf_gpa     payload buffer
    0x10 u32 buf_len     buffer capacity
    0x14 u32 len         valid bytes (device: WAIT_REQUEST, GET_BLOB; guest: COMPLETE, POST_BLOB)
    0x18 u32 tag         request id, or the blob kind for GET_BLOB / POST_BLOB
    0x1C u32 timeout_ms  WAIT_REQUEST: the longest the device may block before answering RETRY
"""

from __future__ import annotations

import ctypes
import enum

from cvmotion.abi._codec import require_size

__all__ = [
    "CVMIO_ID",
    "CVMIO_PORT",
    "CVMIO_PORT_COUNT",
    "CVMIO_VERSION",
    "DESCRIPTOR_SIZE",
    "BlobKind",
    "CvmioDescriptor",
    "Op",
    "Register",
    "Status",
]

CVMIO_PORT = 0x0CB0
CVMIO_PORT_COUNT = 8
CVMIO_ID = 0x4F495643  # "CVIO" little-endian
CVMIO_VERSION = 1
DESCRIPTOR_SIZE = 0x20


class Register(enum.IntEnum):
    """Offsets from ``CVMIO_PORT``: IN at 0 reads the ID, IN at 4 the version, OUT at 0 is the doorbell."""

    ID = 0
    VERSION = 4
    DOORBELL = 0


class Op(enum.IntEnum):
    WAIT_REQUEST = 1
    COMPLETE = 2
    GET_BLOB = 3
    POST_BLOB = 4  # guest -> host: ``len`` bytes for the mailbox of kind ``tag`` (e.g. scheduled-event approvals)


class Status(enum.IntEnum):
    OK = 0
    RETRY = 1
    TOO_SMALL = 2
    BAD_DESC = 3
    NOT_FOUND = 4
    BAD_TAG = 5
    PENDING = 0xFFFF


class BlobKind(enum.IntEnum):
    """Mailbox blobs the host can hand to the guest (GET_BLOB ``tag``)."""

    ATTESTATION_TOKEN = 1
    # The VM's Scheduled Events document (IMDS JSON); the guest posts its StartRequests to the same kind.
    SCHEDULED_EVENTS = 2


class CvmioDescriptor(ctypes.LittleEndianStructure):
    """``struct cvmio_desc`` (guests/lib/cvmio.h)."""

    _pack_ = 1
    __slots__ = ()
    _fields_ = [
        ("op", ctypes.c_uint16),
        ("status", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("buf_gpa", ctypes.c_uint64),
        ("buf_len", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("tag", ctypes.c_uint32),
        ("timeout_ms", ctypes.c_uint32),
    ]


require_size(CvmioDescriptor, DESCRIPTOR_SIZE)
