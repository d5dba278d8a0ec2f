"""testing: canaries — guest-private plaintext that must never appear on the untrusted side.

Tests read canaries with *hardware* access the hypervisor has no protocol path to: ``GuestMemoryTap``
opens a VM process's guest-RAM memfd through ``/proc/PID/fd`` (what a DRAM probe would read; the
emulation boundary in README.md says why a same-uid host could do it too, and that the tests prove the
host's *code* never does).  Canaries are bytes that never travel through device I/O:

- the guest's VMPCK0..3, from the SNP secrets page (``SECRETS_PAGE_GPA`` + 0x20, SNP ABI "Secrets Page
  Format"): static key material; seeing one anywhere in a daemon means the daemon held a guest key;
- keys the SP derives for the guest (``MSG_KEY_REQ``, VMRK- and VCEK-rooted), asked for over VMPCK0 exactly as
  the guest would (``guest_key_canaries``): the host relays the request and the response, sealed;
- the migration session keys K_f and K_b, which only the firmware and the MAs hold: tests that run the SP
  in-process read them there (``session_key_canaries``);
- memdirty's working set: words the guest wrote (``MemdirtyModel`` replays them), as windows spanning four
  written words (>= 128 bits only the guest's writes put there).  memdirty keeps rewriting its pages, so a
  snapshot taken early decays; ``InFlightCanaries`` instead reads, from the source's memory, the plaintext
  of pages *while their sealed bundle passes the proxy* — exactly what the stream carried encrypted.

Where the untrusted side keeps bytes, a helper looks: ``find_canaries`` in relayed traffic, RPC replies and HTTP
responses, ``scan_tree`` in a host's data directory (its logs included), ``scan_process`` in a daemon's memory
through ``/proc/PID/mem``: the present pages (``/proc/PID/pagemap``) of its readable mappings with resident
memory (``/proc/PID/smaps``; file-backed read-only mappings hold file contents, not runtime data, and are
skipped), bounded by ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from cvmotion.abi import wire
from cvmotion.abi.guest_msg import GuestChannel, KeyReq, KeyRsp, RootKey
from cvmotion.abi.wire import BundleType, EntryFlag
from cvmotion.errors import AbiError, UsageError
from cvmotion.testing.adversary import Emit, Frame, MigrationProxy, Tamper
from cvmotion.vmm.layout import MemoryLayout
from cvmotion.vmm.loader import SECRETS_PAGE_GPA

if TYPE_CHECKING:
    from cvmotion.firmware.device import GuestHandle, SecureProcessor

__all__ = [
    "CANARY_SIZE",
    "GuestMemoryTap",
    "InFlightCanaries",
    "ScanResult",
    "find_canaries",
    "guest_key_canaries",
    "memdirty_canaries",
    "page_windows",
    "scan_process",
    "scan_tree",
    "secrets_canaries",
    "session_key_canaries",
    "vmpck0",
]

CANARY_SIZE = 32
VMPCK0_OFFSET = 0x20  # SNP secrets page: 0x020 VMPCK0[32]
_CHUNK = 64 << 20
_PAGE = 4096
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")


class GuestMemoryTap:
    """Read-only "hardware" view of one VM process's guest RAM (its memfd, opened via ``/proc/PID/fd``)."""

    def __init__(self, pid: int, memory: int) -> None:
        self.pid = pid
        self.layout = MemoryLayout.for_size(memory)
        fd_dir = f"/proc/{pid}/fd"
        best: int | None = None
        for entry in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{entry}")
                # The guest RAM memfd is the one of exactly the VM's size (rings and others differ).
                if target.startswith("/memfd:cvmotion-") and os.stat(f"{fd_dir}/{entry}").st_size == memory:
                    best = int(entry)
                    break
        if best is None:
            raise UsageError(f"process {pid} has no guest RAM memfd of {memory:#x} bytes")
        self._fd = os.open(f"{fd_dir}/{best}", os.O_RDONLY)

    def read(self, gpa: int, length: int) -> bytes:
        return os.pread(self._fd, length, self.layout.offset_of(gpa, length))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> GuestMemoryTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_windows(page: bytes, rng: random.Random, count: int = 1) -> list[bytes]:
    """Up to ``count`` windows of a memdirty page, each spanning four words the guest wrote."""
    written = [i for i in range(0, len(page), 4) if page[i : i + 4] != b"\0\0\0\0"]
    out: list[bytes] = []
    if len(written) < 4:
        return out
    for first in rng.sample(range(len(written) - 3), min(count, len(written) - 3)):
        lo, hi = written[first], written[first + 3] + 4
        if hi - lo < CANARY_SIZE:
            lo, hi = max(0, hi - CANARY_SIZE), max(hi, CANARY_SIZE)
        out.append(page[lo:hi])
    return out


