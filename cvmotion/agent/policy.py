"""agent layer: migration policy — the VM's ``MigrationPolicy``, the host's ``AgentConfig`` and the rules.

**Per VM** (``MigrationPolicy``): a JSON document in canonical form (keys sorted, no whitespace, ASCII, every
field present — ``MigrationPolicy.canonical()``), bound to the guest at launch by
``HOST_DATA = SHA-256(document)``.  The source MA refuses to start unless ``SHA-256(doc)`` equals the guest's
HOST_DATA as its secure processor reports it, and ``from_canonical`` refuses any document that is not
byte-identical to its canonical re-encoding (so there is one document per policy; a coerced ``"true"``, a
duplicate key or an unknown field is an error).  Example::

    {"allow_debug":false,"allowed_ma_measurements":["<96 hex digits>"],"allowed_pools":["pool-a"],
     "minimum_tcb":{"boot_loader":10,"fmc":0,"microcode":84,"snp":25,"tee":0},"product":"Genoa","version":1}

**Per host** (``AgentConfig``): trust anchors, this host's pool credential, the pool CAs it trusts,
revocations, ``policy_svn``, protocol versions, allowed MA measurements and an injectable clock.

**Rules** (DESIGN section 6), evaluated by the source on the destination (forward) and by the destination on
the source (backward) over the same facts — local ones from the MA's own secure processor, the peer's from
its verified RA-TLS evidence and pool credential.  ``evaluate`` returns every violation, never just the
first; a violation aborts the session and nothing falls back to a weaker mode.

1. same product family (and the VM's ``product``, if set); the same platform kind (emulated/amd-sev-snp)
2. the peer MA's MEASUREMENT is allowed by the VM's policy and by this host's configuration; the peer MA
   itself is not debuggable, not migratable and runs at VMPL 0
3. destination REPORTED_TCB >= the VM's ``minimum_tcb``; the peer's chip and reported TCB are not revoked
4. guest policy: MIGRATE_MA set; DEBUG clear unless ``allow_debug``; its ABI minimum <= destination firmware
5. the peer's pool credential chains to a trusted pool CA, names the attested CHIP_ID and one of the VM's
   ``allowed_pools``; the destination also checks its own pool
6. ``destination.policy_svn >= source.policy_svn``; SHA-256(policy document) = the guest's HOST_DATA
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from cryptography import x509
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError

from cvmotion.abi.snp import GuestPolicy, Product, TcbVersion
from cvmotion.agent.hello import IMPLEMENTED_VERSIONS, Role, VersionRange
from cvmotion.agent.identity import expected_ma_measurement
from cvmotion.agent.pool import POOL_NAME_PATTERN, PoolCredential
from cvmotion.attestation.policy import TcbMinimum
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.attestation.verify import VerifyOptions
from cvmotion.errors import AbiError, UsageError
from cvmotion.ipc.validation import describe_problems

__all__ = [
    "MAX_POLICY_DOC",
    "AgentConfig",
    "GuestFacts",
    "HostFacts",
    "MigrationPolicy",
    "PolicyOutcome",
    "evaluate",
]

MAX_POLICY_DOC = 16 * 1024


def _hex48(value: object) -> bytes:
    if isinstance(value, bytes) and len(value) == 48:
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{96}", value):
        raise ValueError("expected 96 lower-case hex digits (a 48-byte measurement)")
    return bytes.fromhex(value)


def _product(value: object) -> object:
    if isinstance(value, str):
        try:
            return Product.from_name(value)
        except AbiError as exc:
            raise ValueError(str(exc)) from None
    return value


def _pool(value: object) -> object:
    if isinstance(value, str) and not POOL_NAME_PATTERN.fullmatch(value):
        raise ValueError("a pool name is 1..64 of [A-Za-z0-9._-], starting with a letter or digit")
    return value


Measurement = Annotated[bytes, BeforeValidator(_hex48), PlainSerializer(lambda b: b.hex(), return_type=str)]
ProductName = Annotated[Product, BeforeValidator(_product), PlainSerializer(lambda p: p.value, return_type=str)]
PoolName = Annotated[str, BeforeValidator(_pool)]


class MigrationPolicy(BaseModel):
    """A VM's migration policy; build it in code and bind ``host_data()`` at launch, parse with ``from_canonical``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    allowed_pools: tuple[PoolName, ...] = Field(min_length=1, max_length=64)
    minimum_tcb: TcbMinimum | None = None
    allowed_ma_measurements: tuple[Measurement, ...] = Field(
        default_factory=lambda: (expected_ma_measurement(),), min_length=1, max_length=64
    )
    allow_debug: bool = False
    product: ProductName | None = None

    def canonical(self) -> bytes:
        """The canonical JSON encoding: what HOST_DATA hashes and what travels to the destination."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")

    def host_data(self) -> bytes:
        """SHA-256 of the canonical document: the 32-byte HOST_DATA to launch the VM with."""
        return hashlib.sha256(self.canonical()).digest()

    @classmethod
    def from_canonical(cls, doc: bytes) -> MigrationPolicy:
        """Parse a document that must already be canonical (``UsageError`` naming the problem otherwise)."""
        if not 0 < len(doc) <= MAX_POLICY_DOC:
            raise UsageError(f"migration policy document of {len(doc)} bytes is outside 1..{MAX_POLICY_DOC}")
        try:
            policy = cls.model_validate_json(doc)
        except ValidationError as exc:
            problems = describe_problems(exc.errors(), root="document")
            raise UsageError(f"migration policy document: {problems}") from None
        if policy.canonical() != doc:
            raise UsageError("migration policy document is not in canonical form (use MigrationPolicy.canonical())")
        return policy


@dataclass(frozen=True, slots=True)
class GuestFacts:
    """What the source's secure processor says about the VM being moved (public facts, no secrets)."""

    policy: GuestPolicy
    measurement: bytes
    host_data: bytes


