"""agent layer: ``SourceSession`` — the source MA's side of session setup (TLS client; sequence in ``session.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING

from cvmotion.agent.hello import Hello, Role
from cvmotion.agent.policy import AgentConfig, GuestFacts, MigrationPolicy, PolicyOutcome
from cvmotion.agent.session import SessionBase, SessionState
from cvmotion.agent.wire import (
    ConfirmDestination,
    ConfirmSource,
    InnerMessage,
    KeyMessage,
    Marker,
    MessageType,
)
from cvmotion.errors import CvmError, FirmwareError, PolicyViolation, ProtocolError
from cvmotion.firmware.opstate import ExportOpState

if TYPE_CHECKING:
    from cvmotion.agent.identity import MigrationAgentIdentity
    from cvmotion.firmware.device import GuestHandle

__all__ = ["SourceSession"]


class SourceSession(SessionBase):
    """Set up the migration of ``guest_handle`` for the source MA.

    Args:
        identity: this host's MA (``MigrationAgentIdentity.launch(sp)``), on the guest's secure processor.
        guest_handle: the VM to move.
        policy_doc: the VM's canonical ``MigrationPolicy`` document; SHA-256 of it must be the VM's HOST_DATA.
        config: this host's ``AgentConfig``.
        session_id: 16 bytes naming the session (default: random); the destination's import context and the
            start token carry it.
    """

    role = Role.SOURCE

    def __init__(
        self,
        identity: MigrationAgentIdentity,
        guest_handle: GuestHandle,
        policy_doc: bytes,
        config: AgentConfig,
        *,
        session_id: bytes | None = None,
    ) -> None:
        super().__init__(identity, config, os.urandom(16) if session_id is None else session_id)
        self._handle = guest_handle
        self._doc = bytes(policy_doc)
        self._policy: MigrationPolicy | None = None
        self._guest: GuestFacts | None = None
        self._outcome: PolicyOutcome | None = None
        self._prepared = False

    def start(self) -> list[bytes]:
        """Check the policy binding, make the RA-TLS certificate; returns the HELLO frame to send.

        Fails (state FAILED, nothing to send) when SHA-256(policy doc) is not the guest's HOST_DATA or the
        document is not a canonical ``MigrationPolicy``.
        """
        if self._state is not SessionState.INITIAL:
            raise ProtocolError("start() was already called")
        try:
            info = self._identity.sp.guest_info(self._handle)
            if hashlib.sha256(self._doc).digest() != info.host_data:
                raise PolicyViolation(
                    [
                        f"SHA-256 of the migration policy document ({hashlib.sha256(self._doc).hexdigest()}) is not "
                        f"the guest's HOST_DATA ({info.host_data.hex()}): the document is not the VM's policy"
                    ]
                )
            self._policy = MigrationPolicy.from_canonical(self._doc)
            self._guest = GuestFacts(info.policy, info.measurement, info.host_data)
            frame = self._new_hello()
        except CvmError as exc:
            return self._fail(exc, notify=False)
        except BaseException:
            self._fail(ProtocolError("internal error"), notify=False)
            raise
        self._state = SessionState.AWAIT_HELLO
        return [frame]

    def _on_hello(self, hello: Hello, raw: bytes) -> None:
        peer = self._check_hello(hello)
        self._hellos[Role.DESTINATION] = hashlib.sha384(raw).digest()
        self._start_tls(peer)

    def _on_established(self) -> None:
        self._state = SessionState.AWAIT_CONFIRM  # the destination speaks first inside TLS

    def _on_inner(self, kind: MessageType, message: InnerMessage) -> None:
        assert self._policy is not None
        assert self._guest is not None
        if self._state is SessionState.AWAIT_CONFIRM and isinstance(message, ConfirmDestination):
            self._check_transcript(message.transcript)
            self._outcome = self._judge(self._guest, self._policy, message.policy_svn, message.pool_credential)
            confirm = ConfirmSource(
                self._transcript(), self._config.policy_svn, self._config.pool_credential, self._guest, self._doc
            )
            self._send(MessageType.CONFIRM_SOURCE, confirm)
            self._state = SessionState.AWAIT_ACCEPT
        elif self._state is SessionState.AWAIT_ACCEPT and kind is MessageType.ACCEPT:
            assert isinstance(message, Marker)
            self._check_sid(message.session_id, "ACCEPT")
            k_f = self._identity.sp.migration.ma_export_prepare(self._handle, self._session_id)
            self._prepared = True
            self._send(MessageType.FORWARD_KEY, KeyMessage(self._session_id, k_f))
            del k_f
            self._state = SessionState.AWAIT_BACKWARD_KEY
        elif self._state is SessionState.AWAIT_BACKWARD_KEY and kind is MessageType.BACKWARD_KEY:
            assert isinstance(message, KeyMessage)
            self._check_sid(message.session_id, "BACKWARD_KEY")
            self._identity.sp.migration.ma_export_install_backward_key(self._handle, message.key)
            self._send(MessageType.DONE, Marker(self._session_id))
            assert self._outcome is not None
            self._establish(self._guest, self._outcome)
        else:
            raise self._unexpected(kind)

    def _on_failed(self) -> None:
        if self._prepared:
            # Destroy K_f (and any K_b) in the firmware: a failed setup leaves nothing usable behind.  Only
            # a prepared, not started export is ours to drop (the host may abort a started one itself).
            migration = self._identity.sp.migration
            with contextlib.suppress(FirmwareError):
                if migration.export_status(self._handle) == ExportOpState.RUNNABLE.value:
                    migration.export_abort(self._handle)
            self._prepared = False
