"""testing: building blocks for ``MigrationProxy`` tamper policies — what a hostile network or host does.

A policy is ``tamper(frame, proxy) -> list of emits | None`` (None: pass the frame on unchanged).  Here:

- predicates on frames: ``bundle(type, stream=, epoch=, pages=)``, ``control(type)``, ``ma(direction,
  ma_type)`` (the migration agents' frames on the control connection);
- ``On(predicate, action, nth=)``: apply ``action`` to the ``nth`` frame matching (once); actions: ``drop``,
  ``duplicate``, ``cut``, ``truncate(keep)``, ``freeze``, ``flip(region, rng)``, ``rewrite(fn)``,
  ``inject_before(frames)``;
- stateful policies: ``Reorder`` (hold a frame, send it after the next one), ``MoveToStream`` (send a
  stream's frame on another stream connection, after that stream's next frame), ``ReplayLater`` (copy a
  frame, inject the copy before a later one), ``Chain``;
- payload surgery: ``flip_bit`` within a bundle region (header, metadata, MAC, page, tag), MA HELLO
  rewriting (``rewrite_ma_hello``) and RA-TLS key substitution with a copied report (``substitute_ratls_key``).

Randomness comes from a ``random.Random`` the test seeds; nothing here sleeps.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cvmotion.abi import wire
from cvmotion.abi.wire import BundleType
from cvmotion.agent.hello import Hello
from cvmotion.agent.wire import FrameType, decode_frame, encode_frame
from cvmotion.errors import UsageError
from cvmotion.migration.channel import FrameKind
from cvmotion.testing.adversary import ConnKey, Cut, Direction, Emit, Frame, MigrationProxy, Raw, Tamper

__all__ = [
    "Chain",
    "MoveToStream",
    "On",
    "Reorder",
    "ReplayLater",
    "bundle",
    "control",
    "cut",
    "drop",
    "duplicate",
    "flip",
    "flip_bit",
    "freeze",
    "inject_before",
    "ma",
    "ma_hello",
    "rewrite",
    "rewrite_control",
    "rewrite_ma_hello",
    "substitute_ratls_key",
    "truncate",
]

Predicate = Callable[[Frame], bool]
Action = Callable[[Frame, MigrationProxy], Sequence[Emit]]

# -- predicates ------------------------------------------------------------------------------------------


def bundle(
    kind: BundleType | None = None, *, stream: int | None = None, epoch: int | None = None, pages: int = 0
) -> Predicate:
    """A sealed bundle (to the destination) of ``kind``, on ``stream``, in ``epoch``, with >= ``pages`` data pages."""

    def match(f: Frame) -> bool:
        h = f.bundle()
        if h is None or f.direction is not Direction.FORWARD:
            return False
        if (kind is not None and h.type is not kind) or (stream is not None and h.stream != stream):
            return False
        if epoch is not None and h.epoch != epoch:
            return False
        return pages == 0 or data_pages(f) >= pages

    return match


def control(kind: str, direction: Direction = Direction.BACKWARD) -> Predicate:
    """A JSON control message ``{"type": kind}`` (default: the destination's verdicts)."""

    def match(f: Frame) -> bool:
        message = f.control()
        return (
            f.is_kind(FrameKind.CONTROL)
            and f.direction is direction
            and message is not None
            and (message.get("type") == kind)
        )

    return match


def ma(direction: Direction | None = None, ma_type: FrameType | None = None) -> Predicate:
    """A migration agents' frame relayed on the control connection (HELLO, TLS records, ERROR)."""

    def match(f: Frame) -> bool:
        if not f.is_kind(FrameKind.MA) or (direction is not None and f.direction is not direction):
            return False
        return ma_type is None or (len(f.payload) > 5 and f.payload[5] == int(ma_type))

    return match


def data_pages(f: Frame) -> int:
    """Non-zero pages (payload units) of a MEMORY bundle frame."""
    h = f.bundle()
    if h is None or h.type is not BundleType.MEMORY:
        return 0
    return (len(f.payload) - h.size) // (wire.PAGE_SIZE + wire.TAG_SIZE)


# -- actions ---------------------------------------------------------------------------------------------


def drop(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
    return []


def duplicate(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
    return [frame, frame]


def cut(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
    """Close the whole session without delivering this frame."""
    return [Cut()]


def freeze(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
    """Hold everything from this frame on (the test then kills, cuts or thaws)."""
    proxy.freeze()
    return [frame]


def truncate(keep: int) -> Action:
    """Deliver the first ``keep`` bytes of the frame, then close the session (a stream cut mid-bundle)."""

    def act(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
        return [Raw(frame.conn, frame.direction, frame.raw()[:keep]), Cut()]

    return act


def rewrite(fn: Callable[[Frame], Frame]) -> Action:
    return lambda frame, proxy: [fn(frame)]


def flip(region: str, rng: random.Random) -> Action:
    """Flip one bit in ``region`` of a bundle (see ``flip_bit``)."""
    return lambda frame, proxy: [flip_bit(frame, region, rng)]


def inject_before(frames: Callable[[Frame, MigrationProxy], Sequence[Frame]]) -> Action:
    """Send ``frames(frame, proxy)`` (retargeted to this frame's connection) and then the frame."""

    def act(frame: Frame, proxy: MigrationProxy) -> Sequence[Emit]:
        extra = [f.replace(conn=frame.conn, direction=frame.direction) for f in frames(frame, proxy)]
        return [*extra, frame]

    return act


class On:
    """Apply ``action`` to the ``nth`` frame (0-based) matching ``predicate``; every other frame passes."""

    def __init__(self, predicate: Predicate, action: Action, nth: int = 0) -> None:
        self.predicate = predicate
        self.action = action
        self.nth = nth
        self.seen = 0
        self.target: Frame | None = None
        self.fired = threading.Event()

    def __call__(self, frame: Frame, proxy: MigrationProxy) -> Sequence[Emit] | None:
        if self.fired.is_set() or not self.predicate(frame):
            return None
        self.seen += 1
        if self.seen <= self.nth:
            return None
        self.target = frame
        self.fired.set()
        return self.action(frame, proxy)


class Chain:
    """Several policies; the first that acts on a frame wins."""

    def __init__(self, *policies: Tamper) -> None:
        self.policies = policies

    def __call__(self, frame: Frame, proxy: MigrationProxy) -> Sequence[Emit] | None:
        for policy in self.policies:
            out = policy(frame, proxy)
            if out is not None:
                return out
        return None


class Reorder:
    """Hold the first frame matching ``predicate`` and send it right after the next frame on its connection."""

    def __init__(self, predicate: Predicate) -> None:
        self.predicate = predicate
        self.held: Frame | None = None
        self.fired = threading.Event()

    def __call__(self, frame: Frame, proxy: MigrationProxy) -> Sequence[Emit] | None:
        if self.fired.is_set():
            return None
        if self.held is None:
            if self.predicate(frame):
                self.held = frame
                return []
            return None
        if frame.conn == self.held.conn and frame.direction is self.held.direction:
            self.fired.set()
            return [frame, self.release(self.held, frame)]
        return None

    def release(self, held: Frame, after: Frame) -> Frame:
        """What goes out in place of the held frame, right after ``after``."""
        return held


class MoveToStream(Reorder):
    """Send the first frame matching ``predicate`` on stream connection ``to`` instead of its own, after the
    next frame of its own stream went out (so the move is observable whatever the thread timing)."""

    def __init__(self, predicate: Predicate, to: int) -> None:
        super().__init__(predicate)
        self.to = to

    def release(self, held: Frame, after: Frame) -> Frame:
        return held.replace(conn=ConnKey(after.conn.session, "stream", self.to))


class ReplayLater:
    """Pass the first frame matching ``capture``; inject a copy of it before the first later frame matching
    ``before`` on the same connection (a replay from an earlier epoch of the same session)."""

    def __init__(self, capture: Predicate, before: Predicate) -> None:
        self.capture = capture
        self.before = before
        self.copy: Frame | None = None
        self.fired = threading.Event()

    def __call__(self, frame: Frame, proxy: MigrationProxy) -> Sequence[Emit] | None:
        if self.fired.is_set():
            return None
        if self.copy is None:
            if self.capture(frame):
                self.copy = frame
            return None
        if frame.conn == self.copy.conn and self.before(frame):
            self.fired.set()
            return [self.copy, frame]
        return None


# -- payload surgery -------------------------------------------------------------------------------------

_REGIONS = ("header", "metadata", "mac", "page", "tag", "gpa")


def flip_bit(frame: Frame, region: str, rng: random.Random) -> Frame:
    """``frame`` with one bit flipped inside ``region`` of its bundle:

    header: the counters (mb_counter, epoch, iv_counter: 0x08-0x17) · metadata: the type metadata ·
    gpa: a GPA bit (12..23) of a memory entry · mac: the MBMD MAC · page: the first page's ciphertext ·
    tag: the first page's tag.
    """
    h = frame.bundle()
    if h is None or region not in _REGIONS:
        raise UsageError(f"cannot flip {region!r} in this frame")
    units = data_pages(frame)
    if region == "header":
        offset = rng.randrange(0x08, wire.HEADER_SIZE)
    elif region == "metadata":
        offset = rng.randrange(wire.HEADER_SIZE, h.size - wire.MAC_SIZE)
    elif region == "gpa":
        count = (h.size - wire.MAC_SIZE - wire.HEADER_SIZE - 8) // 8
        if h.type is not BundleType.MEMORY or count < 1:
            raise UsageError("gpa flips need a memory bundle")
        entry = wire.HEADER_SIZE + 8 + 8 * rng.randrange(count)
        bit = rng.randrange(12, 24)
        return _flip(frame, entry + bit // 8, bit % 8)
    elif region == "mac":
        offset = rng.randrange(h.size - wire.MAC_SIZE, h.size)
    elif units < 1:
        raise UsageError(f"{region} flips need a bundle that carries a page")
    elif region == "page":
        offset = h.size + rng.randrange(wire.PAGE_SIZE)
    else:
        offset = h.size + wire.PAGE_SIZE + rng.randrange(wire.TAG_SIZE)
    return _flip(frame, offset, rng.randrange(8))


def _flip(frame: Frame, offset: int, bit: int) -> Frame:
    data = bytearray(frame.payload)
    data[offset] ^= 1 << bit
    return frame.replace(payload=bytes(data))


def rewrite_control(frame: Frame, message: dict[str, Any]) -> Frame:
    return frame.replace(payload=json.dumps(message, separators=(",", ":")).encode())


def rewrite_ma_hello(frame: Frame, **changes: Any) -> Frame:
    """An MA HELLO frame with fields replaced (``versions``, ``certificate``, ``session_id``, ``role``)."""
    inner = decode_frame(frame.payload)
    if inner.type is not FrameType.HELLO:
        raise UsageError("not an MA HELLO frame")
    hello = Hello.from_bytes(inner.body)
    fields = {
        "session_id": hello.session_id,
        "role": hello.role,
        "versions": hello.versions,
        "certificate": hello.certificate,
        **changes,
    }
    return frame.replace(payload=encode_frame(FrameType.HELLO, Hello(**fields).to_bytes()))


def ma_hello(frame: Frame) -> Hello:
    return Hello.from_bytes(decode_frame(frame.payload).body)


def substitute_ratls_key(frame: Frame) -> Frame:
    """The relay's own P-384 key in the HELLO's RA-TLS certificate, every extension (the genuine attestation
    report and VCEK chain) copied: a key substitution the report's REPORT_DATA binding must catch."""
    cert = x509.load_der_x509_certificate(ma_hello(frame).certificate)
    relay_key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(relay_key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(ext.value, ext.critical)
    forged = builder.sign(relay_key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)
    return rewrite_ma_hello(frame, certificate=forged)
