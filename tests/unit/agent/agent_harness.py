"""Test harness for the migration agent: hosts (emulated SP + MA + config), a migratable guest, and a relay.

The relay is the untrusted hosts' connection: tests pass a ``tamper`` hook that sees every frame and returns
what to deliver instead (nothing, a modified frame, several frames...).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization

from cvmotion.abi.snp import GuestPolicy, PolicyFlag, Product
from cvmotion.agent.destination import DestinationSession
from cvmotion.agent.hello import IMPLEMENTED_VERSIONS, VersionRange
from cvmotion.agent.identity import MigrationAgentIdentity
from cvmotion.agent.policy import AgentConfig, MigrationPolicy
from cvmotion.agent.pool import PoolAuthority, issue_pool_credential
from cvmotion.agent.session import SessionBase, SessionState
from cvmotion.agent.source import SourceSession
from cvmotion.attestation.policy import TcbMinimum
from cvmotion.attestation.trust import TrustStore
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.keys import SeededRandom
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor

MIGRATABLE = GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA)
_seeds = iter(range(5_000_000, 6_000_000))


class FakeClock:
    """A frozen, injectable clock (advance it by hand)."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


class CapturingMigration:
    """Wraps an SP's migration commands and records every key the MA is handed (to scan outputs for them)."""

    def __init__(self, inner: Any, keys: list[bytes]) -> None:
        self._inner = inner
        self._keys = keys

    def ma_export_prepare(self, handle: GuestHandle, session_id: bytes) -> bytes:
        k_f: bytes = self._inner.ma_export_prepare(handle, session_id)
        self._keys.append(k_f)
        return k_f

    def ma_import_generate_backward_key(self, ref: int) -> bytes:
        k_b: bytes = self._inner.ma_import_generate_backward_key(ref)
        self._keys.append(k_b)
        return k_b

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CapturingSp(SecureProcessor):
    """A real SecureProcessor whose ``migration`` records the session keys the MA receives."""

    captured: list[bytes]

    @property
    def migration(self) -> Any:
        return CapturingMigration(super().migration, self.captured)


@dataclass
class Host:
    sp: SecureProcessor
    identity: MigrationAgentIdentity
    config: AgentConfig
    pool: str

    @property
    def chip_id(self) -> bytes:
        return self.sp.get_id()


def trust_for(*vendors: tuple[Vendor, Product]) -> TrustStore:
    store = TrustStore.amd()
    for vendor, product in vendors:
        store = store.with_anchor(vendor.roots(product).ark.cert)
    return store


def make_host(
    vendor: Vendor,
    data_dir: Path,
    pool_ca: PoolAuthority,
    clock: FakeClock,
    *,
    product: Product = Product.GENOA,
    pool: str = "pool-a",
    trust: TrustStore | None = None,
    image: bytes | None = None,
    versions: VersionRange = IMPLEMENTED_VERSIONS,
    capture: list[bytes] | None = None,
    **config: Any,
) -> Host:
    chip = Chip.create(data_dir, vendor, product, next(_seeds))
    if capture is not None:
        sp: SecureProcessor = CapturingSp(chip, endorsements=Kds(vendor), rng=SeededRandom(chip.chip_id, "sp"))
        sp.captured = capture  # type: ignore[attr-defined]
    else:
        sp = SecureProcessor(chip, endorsements=Kds(vendor), rng=SeededRandom(chip.chip_id, "sp"))
    identity = MigrationAgentIdentity.launch(sp, image=image)
    credential = issue_pool_credential(pool_ca, chip.chip_id, pool, now=clock())
    agent_config = AgentConfig(
        trust=trust if trust is not None else trust_for((vendor, product)),
        pool_credential=credential.public_bytes(serialization.Encoding.DER),
        pool_cas=(pool_ca.cert,),
        versions=versions,
        clock=clock,
        **config,
    )
    return Host(sp, identity, agent_config, pool)


def reconfigure(host: Host, **changes: Any) -> Host:
    return replace(host, config=replace(host.config, **changes))


def default_policy(**fields: Any) -> MigrationPolicy:
    fields.setdefault("allowed_pools", ("pool-a",))
    fields.setdefault("minimum_tcb", TcbMinimum(boot_loader=10, snp=25, microcode=84))
    return MigrationPolicy(**fields)


def launch_vm(sp: SecureProcessor, policy: MigrationPolicy, *, guest_policy: GuestPolicy = MIGRATABLE) -> GuestHandle:
    """A small migratable guest whose HOST_DATA binds ``policy``."""
    handle = sp.launch_start(guest_policy)
    sp.launch_update(handle, 0x100000, PageType.NORMAL, b"agent test guest".ljust(PAGE_SIZE, b"\0"))
    sp.launch_update(handle, 0x1000, PageType.SECRETS, bytearray(PAGE_SIZE))
    sp.launch_finish(handle, host_data=policy.host_data())
    sp.activate(handle)
    return handle


class NullHardware:
    """The least GuestHardware the firmware needs to export/import one immutable-state bundle (no memory)."""

    gfn_limit = 16

    class _Memory:
        def view(self, gpa: int, length: int) -> memoryview:
            return memoryview(bytearray(length))

        def populated_ranges(self, skip: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
            return []

    memory = _Memory()

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def capture_state(self) -> tuple[bytes, bytes]:
        return b"", b""

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return b"", b"", np.zeros(0, dtype=np.uint64)

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return b"", b"", np.zeros(0, dtype=np.uint64)

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        pass


Tamper = Callable[[str, int, bytes], list[bytes]]


@dataclass
class Pair:
    """One source and one destination session over a relay that records (and may tamper with) every frame."""

    src_host: Host
    dst_host: Host
    policy: MigrationPolicy
    guest_policy: GuestPolicy = MIGRATABLE
    policy_doc: bytes | None = None
    session_id: bytes = field(default_factory=lambda: random.Random(11).randbytes(16))
    handle: GuestHandle = field(init=False)
    ref: int = field(init=False)
    source: SourceSession = field(init=False)
    destination: DestinationSession = field(init=False)
    relayed: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handle = launch_vm(self.src_host.sp, self.policy, guest_policy=self.guest_policy)
        self.ref = self.dst_host.sp.migration.import_prepare(self.session_id, NullHardware())
        doc = self.policy.canonical() if self.policy_doc is None else self.policy_doc
        self.source = SourceSession(
            self.src_host.identity, self.handle, doc, self.src_host.config, session_id=self.session_id
        )
        self.destination = DestinationSession(
            self.dst_host.identity, self.ref, self.dst_host.config, session_id=self.session_id
        )

    def run(self, tamper: Tamper | None = None, *, max_frames: int = 64) -> None:
        """Start the source and relay until nothing is in flight (or a side may not take more)."""
        queue: list[tuple[str, bytes]] = [("s2d", f) for f in self.source.start()]
        count = 0
        while queue and count < max_frames:
            direction, frame = queue.pop(0)
            self.relayed.append((direction, frame))
            delivered = tamper(direction, count, frame) if tamper else [frame]
            count += 1
            target: SessionBase = self.destination if direction == "s2d" else self.source
            back = "d2s" if direction == "s2d" else "s2d"
            for item in delivered:
                if target.state in (SessionState.ESTABLISHED, SessionState.FAILED):
                    break
                queue.extend((back, out) for out in target.receive(item))

    def both(self) -> tuple[SessionState, SessionState]:
        return self.source.state, self.destination.state
