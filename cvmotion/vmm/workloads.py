"""vmm layer: host-side twins of the guest workloads -- the memdirty checksum model and the kvstore/probe clients.

``MemdirtyModel`` replays guests/memdirty.c's write sequence, so a heartbeat's ``csum`` can be checked
for any write count: a resumed guest matches the model, a restarted one or one resumed over wrong
memory does not.  ``KvClient`` speaks the kvstore request format over cvm-io; ``ProbeClient`` drives the
probe test guest.  Wire formats are documented in the guests' C sources.
"""

from __future__ import annotations

import re
import struct

from cvmotion.abi.kvstore import KEY_MAX, VALUE_MAX, KvOp, KvStats, KvStatus, decode_response, encode_request
from cvmotion.errors import DeviceError, UsageError
from cvmotion.vmm.devices.cvmio import CvmIo

__all__ = [
    "HEARTBEAT",
    "KEY_MAX",
    "VALUE_MAX",
    "decode_response",
    "encode_request",
    "KvClient",
    "KvOp",
    "KvStats",
    "KvStatus",
    "MemdirtyModel",
    "ProbeClient",
    "mix32",
    "parse_heartbeat",
]

_M32 = 0xFFFFFFFF
HEARTBEAT = re.compile(r"^HB seq=(\d+) writes=(\d+) csum=([0-9a-f]{8})$")


def mix32(x: int) -> int:
    """guests/memdirty.c ``mix32`` (a 32-bit integer hash: xor-shift, multiply, xor-shift)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def parse_heartbeat(line: str) -> tuple[int, int, int] | None:
    """``(seq, writes, csum)`` of a memdirty heartbeat line, or None."""
    m = HEARTBEAT.match(line)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3), 16))


class MemdirtyModel:
    """Replays memdirty's writes; ``checksum_at(n)`` is the csum the guest prints after ``n`` writes."""

    def __init__(self, dirty_mib: int = 4, seed: int = 1) -> None:
        self.pages = dirty_mib * 256
        self.seed = seed & _M32
        self._fill = mix32(self.seed)
        state = self.seed ^ 0x9E3779B9
        self._state = state or 1
        self._mem: dict[int, int] = {}
        self.writes = 0
        self.csum = 0

    def _initial(self, word: int) -> int:
        page, k = divmod(word, 1024)
        return ((page << 10) ^ self._fill) & _M32 if k == 0 else 0

    def checksum_at(self, writes: int) -> int:
        if writes < self.writes:
            raise UsageError(f"the model is at {self.writes} writes and cannot go back to {writes}")
        x, csum, mem, seed = self._state, self.csum, self._mem, self.seed
        for w in range(self.writes, writes):
            x ^= (x << 13) & _M32
            x ^= x >> 17
            x ^= (x << 5) & _M32
            word = (x % self.pages) * 1024 + ((x >> 22) & 1023)
            old = mem.get(word)
            if old is None:
                old = self._initial(word)
            v = mix32(old ^ (w & _M32) ^ seed)
            mem[word] = v
            csum = ((csum << 5) | (csum >> 27)) & _M32 ^ v
        self._state, self.csum, self.writes = x, csum, writes
        return csum


class KvClient:
    """GET/PUT/DELETE against the kvstore guest; a returned ``put`` is stored in guest memory."""

    def __init__(self, cvmio: CvmIo, timeout: float = 10.0) -> None:
        self._cvmio = cvmio
        self._timeout = timeout

    def _call(self, op: KvOp, key: bytes = b"", value: bytes = b"") -> tuple[KvStatus, bytes]:
        return decode_response(self._cvmio.submit(encode_request(op, key, value), self._timeout))

    def put(self, key: bytes, value: bytes) -> None:
        status, _ = self._call(KvOp.PUT, key, value)
        if status is not KvStatus.OK:
            raise DeviceError(f"kvstore: PUT {key!r} failed: {status.name}")

    def get(self, key: bytes) -> bytes | None:
        status, value = self._call(KvOp.GET, key)
        if status is KvStatus.NOT_FOUND:
            return None
        if status is not KvStatus.OK:
            raise DeviceError(f"kvstore: GET {key!r} failed: {status.name}")
        return value

    def delete(self, key: bytes) -> bool:
        status, _ = self._call(KvOp.DELETE, key)
        if status not in (KvStatus.OK, KvStatus.NOT_FOUND):
            raise DeviceError(f"kvstore: DELETE {key!r} failed: {status.name}")
        return status is KvStatus.OK

    def stats(self) -> KvStats:
        status, value = self._call(KvOp.STATS)
        if status is not KvStatus.OK:
            raise DeviceError(f"kvstore: STATS failed: {status.name}")
        return KvStats.from_bytes(value)

    def blob(self, kind: int) -> bytes | None:
        """The guest fetches mailbox blob ``kind`` with cvm-io GET_BLOB and returns it."""
        status, value = self._call(KvOp.BLOB, value=struct.pack("<I", kind))
        if status is KvStatus.NO_BLOB:
            return None
        if status is not KvStatus.OK:
            raise DeviceError(f"kvstore: BLOB {kind} failed: {status.name}")
        return value


class ProbeClient:
    """Drives the probe guest (guests/probe.c)."""

    def __init__(self, cvmio: CvmIo, timeout: float = 10.0) -> None:
        self._cvmio = cvmio
        self._timeout = timeout

    @staticmethod
    def _request(op: int, items: list[int]) -> bytes:
        return struct.pack(f"<BxxxI{len(items)}I", op, len(items), *items)

    def touch(self, gfns: list[int]) -> None:
        """The guest writes ``gfn ^ 0x5A5A5A5A`` into the first word of each page."""
        reply = self._cvmio.submit(self._request(1, gfns), self._timeout)
        if not reply or reply[0] != 0:
            raise DeviceError(f"probe: TOUCH refused (status {reply[:1].hex() or 'none'})")

    def read(self, gfns: list[int]) -> list[int]:
        """The first word of each page, as the guest reads it."""
        reply = self._cvmio.submit(self._request(2, gfns), self._timeout)
        if len(reply) != 4 + 4 * len(gfns) or reply[0] != 0:
            raise DeviceError(f"probe: READ refused (status {reply[:1].hex() or 'none'})")
        return list(struct.unpack_from(f"<{len(gfns)}I", reply, 4))

    def exit(self, code: int) -> None:
        self._cvmio.post(self._request(3, [code]))

    def halt(self) -> None:
        self._cvmio.post(self._request(4, []))

    def triple_fault(self) -> None:
        self._cvmio.post(self._request(5, []))