@dataclass(frozen=True, slots=True)
class HostFacts:
    """One end of a migration as policy sees it (local: from the own SP; peer: from verified evidence)."""

    product: Product
    chip_id: bytes
    reported_tcb: TcbVersion
    platform: PlatformKind
    firmware: tuple[int, int]  # SNP API major.minor (report CURRENT_MAJOR/MINOR)
    ma_measurement: bytes
    ma_policy: GuestPolicy
    ma_vmpl: int
    policy_svn: int
    pool: PoolCredential | None
    pool_problem: str = ""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """One host's MA configuration."""

    trust: TrustStore
    pool_credential: bytes
    pool_cas: tuple[x509.Certificate, ...]
    policy_svn: int = 0
    versions: VersionRange = IMPLEMENTED_VERSIONS
    revoked_chip_ids: frozenset[bytes] = frozenset()
    revoked_tcbs: frozenset[tuple[Product, TcbVersion]] = frozenset()
    allowed_ma_measurements: frozenset[bytes] = field(default_factory=lambda: frozenset({expected_ma_measurement()}))
    clock: Callable[[], dt.datetime] = _utc_now
    verify_options: VerifyOptions = field(default_factory=VerifyOptions)

    def __post_init__(self) -> None:
        if not 0 <= self.policy_svn <= 0xFFFFFFFF:
            raise UsageError(f"policy_svn {self.policy_svn} is not a u32")
        if not self.pool_cas:
            raise UsageError("AgentConfig needs at least one trusted pool CA")
        if not self.pool_credential:
            raise UsageError("AgentConfig needs this host's pool credential")
        if any(len(c) != 64 for c in self.revoked_chip_ids):
            raise UsageError("revoked chip ids are 64 bytes (CHIP_ID)")
        if not self.allowed_ma_measurements or any(len(m) != 48 for m in self.allowed_ma_measurements):
            raise UsageError("allowed MA measurements are 48-byte launch digests (at least one)")
        self.versions.check_configurable()

    def now(self) -> dt.datetime:
        at = self.clock()
        if at.tzinfo is None:
            raise UsageError("AgentConfig.clock must return timezone-aware datetimes")
        return at


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    passed: tuple[str, ...]
    violations: tuple[str, ...]


class _Collector:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.violations: list[str] = []

    def rule(self, ok: bool, passed: str, violated: str) -> None:
        (self.passed if ok else self.violations).append(passed if ok else violated)


def _short(chip_id: bytes) -> str:
    return chip_id[:8].hex()


