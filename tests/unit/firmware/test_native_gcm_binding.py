"""firmware.native_gcm: which OpenSSL the SP's native AES-GCM binds, and that every choice seals the same bytes.

The shim links no libcrypto; it binds one at run time, once per process.  Binding is process-wide state, so the
checks that bind something else run in a fresh interpreter each.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from cvmotion.firmware import native_gcm

NATIVE = native_gcm.load()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="native/cvmgcm.c not built or no OpenSSL 3 found")
CANDIDATES = [c for c in native_gcm.libcrypto_candidates() if native_gcm.openssl_version(c) is not None]

# Seal 7 pages natively, compare with cryptography's AESGCM page by page, open them back, flip one tag bit.
_ROUND_TRIP = textwrap.dedent(
    """
    import random, sys
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cvmotion.firmware import native_gcm
    gcm = native_gcm.load()
    assert gcm is not None and gcm.libcrypto == sys.argv[1], (gcm and gcm.libcrypto, sys.argv[1])
    rng = random.Random(11)
    key, n = rng.randbytes(32), 7
    pages = [bytearray(rng.randbytes(4096)) for _ in range(n)]
    ivs, aads = memoryview(rng.randbytes(12 * n)), memoryview(rng.randbytes(32 * n))
    addr = np.array([native_gcm.buffer_address(memoryview(p)) for p in pages], dtype=np.uint64)
    out = bytearray(4112 * n)
    assert gcm.seal_pages(key, ivs, addr, aads, 32, native_gcm.buffer_address(memoryview(out)))
    aead = AESGCM(key)
    for i in range(n):
        want = aead.encrypt(bytes(ivs[12 * i:12 * i + 12]), bytes(pages[i]), bytes(aads[32 * i:32 * i + 32]))
        assert out[4112 * i:4112 * (i + 1)] == want, i
    back = [bytearray(4096) for _ in range(n)]
    targets = np.array([native_gcm.buffer_address(memoryview(b)) for b in back], dtype=np.uint64)
    assert gcm.open_pages(key, ivs, memoryview(out), aads, 32, targets) == 0 and back == pages
    out[4112 * 3 + 4100] ^= 1
    assert gcm.open_pages(key, ivs, memoryview(out), aads, 32, targets) == 1
    print(gcm.version)
    """
)


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_newest_openssl_found_is_bound() -> None:
    assert NATIVE is not None
    versions = {c: native_gcm.openssl_version(c) for c in CANDIDATES}
    newest = max(v for v in versions.values() if v is not None)
    assert native_gcm.openssl_version(NATIVE.libcrypto) == newest
    assert NATIVE.version == newest[1]
    assert NATIVE.version.startswith("OpenSSL 3")


@pytest.mark.parametrize("libcrypto", CANDIDATES)
def test_every_openssl_found_seals_the_same_bytes_as_cryptography(libcrypto: str) -> None:
    done = _python(_ROUND_TRIP, libcrypto, env={"CVMOTION_LIBCRYPTO": libcrypto})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OpenSSL 3")


def test_a_library_that_is_not_openssl_3_leaves_the_python_path() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    for path in (libc, "/nonexistent/libcrypto.so.3"):
        done = _python(
            "from cvmotion.firmware import native_gcm; print(native_gcm.load())", env={"CVMOTION_LIBCRYPTO": path}
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "None"


def test_the_shim_fails_closed_until_bound_and_binds_once() -> None:
    assert NATIVE is not None
    code = textwrap.dedent(
        """
        import ctypes, ctypes.util, sys
        from cvmotion.firmware import native_gcm
        lib = ctypes.CDLL(str(native_gcm._library_path()))
        lib.cvm_gcm_bind.restype, lib.cvm_gcm_bind.argtypes = ctypes.c_ulong, [ctypes.c_char_p]
        page, out = ctypes.create_string_buffer(4096), ctypes.create_string_buffer(4112)
        addr = (ctypes.c_uint64 * 1)(ctypes.addressof(page))
        key, iv, aad = bytes(32), bytes(12), bytes(32)
        seal = lambda: lib.cvm_gcm_seal_pages(key, ctypes.c_size_t(1), iv, addr, aad, ctypes.c_size_t(32), out)
        opened = lambda: lib.cvm_gcm_open_pages(key, ctypes.c_size_t(1), iv, out, aad, ctypes.c_size_t(32), addr)
        assert seal() == -1 and opened() == -1  # nothing bound: every call fails, nothing is written
        assert lib.cvm_gcm_bind(ctypes.util.find_library("c").encode()) == 0  # no EVP functions in libc
        assert seal() == -1
        assert lib.cvm_gcm_bind(sys.argv[1].encode()) >= 0x30000000
        assert seal() == 0 and opened() == 0
        assert lib.cvm_gcm_bind(sys.argv[1].encode()) == 0  # a second bind is refused
        print("ok")
        """
    )
    done = _python(code, NATIVE.libcrypto)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
