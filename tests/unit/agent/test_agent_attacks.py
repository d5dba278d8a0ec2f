"""agent sessions against an adversarial relay: substitution, splicing, downgrade, replay, reordering, truncation.

The relay is the untrusted hosts' connection: it sees every frame and may deliver anything instead.  Every
attack must end with no ESTABLISHED session on the side that was attacked, a FAILED state with a clear error
(never a silent wait where the tampering is detectable), and no key handed over.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_harness import FakeClock, Host, NullHardware, Pair, default_policy, make_host, reconfigure
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cvmotion.agent.destination import DestinationSession
from cvmotion.agent.hello import Hello, VersionRange
from cvmotion.agent.pool import PoolAuthority
from cvmotion.agent.ratls import issue_ratls_certificate
from cvmotion.agent.session import SessionState
from cvmotion.agent.wire import ErrorCode, ErrorMessage, FrameType, decode_frame, encode_frame
from cvmotion.errors import FirmwareError, IntegrityError, PolicyViolation, ProtocolError, VerificationError
from cvmotion.firmware.opstate import ExportOpState
from cvmotion.firmware.vendor import Vendor

FAILED = SessionState.FAILED
FRAMES = 11  # HELLO, HELLO, ClientHello, server flight, client flight, CONFIRM_D, CONFIRM_S, ACCEPT, K_f, K_b, DONE
ATTACKED = (VerificationError, ProtocolError, IntegrityError)


def _at(index: int, edit: Callable[[bytes], list[bytes]]) -> Callable[[str, int, bytes], list[bytes]]:
    return lambda _direction, i, frame: edit(frame) if i == index else [frame]


def _rewrite_hello(frame: bytes, **changes: object) -> bytes:
    hello = Hello.from_bytes(decode_frame(frame).body)
    fields = {"session_id": hello.session_id, "role": hello.role, "versions": hello.versions,
              "certificate": hello.certificate, **changes}  # fmt: skip
    return encode_frame(FrameType.HELLO, Hello(**fields).to_bytes())  # type: ignore[arg-type]


def _attacked(pair: Pair, index: int | None = None) -> None:
    """The side that got the tampered frame (``index``: even = destination) FAILED with a clear error.

    Before K_f travels (frame 8) nothing may be ESTABLISHED.  Later, the other side may legitimately finish:
    both policies had passed and the keys are the genuine ones; the failed side's caller discards its half.
    """
    if index is None or index < 8:
        assert SessionState.ESTABLISHED not in pair.both(), pair.both()
    assert FAILED in pair.both()
    if index is not None:
        victim = pair.destination if index % 2 == 0 else pair.source
        assert victim.state is FAILED
    errors = [s.error for s in (pair.source, pair.destination) if s.state is FAILED]
    assert all(isinstance(e, (*ATTACKED, PolicyViolation)) for e in errors), errors
    assert all(str(e) for e in errors)


def test_relay_key_substitution_with_a_copied_report(src: Host, dst: Host) -> None:
    """The relay puts its own key into the destination's certificate, keeping the genuine report."""

    def substitute(frame: bytes) -> list[bytes]:
        cert = x509.load_der_x509_certificate(Hello.from_bytes(decode_frame(frame).body).certificate)
        relay_key = ec.generate_private_key(ec.SECP384R1())
        builder = (
            x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
            .public_key(relay_key.public_key()).serial_number(cert.serial_number)
            .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
        )  # fmt: skip
        for ext in cert.extensions:
            if not isinstance(ext.value, x509.SubjectKeyIdentifier):
                builder = builder.add_extension(ext.value, ext.critical)
        forged = builder.sign(relay_key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)
        return [_rewrite_hello(frame, certificate=forged)]

    pair = Pair(src, dst, default_policy())
    pair.run(_at(1, substitute))
    _attacked(pair)
    assert isinstance(pair.source.error, VerificationError)
    assert "REPORT_DATA does not bind" in str(pair.source.error)


def test_relay_replays_an_old_genuine_certificate(src: Host, dst: Host, clock: FakeClock) -> None:
    """Evidence verifies (an older session's certificate of the real destination MA), but the relay lacks its key."""
    old = issue_ratls_certificate(dst.identity, now=clock())
    pair = Pair(src, dst, default_policy())
    pair.run(_at(1, lambda f: [_rewrite_hello(f, certificate=old.der)]))
    _attacked(pair)
    assert isinstance(pair.source.error, VerificationError)
    assert "not the attested one" in str(pair.source.error)


