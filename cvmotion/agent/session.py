"""agent layer: MA-to-MA session setup, sans I/O — ``SourceSession`` and ``DestinationSession`` (DESIGN section 6).

The platform process feeds each session the frames the untrusted hosts relay and sends whatever it returns;
there are no sockets and no timers here (the caller enforces timeouts).  Sequence ([..] = inside TLS)::

 source MA (TLS client)                                         destination MA (TLS server)
   start(): SHA-256(policy doc) == guest HOST_DATA?
   HELLO{sid, SOURCE, [min,max], RA-TLS cert_s}    ──────────►  verify cert_s evidence; negotiate
                                                   ◄──────────  HELLO{sid, DESTINATION, [min,max], cert_d}
   verify cert_d evidence; negotiate
   TLS 1.3 ClientHello                             ──────────►
                                                   ◄──────────  ServerHello … Certificate(d), CertificateVerify,
                                                                Finished   (client certificate requested)
   Certificate(s), CertificateVerify, Finished     ──────────►  handshake done (both ends pinned)
                                                   ◄──────────  [CONFIRM_DESTINATION{transcript, svn, pool cred}]
   transcript; FORWARD POLICY (all violations)
   [CONFIRM_SOURCE{transcript, svn, pool cred,     ──────────►  transcript; BACKWARD POLICY (all violations)
                   guest facts, policy doc}]
                                                   ◄──────────  [ACCEPT{sid}]
   K_f = ma_export_prepare(h, sid)
   [FORWARD_KEY{sid, K_f}]                         ──────────►  ma_import_install_forward_key(ref, K_f)
                                                   ◄──────────  [BACKWARD_KEY{sid, K_b}]  (K_b from the SP)
   ma_export_install_backward_key(h, K_b)
   [DONE{sid}]                       ESTABLISHED   ──────────►  ESTABLISHED

The destination speaks first inside TLS so that the source reveals the VM's policy and facts only to a
destination that has passed the whole forward policy; keys move only after both policies passed.

Fail closed: any bad frame — malformed, oversized, unexpected for the state, duplicated, replayed, reordered
or truncated — moves the session to FAILED (terminal) with a ``ProtocolError``, ``VerificationError``,
``PolicyViolation``, ``IntegrityError`` or ``FirmwareError`` in ``.error``, and ``receive`` returns an ERROR
for the peer (inside TLS once it is up, else in the clear).  Every frame must be used in full and must
advance the session, so nothing is left waiting for data that cannot come.  A source that failed after
``ma_export_prepare`` aborts that export (the firmware destroys K_f); the destination's import context
belongs to the caller (discard it on FAILED).  Keys never appear in a frame outside TLS, in ``.result``
or in an error.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cvmotion.abi.snp import Product, SigningKey, TcbVersion
from cvmotion.agent.hello import Hello, Role, negotiate
from cvmotion.agent.policy import AgentConfig, GuestFacts, HostFacts, MigrationPolicy, PolicyOutcome, evaluate
from cvmotion.agent.pool import PoolCredential, verify_pool_credential
from cvmotion.agent.ratls import PeerEvidence, RatlsCredential, issue_ratls_certificate, verify_ratls_certificate
from cvmotion.agent.tls import TlsEndpoint
from cvmotion.agent.wire import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_BODY,
    ErrorCode,
    ErrorMessage,
    FrameType,
    InnerMessage,
    MessageType,
    Transcript,
    decode_frame,
    decode_inner,
    encode_frame,
    encode_inner,
    split_inner,
)
from cvmotion.attestation.trust import PlatformKind
from cvmotion.errors import (
    CvmError,
    FirmwareError,
    IntegrityError,
    PolicyViolation,
    ProtocolError,
    UsageError,
    VerificationError,
)

if TYPE_CHECKING:
    from cvmotion.agent.identity import MigrationAgentIdentity

__all__ = ["PeerSummary", "SessionBase", "SessionResult", "SessionState"]


class SessionState(enum.Enum):
    INITIAL = "initial"
    AWAIT_HELLO = "await-hello"
    HANDSHAKE = "tls-handshake"
    AWAIT_CONFIRM = "await-confirm"
    AWAIT_ACCEPT = "await-accept"
    AWAIT_FORWARD_KEY = "await-forward-key"
    AWAIT_BACKWARD_KEY = "await-backward-key"
    AWAIT_DONE = "await-done"
    ESTABLISHED = "established"
    FAILED = "failed"


_TERMINAL = (SessionState.ESTABLISHED, SessionState.FAILED)


@dataclass(frozen=True, slots=True)
class PeerSummary:
    """What was verified about the other end (all public; no key material)."""

    chip_id: bytes
    product: Product
    reported_tcb: TcbVersion
    platform: PlatformKind
    signing_key: SigningKey
    ma_measurement: bytes
    pool: str
    policy_svn: int


@dataclass(frozen=True, slots=True)
class SessionResult:
    """The caller's summary once ESTABLISHED."""

    session_id: bytes
    role: Role
    version: int
    peer: PeerSummary
    guest: GuestFacts
    policy_checks: tuple[str, ...]