def evaluate(
    *,
    local: HostFacts,
    peer: HostFacts,
    local_role: Role,
    guest: GuestFacts,
    policy: MigrationPolicy,
    config: AgentConfig,
) -> PolicyOutcome:
    """Apply every rule (module docstring) and return what passed and every violation."""
    src, dst = (local, peer) if local_role is Role.SOURCE else (peer, local)
    who = local_role.peer.name.lower()  # "source" or "destination": the peer
    c = _Collector()
    sv, dv = src.product.value, dst.product.value
    c.rule(src.product is dst.product, f"product family {sv}", f"product family: source is {sv}, destination {dv}")
    if policy.product is not None:
        want = policy.product.value
        ok = src.product is policy.product and dst.product is policy.product
        c.rule(ok, f"product is the VM's {want}", f"the VM requires product {want}; source is {sv}, destination {dv}")
    c.rule(
        src.platform is dst.platform,
        f"platform kind {src.platform.value}",
        f"platform kind: source is {src.platform.value}, destination {dst.platform.value}",
    )
    m = peer.ma_measurement.hex()
    c.rule(
        peer.ma_measurement in policy.allowed_ma_measurements,
        f"{who} MA measurement allowed by the VM",
        f"{who} MA measurement {m} is not in the VM's allowed_ma_measurements",
    )
    c.rule(
        peer.ma_measurement in config.allowed_ma_measurements,
        f"{who} MA measurement allowed by this host",
        f"{who} MA measurement {m} is not allowed by this host's configuration",
    )
    ma_ok = not peer.ma_policy.debug and not peer.ma_policy.migrate_ma and peer.ma_vmpl == 0
    c.rule(
        ma_ok,
        f"{who} MA is not debuggable, not migratable, VMPL 0",
        f"{who} MA runs with guest policy {peer.ma_policy.to_u64():#x} at VMPL {peer.ma_vmpl} "
        "(an MA must not be debuggable or migratable and must run at VMPL 0)",
    )
    if policy.minimum_tcb is not None:
        short = policy.minimum_tcb.shortfalls(dst.reported_tcb, dst.product)
        c.rule(
            not short,
            "destination REPORTED_TCB meets the VM's minimum_tcb",
            f"destination REPORTED_TCB is below the VM's minimum_tcb: {', '.join(short)}",
        )
    c.rule(
        peer.chip_id not in config.revoked_chip_ids,
        f"{who} chip not revoked",
        f"{who} chip {_short(peer.chip_id)}… is revoked",
    )
    c.rule(
        (peer.product, peer.reported_tcb) not in config.revoked_tcbs,
        f"{who} TCB not revoked",
        f"{who} REPORTED_TCB {peer.reported_tcb.describe()} is revoked for {peer.product.value}",
    )
    gp = guest.policy
    c.rule(
        gp.migrate_ma,
        "guest policy MIGRATE_MA",
        f"guest policy {gp.to_u64():#x} does not allow migration (MIGRATE_MA)",
    )
    c.rule(
        not gp.debug or policy.allow_debug,
        "guest DEBUG off or allowed",
        f"guest policy {gp.to_u64():#x} has DEBUG set but the VM's policy does not allow debug guests",
    )
    c.rule(
        (gp.abi_major, gp.abi_minor) <= dst.firmware,
        "destination firmware meets the guest's ABI minimum",
        f"guest requires SNP ABI {gp.abi_major}.{gp.abi_minor}; destination firmware is "
        f"{dst.firmware[0]}.{dst.firmware[1]}",
    )
    _pool_rules(c, peer, who, policy)
    if local_role is Role.DESTINATION:
        own = local.pool
        c.rule(
            own is not None and own.pool in policy.allowed_pools,
            "this host's pool is allowed",
            f"this host's pool ({own.pool if own else local.pool_problem}) is not in the VM's allowed_pools",
        )
    c.rule(
        dst.policy_svn >= src.policy_svn,
        f"policy_svn {dst.policy_svn} >= {src.policy_svn}",
        f"policy_svn rollback: destination {dst.policy_svn} < source {src.policy_svn}",
    )
    c.rule(
        hashlib.sha256(policy.canonical()).digest() == guest.host_data,
        "policy document bound to the guest's HOST_DATA",
        "SHA-256 of the migration policy document does not match the guest's HOST_DATA",
    )
    return PolicyOutcome(tuple(c.passed), tuple(c.violations))


def _pool_rules(c: _Collector, peer: HostFacts, who: str, policy: MigrationPolicy) -> None:
    cred = peer.pool
    if cred is None:
        c.violations.append(f"{who} pool credential: {peer.pool_problem}")
        return
    c.rule(
        cred.chip_id == peer.chip_id,
        f"{who} pool credential names the attested chip",
        f"{who} pool credential is for chip {_short(cred.chip_id)}…, the attested CHIP_ID is {_short(peer.chip_id)}…",
    )
    allowed = ", ".join(policy.allowed_pools)
    c.rule(
        cred.pool in policy.allowed_pools,
        f"{who} pool {cred.pool} allowed",
        f"{who} is in pool {cred.pool!r}, not one of the VM's allowed_pools ({allowed})",
    )