def memdirty_canaries(
    tap: GuestMemoryTap, *, dirty_mib: int, rng: random.Random, base: int = 0x400000, count: int = 4
) -> list[bytes]:
    """``count`` windows of memdirty's working set as it is now (a snapshot: the guest keeps rewriting it)."""
    found: list[bytes] = []
    for page in rng.sample(range(dirty_mib * 256), min(dirty_mib * 256, 256)):
        found += page_windows(tap.read(base + page * 4096, 4096), rng)
        if len(found) == count:
            return found
    raise UsageError(f"memdirty working set has too few written words for {count} canaries (found {len(found)})")


def vmpck0(tap: GuestMemoryTap) -> bytes:
    """The guest's VMPCK0 from its secrets page; refuses an all-zero key (no secrets page there)."""
    return secrets_canaries(tap)[0]


def secrets_canaries(tap: GuestMemoryTap) -> list[bytes]:
    """VMPCK0..3 from the guest's secrets page (static for the guest's life)."""
    page = tap.read(SECRETS_PAGE_GPA, 4096)
    keys = [page[VMPCK0_OFFSET + 32 * i : VMPCK0_OFFSET + 32 * (i + 1)] for i in range(4)]
    if any(k == bytes(32) for k in keys):
        raise UsageError(f"no VMPCKs in a secrets page at GPA {SECRETS_PAGE_GPA:#x}")
    return keys


def guest_key_canaries(vmpck0_key: bytes, relay: Callable[[bytes], bytes]) -> dict[str, bytes]:
    """Keys the SP derives for the guest, asked for as the guest would: ``MSG_KEY_REQ`` sealed under VMPCK0.

    ``relay`` carries the sealed request to the SP and returns its sealed response (the host's path: the
    platform's ``guest_request``).  The channel starts at sequence number 1, so use it on a guest that has not
    sent a guest message yet (one without a paravisor); the SP then expects the guest's next at 3.
    """
    channel = GuestChannel(vmpck0_key)
    out: dict[str, bytes] = {}
    for label, req in (
        ("VMRK-derived key", KeyReq(root_key=RootKey.VMRK)),
        ("VMRK-derived key (svn 1)", KeyReq(root_key=RootKey.VMRK, guest_svn=1)),
        ("VCEK-derived key", KeyReq(root_key=RootKey.VCEK)),
    ):
        out[label] = KeyRsp.from_bytes(channel.open_response(relay(channel.key_request(req)))).derived_key
    return out


def session_key_canaries(
    sp: SecureProcessor, *, export: GuestHandle | None = None, ref: int | None = None
) -> dict[str, bytes]:
    """K_f (of the export of ``export``) and K_b (of the import ``ref``) read inside an in-process SP: "hardware"
    access the host has no protocol path to."""
    mig = sp.migration
    out: dict[str, bytes] = {}
    if export is not None:
        exp = mig._exports[export]
        out["K_f"] = exp.k_f
        if exp.k_b is not None:
            out["K_b (source copy)"] = exp.k_b
    if ref is not None:
        imp = mig._imports[ref]
        if imp.k_b is not None:
            out["K_b"] = imp.k_b
        if imp.k_f is not None:
            out["K_f (destination copy)"] = imp.k_f
    return out


def scan_tree(root: Path, canaries: Sequence[bytes], *, max_file: int = 256 << 20) -> dict[int, str]:
    """Canaries found in the regular files under ``root`` (a data directory: state, logs, sockets skipped):
    index -> the first file that holds it."""
    hits: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        with contextlib.suppress(OSError):
            if not path.is_file() or path.is_symlink() or path.stat().st_size > max_file:
                continue
            for i in find_canaries([path.read_bytes()], canaries):
                hits.setdefault(i, str(path))
    return hits


def find_canaries(chunks: Iterable[bytes | bytearray | memoryview], canaries: Sequence[bytes]) -> list[int]:
    """Indexes of ``canaries`` found in any of ``chunks`` (each searched whole)."""
    hits: set[int] = set()
    for chunk in chunks:
        data = bytes(chunk)
        for i, canary in enumerate(canaries):
            if i not in hits and data.find(canary) >= 0:
                hits.add(i)
    return sorted(hits)


@dataclass(frozen=True, slots=True)
class ScanResult:
    pid: int
    scanned: int  # bytes read
    regions: int
    hits: tuple[int, ...]  # indexes into the canaries found
    where: tuple[str, ...]  # the mapping each hit was in (address range and name)


