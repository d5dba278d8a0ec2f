"""platformd: the host's migration agent inside the platform process, behind three host commands.

The untrusted host daemon relays the MAs' frames; it can start a session and deliver frames, nothing more:

    ma_source_begin {vm, handle, session_id} + policy document  -> {state, messages}
    ma_dest_begin   {vm, session_id}                            -> {state}    (creates the import context)
    ma_deliver      {session_id, role} + frame                   -> {state, messages, summary | error}

Replies carry frames (ciphertext inside TLS, or public HELLO/certificate data) and a public summary of the
peer: never keys.  Configuration comes from the host's data directory (provisioned by the operator or by the
platform process on its first start, ``platformd.provision``; never by the host daemon): ``pool-credential.der``
(this chip's pool credential), ``pool-ca.pem`` (the operator pool CA it trusts) and, optionally,
``ma-config.json``: ``policy_svn``, ``revoked_chip_ids``, ``revoked_tcbs``, ``allowed_ma_measurements`` (hex
launch digests of peer MAs this host accepts; default: this build's) and ``versions`` (``[min, max]``
protocol versions this MA speaks; default ``[1, 1]``).
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

from cryptography import x509

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.agent.destination import DestinationSession
from cvmotion.agent.hello import VersionRange
from cvmotion.agent.identity import MigrationAgentIdentity
from cvmotion.agent.policy import AgentConfig
from cvmotion.agent.session import SessionBase, SessionState
from cvmotion.agent.source import SourceSession
from cvmotion.attestation.trust import TrustStore
from cvmotion.errors import CvmError, PolicyViolation, UsageError
from cvmotion.firmware.device import GuestHandle
from cvmotion.ipc.rpc import Call, Reply
from cvmotion.platformd.protocol import HostCommand, MaReport
from cvmotion.platformd.server import PlatformService

__all__ = ["POOL_CA_FILE", "POOL_CREDENTIAL_FILE", "MigrationAgentService", "load_agent_config"]

POOL_CREDENTIAL_FILE = "pool-credential.der"
POOL_CA_FILE = "pool-ca.pem"
MA_CONFIG_FILE = "ma-config.json"
_MAX_SESSIONS = 64


def load_agent_config(data_dir: Path, trust: TrustStore) -> AgentConfig:
    """This host's ``AgentConfig`` from its data directory."""
    cred_path, ca_path = data_dir / POOL_CREDENTIAL_FILE, data_dir / POOL_CA_FILE
    if not cred_path.exists() or not ca_path.exists():
        raise UsageError(
            f"{data_dir} has no pool credential ({POOL_CREDENTIAL_FILE}, {POOL_CA_FILE}): the host cannot take part"
            " in migrations until the operator pool CA issues one (cvmotion pool issue, or host serve --pool-ca-dir)"
        )
    extra: dict[str, Any] = {}
    cfg_path = data_dir / MA_CONFIG_FILE
    if cfg_path.exists():
        try:
            raw = json.loads(cfg_path.read_text())
            if "policy_svn" in raw:
                extra["policy_svn"] = int(raw["policy_svn"])
            if "revoked_chip_ids" in raw:
                extra["revoked_chip_ids"] = frozenset(bytes.fromhex(c) for c in raw["revoked_chip_ids"])
            if "revoked_tcbs" in raw:
                extra["revoked_tcbs"] = frozenset(
                    (Product.from_name(t["product"]), TcbVersion(**{k: int(v) for k, v in t["tcb"].items()}))
                    for t in raw["revoked_tcbs"]
                )
            if "allowed_ma_measurements" in raw:
                extra["allowed_ma_measurements"] = frozenset(bytes.fromhex(m) for m in raw["allowed_ma_measurements"])
            if "versions" in raw:
                low, high = (int(v) for v in raw["versions"])
                extra["versions"] = VersionRange(low, high)
        except (ValueError, KeyError, TypeError, CvmError) as exc:
            raise UsageError(f"{cfg_path}: {exc}") from None
    return AgentConfig(
        trust=trust,
        pool_credential=cred_path.read_bytes(),
        pool_cas=tuple(x509.load_pem_x509_certificates(ca_path.read_bytes())),
        **extra,
    )


class MigrationAgentService:
    """The MA of one host: its identity (a measured guest context on the SP) and its sessions."""

    def __init__(self, platform: PlatformService, config: AgentConfig) -> None:
        self.platform = platform
        self.config = config
        self.identity = MigrationAgentIdentity.launch(platform.sp)
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, str], SessionBase] = {}
        platform.serve_agent(
            {
                HostCommand.MA_SOURCE_BEGIN: self._source_begin,
                HostCommand.MA_DEST_BEGIN: self._dest_begin,
                HostCommand.MA_DELIVER: self._deliver,
            }
        )

    def _store(self, key: tuple[str, str], session: SessionBase) -> None:
        with self._lock:
            if len(self._sessions) >= _MAX_SESSIONS:
                for old in [
                    k for k, s in self._sessions.items() if s.state in (SessionState.ESTABLISHED, SessionState.FAILED)
                ]:
                    del self._sessions[old]
            if key in self._sessions:
                raise UsageError("a session with this id already exists")
            self._sessions[key] = session

    def _source_begin(self, call: Call) -> Reply:
        sid = bytes.fromhex(str(call.args["session_id"]))
        session = SourceSession(
            self.identity, GuestHandle(int(call.args["handle"])), call.blob, self.config, session_id=sid
        )
        self._store((sid.hex(), "source"), session)
        return Reply(dict(self._report(session, session.start())))

    def _dest_begin(self, call: Call) -> Reply:
        sid = bytes.fromhex(str(call.args["session_id"]))
        ref = self.platform.register_import(str(call.args["vm"]), sid)
        session = DestinationSession(self.identity, ref, self.config, session_id=sid)
        self._store((sid.hex(), "destination"), session)
        return Reply({"state": session.state.name})

    def _deliver(self, call: Call) -> Reply:
        key = (str(call.args["session_id"]), str(call.args["role"]))
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            raise UsageError("no such migration agent session")
        return Reply(dict(self._report(session, session.receive(call.blob))))

    def _report(self, session: SessionBase, frames: list[bytes]) -> MaReport:
        out: MaReport = {
            "state": session.state.name,
            "messages": [base64.b64encode(f).decode() for f in frames],
        }
        result = session.result
        if result is not None:
            peer = result.peer
            local = self.platform.identity()
            out["summary"] = {
                "version": result.version,
                "local": {"chip_id": local["chip_id"], "product": local["product"], "tcb": local["reported_tcb_text"]},
                "peer": {
                    "chip_id": peer.chip_id.hex(),
                    "product": peer.product.value,
                    "tcb": peer.reported_tcb.describe(),
                    "platform": peer.platform.value,
                    "signing_key": peer.signing_key.name,
                    "ma_measurement": peer.ma_measurement.hex(),
                    "pool": peer.pool,
                    "policy_svn": peer.policy_svn,
                },
                "policy_checks": list(result.policy_checks),
            }
        error = session.error
        if error is not None:
            out["error"] = str(error)
            out["error_kind"] = type(error).__name__
            if isinstance(error, PolicyViolation):
                out["violations"] = error.violations
        return out
