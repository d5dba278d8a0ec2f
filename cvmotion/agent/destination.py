"""agent layer: ``DestinationSession`` — the destination MA's side of session setup (TLS server; see ``session.py``)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from cvmotion.agent.hello import Hello, Role
from cvmotion.agent.policy import AgentConfig, GuestFacts, MigrationPolicy, PolicyOutcome
from cvmotion.agent.session import SessionBase, SessionState
from cvmotion.agent.wire import ConfirmDestination, ConfirmSource, InnerMessage, KeyMessage, Marker, MessageType
from cvmotion.errors import ProtocolError, UsageError

if TYPE_CHECKING:
    from cvmotion.agent.identity import MigrationAgentIdentity

__all__ = ["DestinationSession"]


class DestinationSession(SessionBase):
    """Set up an incoming migration for the destination MA; waits for the source's HELLO.

    Args:
        identity: this host's MA, on the secure processor that will run the VM.
        import_ref: the import context the caller made with ``sp.migration.import_prepare(session_id, hw)``.
        config: this host's ``AgentConfig``.
        session_id: the id ``import_ref`` was prepared with; a HELLO for any other session is refused.
    """

    role = Role.DESTINATION

    def __init__(
        self, identity: MigrationAgentIdentity, import_ref: int, config: AgentConfig, *, session_id: bytes
    ) -> None:
        super().__init__(identity, config, session_id)
        self._ref = import_ref
        self._guest: GuestFacts | None = None
        self._outcome: PolicyOutcome | None = None
        self._state = SessionState.AWAIT_HELLO

    def _on_hello(self, hello: Hello, raw: bytes) -> None:
        peer = self._check_hello(hello)  # the source's evidence verifies before this MA asks for a report
        self._hellos[Role.SOURCE] = hashlib.sha384(raw).digest()
        self._out.append(self._new_hello())
        self._start_tls(peer)

    def _on_established(self) -> None:
        confirm = ConfirmDestination(self._transcript(), self._config.policy_svn, self._config.pool_credential)
        self._send(MessageType.CONFIRM_DESTINATION, confirm)
        self._state = SessionState.AWAIT_CONFIRM

    def _on_inner(self, kind: MessageType, message: InnerMessage) -> None:
        if self._state is SessionState.AWAIT_CONFIRM and isinstance(message, ConfirmSource):
            self._check_transcript(message.transcript)
            try:
                policy = MigrationPolicy.from_canonical(message.policy_doc)
            except UsageError as exc:
                raise ProtocolError(f"CONFIRM_SOURCE: {exc}") from None
            self._guest = message.guest
            self._outcome = self._judge(message.guest, policy, message.policy_svn, message.pool_credential)
            self._send(MessageType.ACCEPT, Marker(self._session_id))
            self._state = SessionState.AWAIT_FORWARD_KEY
        elif self._state is SessionState.AWAIT_FORWARD_KEY and kind is MessageType.FORWARD_KEY:
            assert isinstance(message, KeyMessage)
            self._check_sid(message.session_id, "FORWARD_KEY")
            migration = self._identity.sp.migration
            migration.ma_import_install_forward_key(self._ref, message.key)
            k_b = migration.ma_import_generate_backward_key(self._ref)
            self._send(MessageType.BACKWARD_KEY, KeyMessage(self._session_id, k_b))
            del k_b
            self._state = SessionState.AWAIT_DONE
        elif self._state is SessionState.AWAIT_DONE and kind is MessageType.DONE:
            assert isinstance(message, Marker)
            self._check_sid(message.session_id, "DONE")
            assert self._guest is not None
            assert self._outcome is not None
            self._establish(self._guest, self._outcome)
        else:
            raise self._unexpected(kind)
