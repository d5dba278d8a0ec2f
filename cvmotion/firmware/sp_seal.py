"""firmware layer: the secure processor's state sealed across a restart of the platform process.

On real hardware the AMD-SP keeps its guest contexts (VEK, VMPCKs, op-states) while host software is
replaced; the emulated SP lives in the platform process, so replacing that process must carry them over
without giving the (untrusted) host anything it could read, forge or roll back.  The SP writes its state
once, sealed, and the next platform process opens it once:

```
DATA_DIR/sp-state.sealed   header (0x20) | nonce (12) | AES-256-GCM(state) | tag (16)        (0600)
                           header = MAGIC "CVMSPST\\0" | u16 format | u16 0 | u32 0 | u64 generation | u64 0
                           AAD    = header | CHIP_ID; key = HKDF-SHA384(chip secret, "SP state seal" | CHIP_ID)
DATA_DIR/sp.nvram          MAGIC "CVMNVRM\\0" | u16 format | u16 flags | u32 0 | u64 generation
                           | SHA-256(the pending sealed blob) | HMAC-SHA256 over the above       (0600)
```

``sp.nvram`` stands for the chip's replay-protected non-volatile storage (an RPMB-like monotonic counter):
EMULATED hardware storage, in the same trust domain as ``chip.secret`` (DESIGN.md, emulation boundary).  It
holds the generation of the last save and the digest of the one blob that may be opened, so:

- an older save (a replay: it would resurrect a guest since exported, or reset VMPCK sequence numbers) has
  another generation and digest: refused;
- the newest save opens once: opening it consumes it (a second platform process opening the same bytes
  would be a fork of every guest);
- a forged or tampered blob, or one of another chip, fails the AEAD.

Every refusal is the same opaque ``IntegrityError``: the host learns nothing about which check failed.
Rolling ``sp.nvram`` itself back to an older record together with that record's blob is tampering with the
chip's storage, as reading ``chip.secret`` is: outside what the emulation defends (it is hardware).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.errors import IntegrityError
from cvmotion.files import PRIVATE, write_atomic
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.keys import hkdf_sha384

__all__ = ["NVRAM_FILE", "SEALED_FILE", "NvRecord", "SpNvram", "open_sealed", "seal"]

SEALED_FILE = "sp-state.sealed"
NVRAM_FILE = "sp.nvram"
_SEAL_MAGIC = b"CVMSPST\0"
_NV_MAGIC = b"CVMNVRM\0"
_FORMAT = 1
_HEADER = struct.Struct("<8sHHIQQ")  # magic, format, reserved, reserved, generation, reserved
_NV = struct.Struct("<8sHHIQ32s")  # magic, format, flags, reserved, generation, pending digest
_NV_PENDING = 1
_NONCE = 12
_TAG = 16


@dataclass(frozen=True, slots=True)
class NvRecord:
    """The counter's value: the last generation saved, and the digest of the blob still to be opened."""

    generation: int
    pending: bytes | None  # SHA-256 of the sealed blob that may be opened once; None when consumed


class SpNvram:
    """The chip's replay-protected counter (emulated hardware storage in the host's data directory).

    Only the SP writes it; every record is MAC'd under a key derived from the chip secret, so a forged
    record fails closed.  Read-modify-write happens under an ``flock``: two platform processes opening one
    save race here, and exactly one wins.
    """

    def __init__(self, chip: Chip) -> None:
        self._path = chip.data_dir / NVRAM_FILE
        self._mac_key = hkdf_sha384(chip.chip_secret, b"cvmotion SP nvram" + chip.chip_id)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self._path.with_name(f".{NVRAM_FILE}.lock"), os.O_RDWR | os.O_CREAT, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self) -> NvRecord:
        """The current record; a never-written counter is generation 0 with nothing pending."""
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return NvRecord(0, None)
        body, mac = raw[: _NV.size], raw[_NV.size :]
        if len(raw) != _NV.size + 32 or not hmac.compare_digest(mac, self._mac(body)):
            raise IntegrityError()
        magic, fmt, flags, reserved, generation, digest = _NV.unpack(body)
        if magic != _NV_MAGIC or fmt != _FORMAT or reserved or flags & ~_NV_PENDING:
            raise IntegrityError()
        return NvRecord(generation, digest if flags & _NV_PENDING else None)

    def write(self, record: NvRecord) -> None:
        flags = _NV_PENDING if record.pending is not None else 0
        body = _NV.pack(_NV_MAGIC, _FORMAT, flags, 0, record.generation, record.pending or bytes(32))
        write_atomic(self._path, body + self._mac(body), mode=PRIVATE)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).digest()


def _seal_key(chip: Chip) -> bytes:
    return hkdf_sha384(chip.chip_secret, b"cvmotion SP state seal" + chip.chip_id)


def seal(chip: Chip, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` as the next generation and make it the one blob the counter lets open."""
    nvram = SpNvram(chip)
    with nvram.locked():
        generation = nvram.read().generation + 1
        header = _HEADER.pack(_SEAL_MAGIC, _FORMAT, 0, 0, generation, 0)
        nonce = os.urandom(_NONCE)
        blob = header + nonce + AESGCM(_seal_key(chip)).encrypt(nonce, plaintext, header + chip.chip_id)
        # The counter moves before the blob leaves the SP: whatever was sealed before can never open again.
        nvram.write(NvRecord(generation, hashlib.sha256(blob).digest()))
        return blob


def open_sealed(chip: Chip, blob: bytes) -> bytes:
    """Open the pending sealed state of this chip, once. Anything else: one opaque ``IntegrityError``."""
    nvram = SpNvram(chip)
    with nvram.locked():
        record = nvram.read()
        if len(blob) < _HEADER.size + _NONCE + _TAG:
            raise IntegrityError()
        end = _HEADER.size + _NONCE
        header, nonce, sealed = blob[: _HEADER.size], blob[_HEADER.size : end], blob[end:]
        magic, fmt, r1, r2, _generation, r3 = _HEADER.unpack(header)
        try:
            plaintext = AESGCM(_seal_key(chip)).decrypt(nonce, sealed, header + chip.chip_id)
        except (InvalidTag, ValueError):
            raise IntegrityError() from None
        if (magic, fmt, r1, r2, r3) != (_SEAL_MAGIC, _FORMAT, 0, 0, 0):
            raise IntegrityError()
        # The counter names the one blob that may open (its digest; the generation in its header makes every
        # save's bytes differ): an older save, or this one opened already, would be a rollback or a fork.
        pending = record.pending
        if pending is None or not hmac.compare_digest(pending, hashlib.sha256(blob).digest()):
            raise IntegrityError()
        nvram.write(NvRecord(record.generation, None))
        return plaintext


def sealed_path(data_dir: Path) -> Path:
    return data_dir / SEALED_FILE
