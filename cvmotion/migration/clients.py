"""migration layer: the untrusted host's typed handles on its platform process and its VM processes.

Thin wrappers over ``cvmotion.ipc`` calls, so the engine reads as the protocol it runs.  What comes back
is exactly what the host may see: ciphertext bundles, page numbers, public identity.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cvmotion.abi.wire import bundle_capacity
from cvmotion.errors import ProtocolError
from cvmotion.ipc.rpc import Endpoint, connect_unix

__all__ = ["PlatformClient", "Ring", "VmClient"]

GFN_DTYPE = "<u8"


class Ring:
    """Shared memory (a memfd) into which the SP seals bundles and from which the SP opens them."""

    def __init__(self, name: str, slots: int, pages_per_bundle: int) -> None:
        self.name = name
        self.slot_size = (bundle_capacity(pages_per_bundle) + 4095) & ~4095
        self.slots = slots
        self.fd = os.memfd_create(f"cvmotion-ring-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.slot_size * slots)
        self._map = mmap.mmap(self.fd, self.slot_size * slots, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)

    def slot(self, index: int) -> memoryview:
        return self.view[index * self.slot_size : (index + 1) * self.slot_size]

    def offset(self, index: int) -> int:
        return index * self.slot_size

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


@dataclass
class PlatformClient:
    """The host's view of its platform process (secure processor + migration agent)."""

    endpoint: Endpoint

    @classmethod
    def connect(cls, path: str) -> PlatformClient:
        client = cls(connect_unix(path, name="host->platform"))
        client.endpoint.call("host_hello")
        return client

    def call(self, method: str, args: dict[str, Any] | None = None, blob: bytes | memoryview = b"", **kw: Any) -> Any:
        return self.endpoint.call(method, args, blob, **kw)

    def identity(self) -> dict[str, Any]:
        return self.endpoint.call("status")[0]

    def attach_ring(self, ring: Ring) -> None:
        self.endpoint.call("ring_attach", {"ring": ring.name}, fds=[ring.fd])

    def detach_ring(self, ring: Ring) -> None:
        self.endpoint.call("ring_detach", {"ring": ring.name})

    def export_memory(self, handle: int, stream: int, gfns: npt.NDArray[np.uint64], ring: Ring, slot: int) -> int:
        """Seal ``gfns`` (one bundle) into ``slot`` of ``ring``; returns the bundle's length."""
        return self.export_memory_batch(handle, stream, [gfns], ring, [slot])[0]

    def export_memory_batch(
        self, handle: int, stream: int, batches: list[npt.NDArray[np.uint64]], ring: Ring, slots: list[int]
    ) -> list[int]:
        """Seal several bundles (one GFN array each) into ring slots in one round trip; returns their lengths."""
        bundles = [[ring.offset(slot), ring.slot_size, len(g)] for g, slot in zip(batches, slots, strict=True)]
        blob = (
            np.concatenate(batches).astype(GFN_DTYPE).tobytes()
            if len(batches) > 1
            else batches[0].astype(GFN_DTYPE).tobytes()
        )
        result, _, _ = self.endpoint.call(
            "export_memory", {"handle": handle, "stream": stream, "ring": ring.name, "bundles": bundles}, blob
        )
        return [int(n) for n in result["lengths"]]

    def export_blob(self, method: str, handle: int, stream: int = 0, **args: Any) -> bytes:
        _, blob, _ = self.endpoint.call(method, {"handle": handle, "stream": stream, **args})
        return blob

    def export_final(self, handle: int, stream: int = 0) -> list[bytes]:
        """The state bundles (vCPU, device, mutable) and the start token, sealed in one round trip."""
        result, blob, _ = self.endpoint.call("export_final", {"handle": handle, "stream": stream})
        out, offset = [], 0
        for length in result["lengths"]:
            out.append(blob[offset : offset + int(length)])
            offset += int(length)
        if offset != len(blob):
            raise ProtocolError(f"export_final: {len(blob)} bytes for bundles of {offset}")
        return out

    def import_bundle(self, vm: str, ring: Ring, slot: int, length: int) -> str:
        """Hand one bundle in ``slot`` of ``ring`` to the firmware; returns its type's name."""
        return self.import_bundles(vm, ring, [(ring.offset(slot), length)])[0]

    def import_bundles(self, vm: str, ring: Ring, bundles: list[tuple[int, int]]) -> list[str]:
        """Hand several bundles, ``(ring offset, length)`` each and in stream order, to the firmware in one
        round trip; returns their types' names.  The first that fails raises (the import is FAILED then)."""
        result, _, _ = self.endpoint.call(
            "import_bundle", {"vm": vm, "ring": ring.name, "bundles": [list(b) for b in bundles]}
        )
        return [str(k) for k in result["kinds"]]

    def close(self) -> None:
        self.endpoint.close()


@dataclass
class VmClient:
    """The host's view of one VM process (run control, dirty page numbers, console, cvm-io)."""

    name: str
    endpoint: Endpoint
    lock: threading.Lock | None = None

    @classmethod
    def connect(cls, name: str, path: str, handler: Any = None) -> VmClient:
        return cls(name, connect_unix(path, handler, name=f"host->vm-{name}"))

    def call(self, method: str, args: dict[str, Any] | None = None, blob: bytes = b"", **kw: Any) -> Any:
        return self.endpoint.call(method, args, blob, **kw)

    def info(self) -> dict[str, Any]:
        return self.endpoint.call("info")[0]

    def harvest_dirty(self) -> npt.NDArray[np.uint64]:
        _, blob, _ = self.endpoint.call("harvest_dirty")
        return np.frombuffer(blob, dtype=GFN_DTYPE).astype(np.uint64)

    def populated_gfns(self) -> npt.NDArray[np.uint64]:
        result, _, _ = self.endpoint.call("populated_ranges")
        parts = [np.arange(gpa >> 12, (gpa + length) >> 12, dtype=np.uint64) for gpa, length in result["ranges"]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def close(self) -> None:
        self.endpoint.close()