def test_relay_impersonates_the_source_to_the_destination(src: Host, dst: Host, clock: FakeClock) -> None:
    """The source's HELLO is replaced by one carrying another genuine MA certificate of the source host."""
    other = issue_ratls_certificate(src.identity, now=clock())
    pair = Pair(src, dst, default_policy())
    pair.run(_at(0, lambda f: [_rewrite_hello(f, certificate=other.der)]))
    _attacked(pair)
    assert pair.destination.state is FAILED


@pytest.mark.parametrize("index", [0, 1], ids=["source-hello", "destination-hello"])
def test_version_downgrade_is_detected(src: Host, dst: Host, index: int) -> None:
    """Both speak 1..2; the relay rewrites one HELLO's range to 1..1 so the other side picks version 1."""
    both = VersionRange(1, 2)
    pair = Pair(reconfigure(src, versions=both), reconfigure(dst, versions=both), default_policy())
    pair.run(_at(index, lambda f: [_rewrite_hello(f, versions=VersionRange(1, 1))]))
    _attacked(pair)
    error = pair.source.error if index == 0 else pair.destination.error
    assert isinstance(error, ProtocolError)
    assert "version" in str(error)
    assert "downgrade" in str(error)


def test_a_rewritten_hello_that_changes_no_outcome_is_still_detected(src: Host, dst: Host) -> None:
    """The destination HELLO's range 1..1 becomes 1..2: same chosen version, same evidence — the transcript differs."""
    pair = Pair(src, dst, default_policy())
    pair.run(_at(1, lambda f: [_rewrite_hello(f, versions=VersionRange(1, 2))]))
    _attacked(pair, 1)
    assert "hello_destination" in str(pair.source.error)
    assert "version," not in str(pair.source.error)


def test_splicing_two_handshakes_fails(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    """One source, two destinations prepared for the same session: HELLO from D2, TLS with D1."""
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock)
    d1 = make_host(emulated_vendor, tmp_path / "d1", pool_ca, clock)
    d2 = make_host(emulated_vendor, tmp_path / "d2", pool_ca, clock)
    pair = Pair(src, d1, default_policy())
    ref2 = d2.sp.migration.import_prepare(pair.session_id, NullHardware())
    dest2 = DestinationSession(d2.identity, ref2, d2.config, session_id=pair.session_id)
    (hello_s,) = pair.source.start()
    (hello_d1,) = pair.destination.receive(hello_s)
    (hello_d2,) = dest2.receive(hello_s)
    (client_hello,) = pair.source.receive(hello_d2)  # the source now pins D2's certificate
    replies = pair.destination.receive(client_hello)  # ... but talks to D1
    for frame in replies:
        pair.source.receive(frame)
    assert pair.source.state is FAILED
    assert isinstance(pair.source.error, VerificationError)
    assert hello_d1 != hello_d2


def test_hello_from_another_session_is_refused(src: Host, dst: Host) -> None:
    pair_a = Pair(src, dst, default_policy(), session_id=b"\xaa" * 16)
    pair_b = Pair(src, dst, default_policy(), session_id=b"\xbb" * 16)
    (hello_a,) = pair_a.source.start()
    pair_b.destination.receive(hello_a)
    assert pair_b.destination.state is FAILED
    assert "another session id" in str(pair_b.destination.error)


@pytest.mark.parametrize("index", range(FRAMES - 2))  # duplicates of the last two reach a finished session
def test_duplicated_frames_fail_closed(src: Host, dst: Host, index: int) -> None:
    pair = Pair(src, dst, default_policy())
    pair.run(_at(index, lambda f: [f, f]))
    _attacked(pair, index)


@pytest.mark.parametrize("index", range(2, FRAMES))
def test_replayed_earlier_frame_instead_of_the_next(src: Host, dst: Host, index: int) -> None:
    """The relay delivers an earlier frame of the same direction in place of the current one (reordering)."""
    pair = Pair(src, dst, default_policy())
    sent: list[bytes] = []

    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        sent.append(frame)
        return [sent[i - 2]] if i == index else [frame]

    pair.run(tamper)
    _attacked(pair, index)


@pytest.mark.parametrize("index", range(FRAMES))
@pytest.mark.parametrize("how", ["cut", "cut-and-fix-length"])
def test_truncated_frames_fail_closed(src: Host, dst: Host, index: int, how: str) -> None:
    def cut(frame: bytes) -> list[bytes]:
        short = frame[:-7]
        if how == "cut-and-fix-length":
            short = short[:8] + struct.pack(">I", len(short) - 12) + short[12:]
        return [short]

    pair = Pair(src, dst, default_policy())
    pair.run(_at(index, cut))
    _attacked(pair, index)
    victim = pair.destination if index % 2 == 0 else pair.source
    assert isinstance(victim.error, ProtocolError)
    assert "truncated" in str(victim.error) or "LENGTH" in str(victim.error)


