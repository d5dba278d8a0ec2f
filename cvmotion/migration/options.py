"""migration layer: the knobs of one migration (``MigrationOptions``) with QEMU-like defaults — their one schema.

``OPTIONS`` describes every knob once: its engine name (the host-to-host JSON key), its type, default and bounds,
its name in the host API (``POST /v1/vms/{name}/migrate``) and its ``cvmotion migrate`` flag.  The dataclass
checks itself against it, the host API's request model (``host.api_schema.MigrateRequest``) and the CLI flags
(``cli.migrate``) are built from it, and every surface refuses a key it does not name (never drops it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from cvmotion.abi.wire import MAX_PAGES_PER_BUNDLE
from cvmotion.errors import UsageError

__all__ = ["MAX_TIMEOUT", "OPTIONS", "MigrationOptions", "OptionSpec"]

MAX_TIMEOUT = 3600.0  # seconds: no wait of a migration may be longer than an hour


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One migration option as every surface shows it."""

    name: str  # ``MigrationOptions`` attribute; the key in the host-to-host request
    kind: type  # int, float or bool
    default: float | bool
    minimum: float = 0
    maximum: float = 0
    help: str = ""
    api: str = ""  # the host API's key (default: ``name``)
    flag: str = ""  # the ``cvmotion migrate`` flag (default: ``--`` + ``api`` with dashes)
    follows: str = ""  # an API request that omits this option takes the value of that one (its ``name``)
    above: bool = False  # the minimum itself is excluded (the value must be greater)

    @property
    def api_name(self) -> str:
        return self.api or self.name

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.api_name.replace("_", "-")

    def check_type(self, value: object) -> None:
        """``UsageError`` unless ``value`` is of this option's JSON type (a bool is not a number here)."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = type(value) is int
        else:
            ok = type(value) in (int, float)
        if not ok:
            raise UsageError(f"migration option {self.api_name}: expected {self.kind.__name__}, got {value!r}")

    def check_range(self, value: float | bool) -> None:
        if self.kind is bool:
            return
        low_ok = float(value) > self.minimum if self.above else float(value) >= self.minimum
        if not (low_ok and float(value) <= self.maximum):
            raise UsageError(f"{self.name.replace('_', ' ')} {value}: use {self.bounds()}")

    def bounds(self) -> str:
        """The allowed range, as messages and the CLI's help show it."""
        if self.above:
            return f"more than {self.minimum:g}, at most {self.maximum:g}"
        return f"{self.minimum:g}..{self.maximum:g}"

    def json_schema(self) -> dict[str, Any]:
        """This option as a JSON Schema property (the host API's OpenAPI document)."""
        out: dict[str, Any] = {"description": self.help, "default": self.default}
        if self.kind is bool:
            out["type"] = "boolean"
        else:
            out.update(type="integer" if self.kind is int else "number", maximum=self.maximum)
            out["exclusiveMinimum" if self.above else "minimum"] = self.minimum
        return out


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "downtime_limit_ms", float, 300.0, 0, 60_000,
        "the longest pause the switchover may cost, in ms (QEMU's downtime-limit)", flag="--downtime-limit",
        above=True,
    ),
    OptionSpec(
        "switchover_cost_ms", float, 40.0, 0, 10_000,
        "the stop-and-copy's fixed part, in ms, added to the final pages' expected time (0: QEMU's rule)",
        flag="--switchover-cost",
    ),
    OptionSpec("streams", int, 2, 1, 16, "parallel TCP streams"),
    OptionSpec(
        "max_rounds", int, 30, 1, 1000,
        "pre-copy rounds; then the migration switches over only within the downtime limit, else it fails",
    ),
    OptionSpec("pages_per_bundle", int, MAX_PAGES_PER_BUNDLE, 1, MAX_PAGES_PER_BUNDLE, "pages sealed per bundle"),
    OptionSpec("batch_bundles", int, 4, 1, 16, "bundles per round trip to the platform process"),
    OptionSpec("auto_converge", bool, True, help="throttle the vCPUs when pre-copy does not converge"),
    OptionSpec(
        "force_switchover", bool, False,
        help="after max_rounds, switch over even past the downtime limit (off: fail, the VM runs on at the source)",
    ),
    OptionSpec("throttle_initial", int, 20, 0, 99, "auto-converge: the first throttle, in percent"),
    OptionSpec("throttle_increment", int, 10, 1, 99, "auto-converge: added each round that does not converge"),
    OptionSpec("throttle_max", int, 99, 0, 99, "auto-converge: the highest throttle, in percent"),
    OptionSpec(
        "setup_timeout", float, 30.0, 0.1, MAX_TIMEOUT,
        "seconds the migration agents may take to establish their session (default: the I/O timeout)",
        api="setup_timeout_s", flag="--setup-timeout", follows="io_timeout",
    ),
    OptionSpec(
        "io_timeout", float, 30.0, 0.1, MAX_TIMEOUT, "seconds either side waits on a silent peer",
        api="io_timeout_s", flag="--io-timeout",
    ),
    OptionSpec(
        "commit_timeout", float, 60.0, 0.1, MAX_TIMEOUT,
        "seconds the source waits for the destination's verdict after the start token",
        api="commit_timeout_s", flag="--commit-timeout",
    ),
)  # fmt: skip

