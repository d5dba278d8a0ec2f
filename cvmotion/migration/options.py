"""migration layer: the knobs of one migration (``MigrationOptions``) with QEMU-like defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cvmotion.abi.wire import MAX_PAGES_PER_BUNDLE
from cvmotion.errors import UsageError

__all__ = ["MAX_TIMEOUT", "MigrationOptions"]

MAX_TIMEOUT = 3600.0  # seconds: no wait of a migration may be longer than an hour


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """How to migrate. ``downtime_limit_ms`` defaults to 300 ms like QEMU's ``downtime-limit``."""

    downtime_limit_ms: float = 300.0
    # The stop-and-copy's fixed part (pause, final harvest, state and start token, destination activation and
    # resume): added to the final pages' expected time, so the limit bounds the whole downtime.  40-50 ms on
    # the reference machine (README, Performance); 0 gives QEMU's rule (final pages only).
    switchover_cost_ms: float = 40.0
    streams: int = 2
    max_rounds: int = 30
    pages_per_bundle: int = MAX_PAGES_PER_BUNDLE
    batch_bundles: int = 4  # bundles per round trip to the platform process (each stream rings 2 batches)
    auto_converge: bool = True
    throttle_initial: int = 20
    throttle_increment: int = 10
    throttle_max: int = 99
    setup_timeout: float = 30.0
    io_timeout: float = 30.0
    commit_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= 16:
            raise UsageError(f"--streams {self.streams}: use 1..16 TCP streams")
        if not 0 < self.downtime_limit_ms <= 60_000:
            raise UsageError(f"--downtime-limit {self.downtime_limit_ms} ms: use 1..60000")
        if not 1 <= self.pages_per_bundle <= MAX_PAGES_PER_BUNDLE:
            raise UsageError(f"pages per bundle must be 1..{MAX_PAGES_PER_BUNDLE}")
        if not 0 <= self.switchover_cost_ms <= 10_000:
            raise UsageError(f"switchover cost {self.switchover_cost_ms} ms: use 0..10000")
        if not 1 <= self.batch_bundles <= 16:
            raise UsageError(f"bundles per batch must be 1..16, not {self.batch_bundles}")
        if not 1 <= self.max_rounds <= 1000:
            raise UsageError("max rounds must be 1..1000")
        if not 0 <= self.throttle_initial <= self.throttle_max <= 99 or not 1 <= self.throttle_increment <= 99:
            raise UsageError("throttle percentages must satisfy 0 <= initial <= max <= 99, increment 1..99")
        for name in ("setup_timeout", "io_timeout", "commit_timeout"):
            if not 0.1 <= getattr(self, name) <= MAX_TIMEOUT:
                raise UsageError(f"{name.replace('_', ' ')} {getattr(self, name)} s: use 0.1..{MAX_TIMEOUT:.0f}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> MigrationOptions:
        """The options from their JSON form (``to_json``); unknown keys and wrong types are refused, not dropped.

        Raises:
            UsageError: not an object, an unknown key, a value of the wrong type, or one out of range.
        """
        if not isinstance(data, dict):
            raise UsageError("migration options must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown migration option(s): {', '.join(map(str, unknown))}")
        for key, value in data.items():
            kind = type(getattr(_DEFAULTS, key))
            ok = isinstance(value, bool) if kind is bool else type(value) in ((int,) if kind is int else (int, float))
            if not ok:
                raise UsageError(f"migration option {key}: expected {kind.__name__}, got {value!r}")
        return cls(**data)


_DEFAULTS = MigrationOptions()
