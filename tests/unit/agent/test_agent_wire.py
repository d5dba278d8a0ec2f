"""agent wire format: frames, HELLO, inner messages and version negotiation — strict, bounded, fail closed."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.abi.snp import GuestPolicy, PolicyFlag
from cvmotion.agent.hello import IMPLEMENTED_VERSIONS, MAX_CERTIFICATE, Hello, Role, VersionRange, negotiate
from cvmotion.agent.policy import GuestFacts
from cvmotion.agent.tls import check_records, chunk_records
from cvmotion.agent.wire import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_BODY,
    ConfirmDestination,
    ConfirmSource,
    ErrorCode,
    ErrorMessage,
    FrameType,
    KeyMessage,
    Marker,
    MessageType,
    Transcript,
    decode_frame,
    decode_inner,
    encode_frame,
    encode_inner,
    split_inner,
)
from cvmotion.errors import ProtocolError, UsageError

SID = bytes(range(16))
TRANSCRIPT = Transcript(SID, 1, b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48)
GUEST = GuestFacts(GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.MIGRATE_MA), b"\x05" * 48, b"\x06" * 32)


def test_frame_round_trip() -> None:
    frame = encode_frame(FrameType.TLS, b"\x17\x03\x03\x00\x01x")
    assert frame[:4] == b"CVMA"
    parsed = decode_frame(frame)
    assert (parsed.type, parsed.body) == (FrameType.TLS, b"\x17\x03\x03\x00\x01x")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: b"XVMA" + f[4:], "MAGIC"),
        (lambda f: f[:4] + b"\x02" + f[5:], "FORMAT"),
        (lambda f: f[:5] + b"\x09" + f[6:], "TYPE 9"),
        (lambda f: f[:5] + b"\x00" + f[6:], "TYPE 0"),
        (lambda f: f[:6] + b"\x00\x01" + f[8:], "reserved"),
        (lambda f: f[:-1], "truncated"),
        (lambda f: f + b"\x00", "LENGTH"),
        (lambda f: f[:5], "shorter than its"),
        (lambda f: f[:8] + struct.pack(">I", MAX_FRAME_BODY + 1) + bytes(MAX_FRAME_BODY + 1), "exceeds"),
    ],
    ids=["magic", "format", "unknown-type", "invalid-type", "reserved", "truncated", "trailing", "short", "oversize"],
)
def test_bad_frames_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    frame = encode_frame(FrameType.HELLO, b"abc")
    with pytest.raises(ProtocolError, match=message):
        decode_frame(mutate(frame))


def test_oversized_frames_are_not_produced() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(FrameType.TLS, bytes(MAX_FRAME_BODY + 1))


def test_hello_round_trip_and_strictness() -> None:
    hello = Hello(SID, Role.SOURCE, VersionRange(1, 2), b"cert")
    raw = hello.to_bytes()
    assert Hello.from_bytes(raw) == hello
    with pytest.raises(ProtocolError, match="ROLE 3"):
        Hello.from_bytes(raw[:16] + b"\x03" + raw[17:])
    with pytest.raises(ProtocolError, match="reserved"):
        Hello.from_bytes(raw[:17] + b"\x01" + raw[18:])
    with pytest.raises(ProtocolError, match="version range 2..1"):
        Hello.from_bytes(raw[:18] + b"\x00\x02\x00\x01" + raw[22:])
    with pytest.raises(ProtocolError, match="version range 0..1"):
        Hello.from_bytes(raw[:18] + b"\x00\x00\x00\x01" + raw[22:])
    with pytest.raises(ProtocolError, match="trailing"):
        Hello.from_bytes(raw + b"\x00")
    with pytest.raises(ProtocolError, match="truncated"):
        Hello.from_bytes(raw[:-1])
    big = raw[:24] + struct.pack(">I", MAX_CERTIFICATE + 1)
    with pytest.raises(ProtocolError, match="CERT length"):
        Hello.from_bytes(big + bytes(MAX_CERTIFICATE + 1))
    with pytest.raises(ProtocolError, match="CERT length 0x0"):
        Hello.from_bytes(raw[:24] + bytes(4))


@pytest.mark.parametrize(
    ("src", "dst", "chosen"),
    [((1, 1), (1, 1), 1), ((1, 2), (1, 1), 1), ((1, 1), (1, 2), 1), ((1, 2), (1, 2), 2), ((1, 5), (3, 9), 5)],
)
def test_negotiation_picks_min_of_max(src: tuple[int, int], dst: tuple[int, int], chosen: int) -> None:
    assert negotiate(VersionRange(*src), VersionRange(*dst)) == chosen


def test_negotiation_without_overlap_names_both_ranges() -> None:
    with pytest.raises(ProtocolError, match=r"source speaks 1\.\.1, destination 2\.\.3"):
        negotiate(VersionRange(1, 1), VersionRange(2, 3))


def test_version_ranges_are_validated() -> None:
    with pytest.raises(ProtocolError):
        VersionRange(2, 1)
    with pytest.raises(ProtocolError):
        VersionRange(0, 1)
    assert VersionRange(1, 2).check_configurable() == VersionRange(1, 2)
    with pytest.raises(UsageError, match="speaks 1..2"):
        VersionRange(1, 3).check_configurable()
    assert VersionRange(1, 1) == IMPLEMENTED_VERSIONS


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (MessageType.CONFIRM_DESTINATION, ConfirmDestination(TRANSCRIPT, 7, b"cred")),
        (MessageType.CONFIRM_SOURCE, ConfirmSource(TRANSCRIPT, 3, b"cred", GUEST, b"{}")),
        (MessageType.ACCEPT, Marker(SID)),
        (MessageType.FORWARD_KEY, KeyMessage(SID, b"k" * 32)),
        (MessageType.BACKWARD_KEY, KeyMessage(SID, b"b" * 32)),
        (MessageType.DONE, Marker(SID)),
        (MessageType.ERROR, ErrorMessage(ErrorCode.POLICY, "no")),
    ],
    ids=lambda v: v.name if isinstance(v, MessageType) else "",
)
def test_inner_round_trip_and_trailing_bytes(kind: MessageType, message: object) -> None:
    encoded = encode_inner(kind, message)  # type: ignore[arg-type]
    buffer = bytearray(encoded + encoded[:5])
    ((got_kind, body),) = split_inner(buffer)
    assert buffer == encoded[:5]  # the partial second message stays for the caller to judge
    assert got_kind is kind
    assert decode_inner(kind, body) == message
    with pytest.raises(ProtocolError, match="trailing"):
        decode_inner(kind, body + b"\x00")
    with pytest.raises(ProtocolError, match="truncated"):
        decode_inner(kind, body[:-1])


def test_inner_headers_are_strict() -> None:
    for header, message in (
        (struct.pack(">HHI", 99, 0, 0), "TYPE 99"),
        (struct.pack(">HHI", 0, 0, 0), "TYPE 0"),
        (struct.pack(">HHI", 6, 1, 16), "reserved"),
        (struct.pack(">HHI", 6, 0, 1 << 20), "exceeds"),
    ):
        with pytest.raises(ProtocolError, match=message):
            split_inner(bytearray(header))


def test_key_messages_hide_keys_and_errors_are_printable() -> None:
    key = bytes.fromhex("aa" * 32)
    assert "aa" * 4 not in repr(KeyMessage(SID, key))
    raw = ErrorMessage(ErrorCode.PROTOCOL, "x").to_bytes()
    hostile = raw[:4] + struct.pack(">I", 5) + b"a\x1b[2J"
    assert ErrorMessage.from_bytes(hostile).reason == "a?[2J"
    with pytest.raises(ProtocolError, match="unknown code"):
        ErrorMessage.from_bytes(b"\x00\x63" + raw[2:])


def test_confirm_source_refuses_bad_guest_policy() -> None:
    body = bytearray(ConfirmSource(TRANSCRIPT, 3, b"cred", GUEST, b"{}").to_bytes())
    offset = 16 + 4 + 4 * 48 + 4 + 4 + 4  # transcript, svn, credential length + "cred"
    body[offset : offset + 8] = (1 << 40).to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="guest policy"):
        ConfirmSource.from_bytes(bytes(body))


def test_tls_frames_must_hold_whole_records() -> None:
    record = b"\x17\x03\x03\x00\x02ab"
    check_records(record * 3)
    for bad, message in (
        (b"", "empty"),
        (record[:-1], "truncated"),
        (record + record[:3], "truncated record header"),
        (b"\x18" + record[1:], "bad record header"),
        (b"\x17\x03\x04" + record[3:], "bad record header"),
    ):
        with pytest.raises(ProtocolError, match=message):
            check_records(bad)
    assert chunk_records(record * 5, 2 * len(record)) == [record * 2, record * 2, record]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (
        decode_frame,
        Hello.from_bytes,
        lambda d: split_inner(bytearray(d)),
        check_records,
        *(lambda d, k=k: decode_inner(k, d) for k in MessageType if k is not MessageType.INVALID),
    ):
        with contextlib.suppress(ProtocolError):
            decode(data)


def test_frame_header_size_is_pinned() -> None:
    assert FRAME_HEADER_SIZE == 12
