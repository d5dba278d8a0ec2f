"""agent policy: the canonical MigrationPolicy document and the forward/backward rules (table-driven, no crypto)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import Any

import pytest

from cvmotion.abi.snp import GuestPolicy, PolicyFlag, Product, TcbVersion
from cvmotion.agent.hello import Role
from cvmotion.agent.identity import expected_ma_measurement
from cvmotion.agent.policy import AgentConfig, GuestFacts, HostFacts, MigrationPolicy, evaluate
from cvmotion.agent.pool import PoolCredential
from cvmotion.attestation.policy import TcbMinimum
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.errors import UsageError

MA = expected_ma_measurement()
TCB = TcbVersion(boot_loader=10, snp=25, microcode=84)
MA_POLICY = GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.SMT)
AFTER = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)


def _pool(chip: bytes, name: str = "pool-a") -> PoolCredential:
    return PoolCredential(chip, name, 1, "ops", AFTER)


def _host(chip: bytes, **changes: Any) -> HostFacts:
    base = HostFacts(
        product=Product.GENOA,
        chip_id=chip,
        reported_tcb=TCB,
        platform=PlatformKind.EMULATED,
        firmware=(1, 55),
        ma_measurement=MA,
        ma_policy=MA_POLICY,
        ma_vmpl=0,
        policy_svn=5,
        pool=_pool(chip),
    )
    return dataclasses.replace(base, **changes)


SRC_CHIP, DST_CHIP = b"\x0a" * 64, b"\x0b" * 64
POLICY = MigrationPolicy(allowed_pools=("pool-a",), minimum_tcb=TcbMinimum(boot_loader=10, snp=25, microcode=84))
GUEST = GuestFacts(GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.MIGRATE_MA), b"\x01" * 48, POLICY.host_data())


def _config(**changes: Any) -> AgentConfig:
    return AgentConfig(trust=TrustStore.amd(), pool_credential=b"x", pool_cas=(object(),), **changes)  # type: ignore[arg-type]


def _forward(
    dst: dict[str, Any] | None = None,
    *,
    src: dict[str, Any] | None = None,
    guest: GuestFacts = GUEST,
    policy: MigrationPolicy = POLICY,
    bind: bool = True,
    **config: Any,
) -> tuple[str, ...]:
    if bind:  # the guest was launched with this policy's HOST_DATA
        guest = dataclasses.replace(guest, host_data=policy.host_data())
    outcome = evaluate(
        local=_host(SRC_CHIP, **(src or {})),
        peer=_host(DST_CHIP, **(dst or {})),
        local_role=Role.SOURCE,
        guest=guest,
        policy=policy,
        config=_config(**config),
    )
    return outcome.violations


def test_honest_facts_pass_every_rule() -> None:
    outcome = evaluate(
        local=_host(SRC_CHIP), peer=_host(DST_CHIP), local_role=Role.SOURCE, guest=GUEST, policy=POLICY,
        config=_config(),
    )  # fmt: skip
    assert outcome.violations == ()
    assert len(outcome.passed) >= 14


DEBUG_GUEST = dataclasses.replace(GUEST, policy=GuestPolicy(flags=GUEST.policy.flags | PolicyFlag.DEBUG))
NO_MIGRATE = dataclasses.replace(GUEST, policy=GuestPolicy(flags=PolicyFlag.RESERVED_MBO))
NEW_ABI = dataclasses.replace(GUEST, policy=GuestPolicy(abi_major=1, abi_minor=58, flags=GUEST.policy.flags))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"dst": {"product": Product.MILAN}}, "product family: source is Genoa", id="product-family"),
        pytest.param(
            {"policy": POLICY.model_copy(update={"product": Product.TURIN})}, "requires product Turin", id="product"
        ),
        pytest.param({"dst": {"platform": PlatformKind.AMD_SEV_SNP}}, "platform kind", id="platform-kind"),
        pytest.param(
            {"dst": {"ma_measurement": b"\x07" * 48}, "allowed_ma_measurements": frozenset({MA, b"\x07" * 48})},
            "not in the VM's allowed",
            id="ma-measurement-vm",
        ),
        pytest.param({"allowed_ma_measurements": frozenset({b"\x07" * 48})}, "this host's", id="ma-measurement-host"),
        pytest.param({"dst": {"ma_policy": GuestPolicy(flags=MA_POLICY.flags | PolicyFlag.DEBUG)}}, "debuggable",
                     id="ma-debug"),
        pytest.param({"dst": {"ma_vmpl": 2}}, "VMPL 2", id="ma-vmpl"),
        pytest.param({"dst": {"reported_tcb": TcbVersion(10, 0, 24, 84)}}, "snp=24 < 25", id="min-tcb"),
        pytest.param({"revoked_chip_ids": frozenset({DST_CHIP})}, "destination chip 0b0b", id="revoked-chip"),
        pytest.param({"revoked_tcbs": frozenset({(Product.GENOA, TCB)})}, "is revoked for Genoa", id="revoked-tcb"),
        pytest.param({"guest": NO_MIGRATE}, "MIGRATE_MA", id="no-migrate-ma"),
        pytest.param({"guest": DEBUG_GUEST}, "DEBUG set", id="debug-guest"),
        pytest.param({"guest": NEW_ABI}, "requires SNP ABI 1.58", id="abi"),
        pytest.param({"dst": {"pool": None, "pool_problem": "bad"}}, "pool credential: bad", id="no-credential"),
        pytest.param({"dst": {"pool": _pool(SRC_CHIP)}}, "the attested CHIP_ID", id="credential-other-chip"),
        pytest.param({"dst": {"pool": _pool(DST_CHIP, "pool-b")}}, "'pool-b', not one", id="pool"),
        pytest.param({"dst": {"policy_svn": 4}}, "rollback: destination 4 < source 5", id="svn-rollback"),
        pytest.param({"guest": dataclasses.replace(GUEST, host_data=bytes(32)), "bind": False}, "HOST_DATA",
                     id="host-data"),
    ],
)  # fmt: skip
def test_each_rule(kwargs: dict[str, Any], expected: str) -> None:
    violations = _forward(**kwargs)
    assert len(violations) == 1, violations
    assert expected in violations[0]


def test_debug_guest_allowed_by_policy() -> None:
    permissive = POLICY.model_copy(update={"allow_debug": True})
    assert _forward(guest=DEBUG_GUEST, policy=permissive) == ()


def test_every_violation_is_reported() -> None:
    violations = _forward(
        {"reported_tcb": TcbVersion(9, 0, 20, 80), "pool": _pool(DST_CHIP, "pool-z"), "policy_svn": 1},
        guest=DEBUG_GUEST,
        revoked_chip_ids=frozenset({DST_CHIP}),
    )
    text = "\n".join(violations)
    assert len(violations) == 5, violations
    for part in ("boot_loader=9 < 10", "snp=20 < 25", "microcode=80 < 84", "revoked", "DEBUG", "pool-z", "rollback"):
        assert part in text


def test_backward_direction_judges_the_source_and_the_own_pool() -> None:
    outcome = evaluate(
        local=_host(DST_CHIP, pool=_pool(DST_CHIP, "pool-b")),
        peer=_host(SRC_CHIP, ma_measurement=b"\x09" * 48),
        local_role=Role.DESTINATION,
        guest=GUEST,
        policy=POLICY,
        config=_config(revoked_chip_ids=frozenset({SRC_CHIP})),
    )
    text = "\n".join(outcome.violations)
    assert "source MA measurement" in text
    assert "source chip 0a0a" in text
    assert "this host's pool (pool-b)" in text
    assert len(outcome.violations) == 4  # VM allow-list, host allow-list, revoked, own pool


def test_document_is_canonical_and_bound_by_sha256() -> None:
    doc = POLICY.canonical()
    assert MigrationPolicy.from_canonical(doc) == POLICY
    assert POLICY.host_data() == hashlib.sha256(doc).digest()
    assert POLICY.allowed_ma_measurements == (MA,)
    assert b" " not in doc
    assert doc.startswith(b'{"allow_debug":false,')


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (POLICY.canonical().replace(b"false", b'"false"'), "canonical"),
        (POLICY.canonical().replace(b":", b": ", 1), "canonical"),
        (POLICY.canonical()[:-1] + b',"extra":1}', "extra"),
        (POLICY.canonical()[:-1] + b',"version":1}', "canonical"),
        (POLICY.canonical().replace(b'"version":1', b'"version":2'), "version"),
        (POLICY.canonical().replace(b'["pool-a"]', b"[]"), "allowed_pools"),
        (POLICY.canonical().replace(b'"pool-a"', b'"pool a"'), "pool name"),
        (POLICY.canonical().replace(MA.hex().encode(), MA.hex().upper().encode()), "hex"),
        (b"", "outside"),
        (b"[" * 20_000, "outside"),
        (b"not json", "document"),
    ],
    ids=[
        "coerced-bool", "whitespace", "unknown-field", "duplicate-key", "version", "no-pools", "bad-pool",
        "upper-hex", "empty", "oversized", "junk",
    ],
)  # fmt: skip
def test_non_canonical_or_invalid_documents_are_refused(doc: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        MigrationPolicy.from_canonical(doc)


def test_config_validation() -> None:
    with pytest.raises(UsageError, match="u32"):
        _config(policy_svn=-1)
    with pytest.raises(UsageError, match="64 bytes"):
        _config(revoked_chip_ids=frozenset({b"short"}))
    with pytest.raises(UsageError, match="pool CA"):
        AgentConfig(trust=TrustStore.amd(), pool_credential=b"x", pool_cas=())
    with pytest.raises(UsageError, match="timezone"):
        _config(clock=lambda: dt.datetime(2030, 1, 1)).now()