def scan_process(pid: int, canaries: Sequence[bytes], *, max_bytes: int = 1 << 30) -> ScanResult:
    """Search the resident pages of ``pid``'s readable, writable-or-anonymous mappings for ``canaries``.

    Only pages ``/proc/PID/pagemap`` marks present are read (a page never touched is zero and holds nothing);
    runs of present pages are searched whole, so a canary spanning pages is found.
    """
    if not canaries:
        raise UsageError("no canaries to look for")
    scanned = regions = 0
    hits: dict[int, str] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
        for lo, hi, name, shared in _resident_regions(pid):
            regions += 1
            # A shared mapping's pages may hold data another process wrote without being present here.
            for start, end in [(lo, hi)] if shared else _present_runs(pm, lo, hi):
                addr = start
                while addr < end and scanned < max_bytes:
                    size = min(_CHUNK, end - addr, max_bytes - scanned)
                    try:
                        mem.seek(addr)
                        data = mem.read(size)
                    except OSError:
                        break  # unmapped under us, or a guard page: nothing readable there
                    scanned += len(data)
                    for i in find_canaries([data], canaries):
                        hits.setdefault(i, f"{lo:#x}-{hi:#x} {name}")
                    addr += size
    return ScanResult(pid, scanned, regions, tuple(sorted(hits)), tuple(hits[i] for i in sorted(hits)))


def _present_runs(pagemap: BinaryIO, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) address runs of present pages in [lo, hi) (pagemap bit 63: present; 62: swapped)."""
    pagemap.seek((lo // _PAGE) * 8)
    raw = pagemap.read(((hi - lo) // _PAGE) * 8)
    entries = np.frombuffer(raw, dtype="<u8")
    present = ((entries >> np.uint64(62)) & np.uint64(3)) != 0
    if not present.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], present, [False])).astype(np.int8)))
    return [(lo + int(a) * _PAGE, lo + int(b) * _PAGE) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _resident_regions(pid: int) -> list[tuple[int, int, str, bool]]:
    """(start, end, name, shared) of mappings worth scanning, from ``/proc/PID/smaps`` (Rss > 0)."""
    out: list[tuple[int, int, str, bool]] = []
    current: tuple[int, int, str, bool] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _MAPS.match(line)
            if m is not None:
                lo, hi, perms, inode, name = int(m[1], 16), int(m[2], 16), m[3], int(m[4]), m[5]
                readable = perms[0] == "r"
                file_text = inode != 0 and perms[1] != "w" and not name.startswith("/memfd:")
                special = name in ("[vvar]", "[vsyscall]", "[vvar_vclock]")
                keep = readable and not file_text and not special
                current = (lo, hi, name, perms[3] == "s") if keep else None
            elif current is not None and line.startswith("Rss:"):
                if int(line.split()[1]) > 0 or current[3]:
                    out.append(current)
                current = None
    return out


class InFlightCanaries:
    """A tamper wrapper that reads canaries from MEMORY bundles as they pass the proxy.

    For the first ``limit`` data pages in memdirty's working set (``[base, base + dirty_mib MiB)``) that travel
    to the destination, it reads the page's plaintext from the source's memory (the bundle was sealed
    moments before) and keeps a window of it: the plaintext of ciphertext the untrusted side carried.
    Everything is then handed to ``inner`` (or passed on).
    """

    def __init__(
        self,
        tap: GuestMemoryTap,
        inner: Tamper | None = None,
        *,
        rng: random.Random,
        dirty_mib: int,
        base: int = 0x400000,
        limit: int = 8,
    ) -> None:
        self.tap = tap
        self.inner = inner
        self.rng = rng
        self.lo, self.hi = base, base + (dirty_mib << 20)
        self.limit = limit
        self.canaries: list[bytes] = []

    def __call__(self, frame: Frame, proxy: MigrationProxy) -> Sequence[Emit] | None:
        h = frame.bundle()
        if h is not None and h.type is BundleType.MEMORY and len(self.canaries) < self.limit:
            with contextlib.suppress(AbiError):
                entries = wire.parse_memory_metadata(frame.payload[wire.HEADER_SIZE : h.size - wire.MAC_SIZE])
                pages = [e & ~0xFFF for e in entries if not e & EntryFlag.ZERO and self.lo <= e & ~0xFFF < self.hi]
                for gpa in self.rng.sample(pages, min(2, len(pages))):
                    self.canaries += page_windows(self.tap.read(gpa, 4096), self.rng)
        return None if self.inner is None else self.inner(frame, proxy)