class _VersionMismatch(ProtocolError):
    pass


class _PeerAborted(Exception):
    """The peer sent ERROR: fail with ``error`` and send nothing back."""

    def __init__(self, error: CvmError) -> None:
        super().__init__(str(error))
        self.error = error


def _sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def _code_for(exc: CvmError) -> ErrorCode:
    if isinstance(exc, PolicyViolation):
        return ErrorCode.POLICY
    if isinstance(exc, VerificationError):
        return ErrorCode.VERIFICATION
    if isinstance(exc, _VersionMismatch):
        return ErrorCode.VERSION
    if isinstance(exc, FirmwareError):
        return ErrorCode.FIRMWARE
    if isinstance(exc, (ProtocolError, IntegrityError)):
        return ErrorCode.PROTOCOL
    return ErrorCode.INTERNAL


class SessionBase:
    """What both ends share: frame handling, the TLS endpoint, transcript, facts, failure."""

    role: Role

    def __init__(self, identity: MigrationAgentIdentity, config: AgentConfig, session_id: bytes) -> None:
        if len(session_id) != 16:
            raise UsageError("a session id is 16 bytes")
        self._identity = identity
        self._config = config
        self._session_id = bytes(session_id)
        self._state = SessionState.INITIAL
        self._error: CvmError | None = None
        self._result: SessionResult | None = None
        self._own: RatlsCredential | None = None
        self._peer: PeerEvidence | None = None
        self._tls: TlsEndpoint | None = None
        self._version = 0
        self._hellos: dict[Role, bytes] = {}
        self._inner = bytearray()
        self._out: list[bytes] = []
        self._peer_pool: PoolCredential | None = None
        self._peer_svn = 0

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def error(self) -> CvmError | None:
        return self._error

    @property
    def result(self) -> SessionResult | None:
        return self._result

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def version(self) -> int:
        """The negotiated protocol version (0 before HELLO)."""
        return self._version

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume one relayed frame; returns the frames to relay to the peer (possibly none).

        Raises:
            ProtocolError: only for caller mistakes — the session is already ESTABLISHED or FAILED, or a source
                session was not started. Problems with the frame itself never raise (see the module docstring).
        """
        if self._state in _TERMINAL:
            raise ProtocolError(f"the {self.role.name.lower()} session is {self._state.value}; it takes no frames")
        if self._state is SessionState.INITIAL:
            raise ProtocolError("call start() before receive()")
        self._out = []
        try:
            if memoryview(data).nbytes > FRAME_HEADER_SIZE + MAX_FRAME_BODY:
                raise ProtocolError(f"frame of {memoryview(data).nbytes:#x} bytes exceeds the frame size limit")
            raw = bytes(data)
            frame = decode_frame(raw)
            if frame.type is FrameType.HELLO:
                self._on_hello(Hello.from_bytes(frame.body), raw)
            elif frame.type is FrameType.TLS:
                self._on_tls(frame.body)
            else:
                self._peer_error(ErrorMessage.from_bytes(frame.body), authenticated=False)
        except _PeerAborted as aborted:
            return self._fail(aborted.error, notify=False)
        except CvmError as exc:
            return self._fail(exc)
        except BaseException:
            self._fail(ProtocolError("internal error"), notify=False)
            raise
        return self._out

    # -- pieces both roles use ---------------------------------------------------------------------------

    def _check_hello(self, hello: Hello) -> PeerEvidence:
        if self._state is not SessionState.AWAIT_HELLO:
            raise ProtocolError(f"unexpected HELLO in state {self._state.value} (duplicated or replayed?)")
        if hello.role is not self.role.peer:
            raise ProtocolError(f"HELLO from a {hello.role.name.lower()}, expected the {self.role.peer.name.lower()}")
        if hello.session_id != self._session_id:
            raise ProtocolError("HELLO carries another session id (a HELLO from another session?)")
        src, dst = (self._config.versions, hello.versions)[:: 1 if self.role is Role.SOURCE else -1]
        try:
            self._version = negotiate(src, dst)
        except ProtocolError as exc:
            raise _VersionMismatch(str(exc)) from None
        return verify_ratls_certificate(
            hello.certificate, self._config.trust, at=self._config.now(), options=self._config.verify_options
        )

    def _new_hello(self) -> bytes:
        self._own = issue_ratls_certificate(self._identity, now=self._config.now())
        frame = encode_frame(
            FrameType.HELLO, Hello(self._session_id, self.role, self._config.versions, self._own.der).to_bytes()
        )
        self._hellos[self.role] = _sha384(frame)
        return frame

    def _start_tls(self, peer: PeerEvidence) -> None:
        assert self._own is not None
        self._peer = peer
        self._tls = TlsEndpoint(self._own, peer.der, server=self.role is Role.DESTINATION)
        self._state = SessionState.HANDSHAKE
        self._tls.handshake()
        self._flush()

    def _on_tls(self, body: bytes) -> None:
        tls = self._tls
        if tls is None or self._state in (SessionState.AWAIT_HELLO, SessionState.INITIAL):
            raise ProtocolError(f"TLS frame in state {self._state.value} (before HELLO: reordered or injected)")
        tls.feed(body)
        progressed = False
        if not tls.established and tls.handshake():
            progressed = True
            self._on_established()
        self._inner += tls.read() if tls.established else b""
        for kind, payload in split_inner(self._inner):
            if self._state in _TERMINAL:
                raise ProtocolError(f"{kind.name} after the session was {self._state.value}")
            progressed = True
            message = decode_inner(kind, payload)
            if isinstance(message, ErrorMessage):
                self._peer_error(message, authenticated=True)
            self._on_inner(kind, message)
        if self._inner:
            raise ProtocolError("TLS frame ends inside an inner message (truncated)")
        pending = tls.take_output(MAX_FRAME_BODY)
        if not progressed and not pending:
            raise ProtocolError(f"TLS frame did not advance the session in state {self._state.value} (replayed?)")
        self._out += [encode_frame(FrameType.TLS, body) for body in pending]

    def _send(self, kind: MessageType, message: InnerMessage) -> None:
        assert self._tls is not None
        self._tls.write(encode_inner(kind, message))
        self._flush()

    def _flush(self) -> None:
        assert self._tls is not None
        self._out += [encode_frame(FrameType.TLS, body) for body in self._tls.take_output(MAX_FRAME_BODY)]

    def _transcript(self) -> Transcript:
        assert self._own is not None
        assert self._peer is not None
        certs = {self.role: self._own.der, self.role.peer: self._peer.der}
        return Transcript(
            self._session_id,
            self._version,
            self._hellos[Role.SOURCE],
            self._hellos[Role.DESTINATION],
            _sha384(certs[Role.SOURCE]),
            _sha384(certs[Role.DESTINATION]),
        )

    def _check_transcript(self, theirs: Transcript) -> None:
        differ = self._transcript().mismatches(theirs)
        if differ:
            raise ProtocolError(
                f"the {self.role.peer.name.lower()} saw a different session setup ({', '.join(differ)} differ): "
                "a relay rewrote a HELLO (version downgrade) or spliced two handshakes"
            )

    def _check_sid(self, session_id: bytes, what: str) -> None:
        if session_id != self._session_id:
            raise ProtocolError(f"{what} names another session")

    def _peer_error(self, message: ErrorMessage, *, authenticated: bool) -> None:
        peer = self.role.peer.name.lower()
        note = "" if authenticated else " (unauthenticated ERROR frame)"
        reason = f"{message.reason}{note}"
        error: CvmError
        if message.code is ErrorCode.POLICY and authenticated:
            error = PolicyViolation([f"the {peer} refused: {v}" for v in message.reason.split("; ")])
        elif message.code is ErrorCode.VERIFICATION:
            error = VerificationError(f"the {peer} MA rejected this MA's evidence: {reason}")
        else:
            error = ProtocolError(f"the {peer} MA aborted ({message.code.name}): {reason}")
        raise _PeerAborted(error)

    def _facts(self, svn: int, credential: bytes) -> tuple[HostFacts, HostFacts]:
        """(local, peer) facts for the policy; pool credentials are verified here (problems become violations)."""
        assert self._peer is not None
        sp, config, at = self._identity.sp, self._config, self._config.now()

        def pool(der: bytes) -> tuple[PoolCredential | None, str]:
            try:
                return verify_pool_credential(der, config.pool_cas, at=at), ""
            except VerificationError as exc:
                return None, str(exc)

        status = sp.platform_status()
        own_pool, own_problem = pool(config.pool_credential)
        local = HostFacts(
            product=status.product,
            chip_id=sp.get_id(),
            reported_tcb=status.reported_tcb,
            platform=PlatformKind.EMULATED if status.emulated else PlatformKind.AMD_SEV_SNP,
            firmware=(status.api_major, status.api_minor),
            ma_measurement=self._identity.measurement,
            ma_policy=sp.guest_info(self._identity.handle).policy,
            ma_vmpl=0,
            policy_svn=config.policy_svn,
            pool=own_pool,
            pool_problem=own_problem,
        )
        v = self._peer.verified
        peer_pool, peer_problem = pool(credential)
        self._peer_pool, self._peer_svn = peer_pool, svn
        remote = HostFacts(
            product=v.product,
            chip_id=v.report.chip_id,
            reported_tcb=v.reported_tcb,
            platform=v.platform,
            firmware=(v.report.current_major, v.report.current_minor),
            ma_measurement=v.report.measurement,
            ma_policy=v.report.policy,
            ma_vmpl=v.report.vmpl,
            policy_svn=svn,
            pool=peer_pool,
            pool_problem=peer_problem,
        )
        return local, remote

    def _judge(self, guest: GuestFacts, policy: MigrationPolicy, svn: int, credential: bytes) -> PolicyOutcome:
        local, peer = self._facts(svn, credential)
        outcome = evaluate(
            local=local, peer=peer, local_role=self.role, guest=guest, policy=policy, config=self._config
        )
        if outcome.violations:
            raise PolicyViolation(list(outcome.violations))
        return outcome

    def _establish(self, guest: GuestFacts, outcome: PolicyOutcome) -> None:
        assert self._peer is not None
        assert self._peer_pool is not None
        v = self._peer.verified
        peer = PeerSummary(
            chip_id=v.report.chip_id,
            product=v.product,
            reported_tcb=v.reported_tcb,
            platform=v.platform,
            signing_key=v.signing_key,
            ma_measurement=v.report.measurement,
            pool=self._peer_pool.pool,
            policy_svn=self._peer_svn,
        )
        self._result = SessionResult(self._session_id, self.role, self._version, peer, guest, outcome.passed)
        self._state = SessionState.ESTABLISHED
        self._own = None  # the ephemeral key is no longer needed (OpenSSL holds its own copy until closed)

    def _fail(self, exc: CvmError, *, notify: bool = True) -> list[bytes]:
        self._state = SessionState.FAILED
        self._error = exc
        out: list[bytes] = []
        if notify:
            error = ErrorMessage(_code_for(exc), str(exc))
            tls = self._tls
            if tls is not None and tls.usable:
                tls.write(encode_inner(MessageType.ERROR, error))
                out = [encode_frame(FrameType.TLS, body) for body in tls.take_output(MAX_FRAME_BODY)]
            else:
                # Before TLS: evidence, version or framing problems only (policy is judged inside TLS).
                out = [encode_frame(FrameType.ERROR, error.to_bytes())]
        self._on_failed()
        self._own, self._tls = None, None
        return out

    # -- role hooks --------------------------------------------------------------------------------------

    def _on_hello(self, hello: Hello, raw: bytes) -> None:
        raise NotImplementedError

    def _on_established(self) -> None:
        raise NotImplementedError

    def _on_inner(self, kind: MessageType, message: InnerMessage) -> None:
        raise NotImplementedError

    def _on_failed(self) -> None:
        """Undo what this role set up in the firmware."""

    def _unexpected(self, kind: MessageType) -> ProtocolError:
        return ProtocolError(f"unexpected {kind.name} in state {self._state.value} (duplicated, replayed or reordered)")
