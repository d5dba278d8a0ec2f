"""firmware layer: the SP's per-page AES-256-GCM for a whole bundle in one native call (``native/cvmgcm.c``).

``make`` builds ``build/native/libcvmgcm.so`` against the system's ``libcrypto.so.3`` (the library Python's
own ssl module uses). When it is missing — not built, no OpenSSL 3, or ``CVMOTION_NATIVE_GCM=0`` — the
firmware seals and opens page by page through ``cryptography``: same cipher, same bytes (tests compare the
two). The shim takes raw addresses: callers pass arrays of page addresses into memory they keep alive for
the call, and ctypes releases the GIL while OpenSSL runs.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["NativeGcm", "buffer_address", "load"]

_ENV = "CVMOTION_NATIVE_GCM"
_u8p = ctypes.c_void_p


class NativeGcm:
    """The loaded shim (``load()``); the callers check lengths, this only marshals."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._seal = lib.cvm_gcm_seal_pages
        self._seal.argtypes = [_u8p, ctypes.c_size_t, _u8p, _u8p, _u8p, ctypes.c_size_t, _u8p]
        self._seal.restype = ctypes.c_int
        self._open = lib.cvm_gcm_open_pages
        self._open.argtypes = [_u8p, ctypes.c_size_t, _u8p, _u8p, _u8p, ctypes.c_size_t, _u8p]
        self._open.restype = ctypes.c_int

    def seal_pages(
        self, key: bytes, ivs: memoryview, pages: npt.NDArray[np.uint64], aads: memoryview, aad_len: int, out: int
    ) -> bool:
        """Seal ``len(pages)`` pages (addresses) into ``out`` (address of ``n * (4096 + 16)`` bytes)."""
        table = np.ascontiguousarray(pages, dtype=np.uint64)
        if len(ivs) < 12 * len(table) or len(aads) < aad_len * len(table) or len(key) != 32:
            raise ValueError("seal_pages: short IV/AAD tables or a bad key")
        rc = self._seal(key, len(table), buffer_address(ivs), table.ctypes.data, buffer_address(aads), aad_len, out)
        return int(rc) == 0

    def open_pages(
        self,
        key: bytes,
        ivs: memoryview,
        sealed: memoryview,
        aads: memoryview,
        aad_len: int,
        outs: npt.NDArray[np.uint64],
    ) -> int:
        """Open ``len(outs)`` sealed units in ``sealed`` into the pages at ``outs`` (addresses): 0 all verified,
        1 a tag did not verify, -1 OpenSSL failed."""
        table = np.ascontiguousarray(outs, dtype=np.uint64)
        n = len(table)
        if len(ivs) < 12 * n or len(aads) < aad_len * n or len(sealed) != (4096 + 16) * n or len(key) != 32:
            raise ValueError("open_pages: sizes do not match the page count")
        rc = self._open(
            key, n, buffer_address(ivs), buffer_address(sealed), buffer_address(aads), aad_len, table.ctypes.data
        )
        return int(rc)


def buffer_address(buffer: memoryview) -> int:
    """The address of a contiguous buffer (read-only ones too), valid while ``buffer`` is alive."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def _library_path() -> Path:
    return Path(__file__).resolve().parents[2] / "build" / "native" / "libcvmgcm.so"


def load() -> NativeGcm | None:
    """The shim, or None (the Python path is used) when it is absent or disabled."""
    if os.environ.get(_ENV, "1") == "0":
        return None
    path = _library_path()
    if not path.exists():
        return None
    try:
        return NativeGcm(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError):
        return None
