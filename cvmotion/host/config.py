"""host layer: what the operator tells one host daemon (``cvmotion host serve``) and the defaults it applies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvmotion.abi.snp import PolicyFlag

__all__ = ["DEFAULT_GUEST_POLICY", "SPAWN_TIMEOUT", "HostConfig"]

# SNP guest policy (SNP ABI, GUEST_POLICY): bit 17 must be one, SMT allowed, migration through a migration agent.
DEFAULT_GUEST_POLICY = int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA)
SPAWN_TIMEOUT = 60.0  # seconds a platform or VM process may take to come up


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    migration_port: int = 0
    pool: str = "default"
    product: str = "Genoa"
    vendor_dir: Path | None = None
    kds_url: str | None = None
    attestation_url: str | None = None
    pool_ca_dir: Path | None = None
    migration_advertise: str | None = None  # HOST:PORT sources should dial (a proxy, NAT) instead of the listener
    key_release_url: str | None = None
    standby: bool = True  # keep one warm VM process for the next VM (launch or incoming migration)
    max_guest_memory: int | None = None  # bytes all VMs here may have together (None: no limit)
