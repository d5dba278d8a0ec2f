"""firmware layer: the SP's per-page AES-256-GCM for a whole bundle in one native call (``native/cvmgcm.c``).

``make`` builds ``build/native/libcvmgcm.so``; it links no OpenSSL but binds one at run time (``load``): the
newest OpenSSL 3 ``libcrypto`` among the system's ``libcrypto.so.3`` (the library Python's own ssl module
uses) and the one the ``psycopg[binary]`` wheel, a dependency already, carries — or the one
``CVMOTION_LIBCRYPTO`` names.  The version matters: Debian 12's OpenSSL 3.0 has no VAES/AVX-512 AES-GCM and
seals a 4 KiB page in 1.1 µs where 3.5 takes 0.46 on the same Xeon.  When the shim is missing — not built,
no OpenSSL 3 found, or ``CVMOTION_NATIVE_GCM=0`` — the firmware seals and opens page by page through
``cryptography``: same cipher, same bytes (tests compare the two).  The shim takes raw addresses: callers pass
arrays of page addresses into memory they keep alive for the call, and ctypes releases the GIL while OpenSSL
runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["NativeGcm", "buffer_address", "libcrypto_candidates", "load", "openssl_version"]

_ENV = "CVMOTION_NATIVE_GCM"
_LIBCRYPTO_ENV = "CVMOTION_LIBCRYPTO"
_OPENSSL_3 = 0x3000_0000  # OpenSSL_version_num() of 3.0.0: the EVP ABI the shim calls
_u8p = ctypes.c_void_p


class NativeGcm:
    """The loaded shim (``load()``); the callers check lengths, this only marshals."""

    def __init__(self, lib: ctypes.CDLL, path: Path, libcrypto: str, version: str) -> None:
        self.path = path
        self.libcrypto = libcrypto  # the library bound (a path)
        self.version = version  # its OpenSSL_version(OPENSSL_VERSION), e.g. "OpenSSL 3.5.9 29 Sep 2026"
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


def libcrypto_candidates() -> list[str]:
    """OpenSSL libcrypto libraries on this machine the shim could bind: ``CVMOTION_LIBCRYPTO`` alone when set,
    else the system's and the one in the ``psycopg[binary]`` wheel (auditwheel names it ``libcrypto-HASH.so.3``)."""
    if chosen := os.environ.get(_LIBCRYPTO_ENV):
        return [chosen]
    found: list[str] = []
    system = ctypes.util.find_library("crypto")
    if system:
        found.append(system)
    spec = importlib.util.find_spec("psycopg_binary")  # found, not imported (that would load libpq)
    if spec is not None and spec.origin is not None:
        wheel_libs = Path(spec.origin).resolve().parent.parent / "psycopg_binary.libs"
        found.extend(str(p) for p in sorted(wheel_libs.glob("libcrypto-*.so.3")))
    return found


def openssl_version(path: str) -> tuple[int, str] | None:
    """(OpenSSL_version_num(), OpenSSL_version(0)) of a libcrypto, or None if it is not an OpenSSL 3 one."""
    try:
        lib = ctypes.CDLL(path)
        num, text = lib.OpenSSL_version_num, lib.OpenSSL_version
    except (OSError, AttributeError):
        return None
    num.restype, num.argtypes = ctypes.c_ulong, []
    text.restype, text.argtypes = ctypes.c_char_p, [ctypes.c_int]
    version = int(num())
    if version < _OPENSSL_3:
        return None
    return version, (text(0) or b"").decode("ascii", "replace")


@functools.cache
def load() -> NativeGcm | None:
    """The shim bound to the newest OpenSSL 3 found, or None (the Python path is used): once per process."""
    if os.environ.get(_ENV, "1") == "0":
        return None
    path = _library_path()
    if not path.exists():
        return None
    versions = [(v, c) for c in libcrypto_candidates() if (v := openssl_version(c)) is not None]
    try:
        lib = ctypes.CDLL(str(path))
        bind = lib.cvm_gcm_bind
    except (OSError, AttributeError):
        return None
    bind.restype, bind.argtypes = ctypes.c_ulong, [ctypes.c_char_p]
    # Newest first; one that lacks a function the shim calls (a future major release) leaves nothing bound.
    for (num, text), libcrypto in sorted(versions, reverse=True):
        if bind(os.fsencode(libcrypto)) == num:
            return NativeGcm(lib, path, libcrypto, text)
    return None
