"""host layer: what the rooms of the daemon share — its configuration, VM store, events, platform and migrations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cvmotion.host.config import HostConfig
from cvmotion.host.events import EventBus
from cvmotion.host.store import VmStore
from cvmotion.migration.stats import MigrationStats
from cvmotion.platformd.client import PlatformClient

__all__ = ["HostContext"]


@dataclass(frozen=True, slots=True)
class HostContext:
    config: HostConfig
    store: VmStore
    events: EventBus
    platform: Callable[[], PlatformClient]  # the platform process's client (reconnected when its connection closed)
    migrations: dict[str, MigrationStats]  # every migration of this host, in and out, by id