@pytest.mark.parametrize("index", range(FRAMES))
def test_corrupted_frames_fail_closed(src: Host, dst: Host, index: int) -> None:
    def flip(frame: bytes) -> list[bytes]:
        raw = bytearray(frame)
        raw[len(raw) - 20] ^= 0x01  # inside the body: certificate, TLS ciphertext or tag
        return [bytes(raw)]

    pair = Pair(src, dst, default_policy())
    pair.run(_at(index, flip))
    _attacked(pair, index)


def test_failure_after_the_forward_key_destroys_it(src: Host, dst: Host) -> None:
    """K_f was made, then the relay corrupts K_b's frame: the source aborts its export (K_f gone, guest runs)."""
    pair = Pair(src, dst, default_policy())
    pair.run(_at(9, lambda f: [f[:-1] + bytes([f[-1] ^ 1])]))
    assert pair.source.state is FAILED
    assert isinstance(pair.source.error, IntegrityError)
    assert src.sp.migration.export_status(pair.handle) == ExportOpState.RUNNABLE.value
    assert src.sp.migration.can_run(pair.handle)
    with pytest.raises(FirmwareError, match="no export session"):  # K_f is gone, not merely unused
        src.sp.migration.export_start(pair.handle, NullHardware())
    src.sp.migration.ma_export_prepare(pair.handle, b"\x07" * 16)  # a fresh session can start again


def test_replaying_a_whole_old_session_to_a_new_destination(src: Host, dst: Host) -> None:
    old = Pair(src, dst, default_policy())
    old.run()
    assert old.both() == (SessionState.ESTABLISHED, SessionState.ESTABLISHED)
    new = Pair(src, dst, default_policy())  # same session id, fresh import context
    for direction, frame in old.relayed:
        if direction == "s2d" and new.destination.state is not FAILED:
            new.destination.receive(frame)
    assert new.destination.state is FAILED
    assert isinstance(new.destination.error, ATTACKED)


def test_injected_error_frame_aborts_as_unauthenticated(src: Host, dst: Host) -> None:
    pair = Pair(src, dst, default_policy())
    (hello,) = pair.source.start()
    pair.destination.receive(hello)
    fake = encode_frame(FrameType.ERROR, ErrorMessage(ErrorCode.POLICY, "go away").to_bytes())
    assert pair.source.receive(fake) == []
    assert isinstance(pair.source.error, ProtocolError)
    assert "(unauthenticated ERROR frame)" in str(pair.source.error)


@pytest.mark.parametrize("junk", [b"", b"CVMA", b"\x00" * 64, b"CVMA\x01\x02\x00\x00" + bytes(4), bytes(80_000)])
def test_junk_frames_fail_closed(src: Host, dst: Host, junk: bytes) -> None:
    pair = Pair(src, dst, default_policy())
    out = pair.destination.receive(junk)
    assert pair.destination.state is FAILED
    assert isinstance(pair.destination.error, ProtocolError)
    assert len(out) == 1
    assert decode_frame(out[0]).type is FrameType.ERROR


def test_dropped_frame_leaves_a_visible_wait_and_nothing_else(src: Host, dst: Host) -> None:
    """A drop is not detectable by the library (no timers): both sides wait in a named state for the caller."""
    pair = Pair(src, dst, default_policy())
    pair.run(_at(5, lambda _f: []))  # CONFIRM_DESTINATION never arrives
    assert pair.both() == (SessionState.AWAIT_CONFIRM, SessionState.AWAIT_CONFIRM)
    assert pair.source.result is None


def test_frames_after_the_end_are_caller_errors(src: Host, dst: Host) -> None:
    pair = Pair(src, dst, default_policy())
    pair.run()
    last = pair.relayed[-1][1]
    with pytest.raises(ProtocolError, match="established"):
        pair.destination.receive(last)
    assert pair.destination.state is SessionState.ESTABLISHED
    with pytest.raises(ProtocolError, match="already called"):
        pair.source.start()


@pytest.mark.parametrize("index", range(FRAMES - 1))
def test_reflected_frames_fail_closed(src: Host, dst: Host, index: int) -> None:
    """The relay sends a frame back to the MA that produced it (reflection)."""
    pair = Pair(src, dst, default_policy())
    queue: list[tuple[str, bytes]] = [("s2d", f) for f in pair.source.start()]
    for i in range(index + 1):
        direction, frame = queue.pop(0)
        sender, receiver = (pair.source, pair.destination) if direction == "s2d" else (pair.destination, pair.source)
        if i == index:
            sender.receive(frame)
            assert sender.state is FAILED
            assert isinstance(sender.error, ATTACKED)
            return
        back = "d2s" if direction == "s2d" else "s2d"
        queue.extend((back, out) for out in receiver.receive(frame))