_BY_NAME = {spec.name: spec for spec in OPTIONS}
_BY_API = {spec.api_name: spec for spec in OPTIONS}


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """How to migrate (``OPTIONS`` says what each knob means and bounds it)."""

    downtime_limit_ms: float = 300.0
    switchover_cost_ms: float = 40.0
    streams: int = 2
    max_rounds: int = 30
    pages_per_bundle: int = MAX_PAGES_PER_BUNDLE
    batch_bundles: int = 4
    auto_converge: bool = True
    force_switchover: bool = False
    throttle_initial: int = 20
    throttle_increment: int = 10
    throttle_max: int = 99
    setup_timeout: float = 30.0
    io_timeout: float = 30.0
    commit_timeout: float = 60.0

    def __post_init__(self) -> None:
        for spec in OPTIONS:
            spec.check_range(getattr(self, spec.name))
        if self.throttle_initial > self.throttle_max:
            raise UsageError("throttle percentages must satisfy 0 <= initial <= max <= 99, increment 1..99")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> MigrationOptions:
        """The options from their JSON form (``to_json``, what a source host sends); unknown keys and wrong types
        are refused, not dropped.

        Raises:
            UsageError: not an object, an unknown key, a value of the wrong type, or one out of range.
        """
        return cls(**_parse(data, _BY_NAME))

    @classmethod
    def from_api(cls, data: object) -> MigrationOptions:
        """The options of a host API request (``OptionSpec.api_name`` keys; an option that ``follows`` another
        takes its value when omitted), checked as ``from_json`` checks.

        Raises:
            UsageError: as ``from_json``.
        """
        values = _parse(data, _BY_API)
        for spec in OPTIONS:
            if spec.follows and spec.name not in values and spec.follows in values:
                values[spec.name] = values[spec.follows]
        return cls(**values)


def _parse(data: object, table: dict[str, OptionSpec]) -> dict[str, Any]:
    """``data``'s options by their ``MigrationOptions`` names, each key known to ``table`` and of its type."""
    if not isinstance(data, dict):
        raise UsageError("migration options must be a JSON object")
    unknown = sorted(set(map(str, data)) - set(table))
    if unknown:
        raise UsageError(f"unknown migration option(s): {', '.join(unknown)}")
    values = {}
    for key, value in data.items():
        spec = table[key]
        spec.check_type(value)
        values[spec.name] = value
    return values


def _check_the_table() -> None:
    """``OPTIONS`` names every field of ``MigrationOptions`` once, with the same default (import-time check)."""
    fields = {f.name: f.default for f in dataclasses.fields(MigrationOptions)}
    if fields != {spec.name: spec.default for spec in OPTIONS}:
        raise RuntimeError("migration.options: OPTIONS and MigrationOptions disagree")


_check_the_table()
