"""The security checks the mutation check (``tools/mutants.py``, ``make mutants``) disables, one at a time.

A ``Mutant`` names a file, one exact snippet of its source (it must occur exactly once, or the runner reports
the mutant stale), the text that replaces it (the check disabled: a refusal's condition made ``False``, a
policy rule's verdict made ``True``, a MAC or signature verification removed) and the fastest default-suite
tests that must fail without the check.  To add a check, append a ``Mutant`` to ``MUTANTS``; if it survives
``make mutants``, write the test it lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MUTANTS", "Mutant"]


@dataclass(frozen=True, slots=True)
class Mutant:
    id: str
    check: str  # what the check guarantees, in a few words
    file: str  # relative to the repository root
    function: str  # where the check lives (for the table)
    snippet: str  # exact source text; must occur exactly once in ``file``
    replacement: str  # the same text with the check disabled
    tests: tuple[str, ...]  # default-suite pytest node ids or paths that must fail


OPSTATE = "cvmotion/firmware/opstate.py"
MIGRATION = "cvmotion/firmware/migration.py"
GUEST_REQUEST = "cvmotion/firmware/guest_request.py"
POLICY = "cvmotion/agent/policy.py"
VERIFY = "cvmotion/attestation/verify.py"

T_TOTALS = "tests/unit/protocol/test_stream_totals.py"
T_STREAM = "tests/unit/protocol/test_stream_attacks_refused.py"
T_MIGFW = "tests/unit/protocol/test_migration_firmware.py"
T_MODEL = "tests/unit/protocol/test_opstate_model.py"
T_DATAPATH = "tests/unit/protocol/test_migration_datapath.py"
T_GUEST = "tests/unit/firmware/test_fw_guest_request.py"
T_POLICY = "tests/unit/agent/test_agent_policy.py"
T_RATLS = "tests/unit/agent/test_agent_ratls.py"
T_AGENT_ATTACKS = "tests/unit/agent/test_agent_attacks.py"
T_SESSION = "tests/unit/agent/test_agent_session.py"
T_VERIFY = "tests/unit/attestation/test_attest_verify_synthetic.py"
T_DIRTY = "tests/unit/vmd/test_dirty_never_dropped.py"
T_PLATFORM = "tests/unit/platformd/test_platform_boundary.py"
T_SECURITY = "tests/unit/protocol/test_import_rules_refusals.py"
T_TABLE = "tests/unit/protocol/test_command_state_table.py"
T_PEERS = "tests/unit/host/test_peers.py"
T_OPTIONS = "tests/unit/migration/test_options_schema.py"
T_DMA = "tests/e2e/migration/test_dma_load.py"
T_DELETE = "tests/unit/host/test_delete_unsettled.py"
T_SEAL = "tests/unit/firmware/test_fw_sp_seal.py"
T_SEAL_MIG = "tests/unit/protocol/test_sp_seal_migration.py"
T_SUCCESSION = "tests/unit/platformd/test_platform_succession.py"
T_PARALLEL = "tests/unit/protocol/test_import_parallel_writes.py"
SP_SEAL = "cvmotion/firmware/sp_seal.py"
PLATFORM = "cvmotion/platformd/server.py"
HARDWARE = "cvmotion/platformd/hardware.py"
PEERS = "cvmotion/host/peers.py"


def _never(file: str, function: str, check: str, condition: str, tests: Sequence[str], *, id: str) -> Mutant:
    """The common mutant: ``if <condition>:`` becomes ``if False:`` (the refusal never happens)."""
    return Mutant(id, check, file, function, f"if {condition}:", "if False:", tuple(tests))


def _always(file: str, function: str, check: str, expression: str, tests: Sequence[str], *, id: str) -> Mutant:
    """A policy rule's verdict ``expression,`` becomes ``True,`` (the rule always passes)."""
    return Mutant(id, check, file, function, f"        {expression},\n", "        True,\n", tuple(tests))


MUTANTS: tuple[Mutant, ...] = (
    # -- destination: the stream rules (firmware/opstate.py ImportRules) ------------------------------------
    _never(
        OPSTATE,
        "ImportRules.close_epoch",
        "epoch token total_mb = bundles received",
        "total_mb != self.received_in_epoch",
        [T_TOTALS],
        id="epoch-total",
    ),
    Mutant(
        "start-total",
        "start token total_mb = bundles received in the final epoch",
        OPSTATE,
        "ImportRules.commit",
        "if total_mb != self.received_in_epoch or self.state_received != STATE_BUNDLES:",
        "if self.state_received != STATE_BUNDLES:",
        (T_TOTALS,),
    ),
    Mutant(
        "commit-all-state",
        "commit only with vCPU, device and mutable state",
        OPSTATE,
        "ImportRules.commit",
        "if total_mb != self.received_in_epoch or self.state_received != STATE_BUNDLES:",
        "if total_mb != self.received_in_epoch:",
        (T_SECURITY,),
    ),
    Mutant(
        "commit-after-abort",
        "no commit once an abort token was issued",
        OPSTATE,
        "ImportRules.commit",
        "if self.state is not ImportOpState.STATE_IMPORT or self.abort_token_issued:",
        "if self.state is not ImportOpState.STATE_IMPORT:",
        (T_SECURITY, T_MODEL),
    ),
    _never(
        OPSTATE,
        "ImportRules.check_bundle",
        "per-stream mb_counter exact",
        "mb_counter != self.mb_counters.get(stream, 0)",
        [T_SECURITY],
        id="mb-counter",
    ),
    _never(
        OPSTATE,
        "ImportRules.check_bundle",
        "per-stream IV counter exact (no nonce reuse)",
        "iv_counter != self.iv_next.get(stream, 0)",
        [T_SECURITY],
        id="iv-counter",
    ),
    _never(
        OPSTATE,
        "ImportRules.check_bundle",
        "bundle epoch = current epoch",
        "epoch != self.epoch",
        [T_SECURITY],
        id="epoch-match",
    ),
    _never(
        OPSTATE,
        "ImportRules.check_bundle",
        "no bundle after FAILED or commit",
        "self.state not in (ImportOpState.MEMORY_IMPORT, ImportOpState.STATE_IMPORT)",
        [T_SECURITY],
        id="import-state",
    ),
    Mutant(
        "immutable-once",
        "the guest context is accepted once, never as a stream bundle",
        OPSTATE,
        "ImportRules.check_bundle",
        "return kind is not BundleType.IMMUTABLE_STATE",
        "return True",
        (T_SECURITY,),
    ),
    _never(
        OPSTATE,
        "ImportRules.accept_bundle",
        "each state bundle at most once",
        "kind in self.state_received",
        [T_SECURITY],
        id="state-once",
    ),
    _never(
        OPSTATE,
        "ImportRules.issue_abort_token",
        "no abort token after commit",
        "self.committed",
        [T_MIGFW, T_MODEL],
        id="abort-after-commit",
    ),
    # -- source: the op-states (firmware/opstate.py ExportSession) ------------------------------------------
    _never(
        OPSTATE,
        "ExportSession.emit_start_token",
        "start token only when every page is exported and clean",
        "not all_pages_clean",
        [T_DIRTY],
        id="start-token-clean",
    ),
    _never(
        OPSTATE,
        "ExportSession.emit_start_token",
        "start token only after all state bundles",
        "self.state_exported != STATE_BUNDLES",
        [T_SECURITY],
        id="start-token-state",
    ),
    Mutant(
        "abort-local-frozen",
        "a frozen source never resumes without the abort token",
        OPSTATE,
        "ExportSession.abort_local",
        "if self.state not in (ExportOpState.LIVE_EXPORT, ExportOpState.PAUSED_EXPORT):\n"
        '            raise _bad_state("EXPORT_ABORT without token"',
        'if False:\n            raise _bad_state("EXPORT_ABORT without token"',
        (T_MODEL,),
    ),
    # -- firmware/migration.py: MACs, GPA once per epoch, tokens, single-use keys ---------------------------
    Mutant(
        "hold-harvest-folded",
        "the pages export_pause harvests once the VM is held count as dirty until exported again",
        MIGRATION,
        "MigrationFirmware.export_pause",
        "            if len(dirty):\n"
        "                exp.clean[dirty.astype(np.intp)] = False\n"
        "            populated = exp.populated_now()\n",
        "            populated = exp.populated_now()\n",
        (f"{T_MIGFW}::test_start_token_refused_while_a_page_is_dirty",),
    ),
    Mutant(
        "final-harvest",
        "export_final's start token sees the harvest made with the state capture",
        MIGRATION,
        "MigrationFirmware.export_final",
        "bundles.append(self._export_start_token(exp, handle, stream, dirty))",
        "bundles.append(self._export_start_token(exp, handle, stream, dirty[:0]))",
        (f"{T_MIGFW}::test_start_token_refused_over_a_write_after_the_hold",),
    ),
    Mutant(
        "switchover-harvest",
        "export_switchover's harvest, made after the capture with the VM held, counts as dirty",
        MIGRATION,
        "MigrationFirmware.export_switchover",
        "            exp.captured = (vcpu, device)\n"
        "            if len(dirty):\n"
        "                clean[dirty.astype(np.intp)] = False\n",
        "            exp.captured = (vcpu, device)\n",
        (f"{T_MIGFW}::test_switchover_seals_the_pages_written_since_the_last_round_itself",),
    ),
    Mutant(
        "switchover-token-harvest",
        "export_switchover's start token rests on a harvest made after the pages were sealed",
        MIGRATION,
        "MigrationFirmware.export_switchover",
        "dirty = hw.take_dirty(fresh=True) if len(left) else dirty[:0]",
        "dirty = dirty[:0]",
        (f"{T_MIGFW}::test_switchover_refuses_the_start_token_over_a_write_while_it_sealed",),
    ),
    Mutant(
        "final-after-switchover-harvest",
        "export_final after a switchover that named its pages still harvests after the engine sealed them",
        MIGRATION,
        "MigrationFirmware.export_final",
        "dirty = exp.hw.take_dirty(fresh=True)",
        "dirty = np.zeros(0, dtype=np.uint64)",
        (f"{T_MIGFW}::test_final_after_a_switchover_refuses_the_token_over_a_write_while_the_streams_sealed",),
    ),
    Mutant(
        "switchover-seals-what-is-left",
        "export_switchover seals every populated page not exported since its last write",
        MIGRATION,
        "MigrationFirmware.export_switchover",
        "left = _unexported(clean, populated)",
        "left = np.zeros(0, dtype=np.uint64)",
        (
            f"{T_MIGFW}::test_switchover_seals_the_pages_written_since_the_last_round_itself",
            f"{T_MIGFW}::test_switchover_seals_a_populated_page_never_exported",
        ),
    ),
    Mutant(
        "bundle-mac",
        "every bundle's header and metadata MAC'd under K_f",
        MIGRATION,
        "MigrationFirmware._apply",
        "imp.aead.decrypt(wire.gcm_iv(header.iv_counter, header.stream), mac, head + metadata)",
        "(mac, head, metadata)",
        (T_STREAM,),
    ),
    _never(
        MIGRATION,
        "_Import.claim_gfns",
        "a GPA at most once per epoch",
        "self.claimed[rows].any()",
        [T_DATAPATH],
        id="gpa-once",
    ),
    _never(
        MIGRATION,
        "_Import.claim_gfns",
        "a GPA at most once in a bundle",
        "(ordered[1:] == ordered[:-1]).any()",
        [T_DATAPATH],
        id="gpa-once-in-bundle",
    ),
    Mutant(
        "hold-names-unexported",
        "export_pause names every page the firmware's clean map says is unexported, not only the fresh harvest",
        MIGRATION,
        "MigrationFirmware.export_pause",
        "            return _unexported(exp.clean, populated)\n",
        "            return dirty\n",
        (T_MIGFW,),
    ),
    Mutant(
        "token-waits-for-writes",
        "an epoch or start token is applied only once every verified page before it is in guest memory",
        MIGRATION,
        "MigrationFirmware.import_bundle",
        "                self._written.wait_for(lambda: imp.writing == 0)\n            try:",
        "                pass\n            try:",
        (T_PARALLEL,),
    ),
    Mutant(
        "write-failure-fails",
        "a write the hardware refused fails the import",
        MIGRATION,
        "MigrationFirmware.import_bundle",
        "                if not written:  # counted as accepted, not in memory: nothing may certify this import now",
        "                if False:",
        (T_PARALLEL,),
    ),
    Mutant(
        "discard-waits-for-writes",
        "a discarded import's hardware is released only after its writes in flight",
        MIGRATION,
        "MigrationFirmware.import_discard",
        "            self._written.wait_for(lambda: imp.writing == 0)  # and none is left writing to the hardware",
        "            pass",
        (T_PARALLEL,),
    ),
    Mutant(
        "gpa-epoch-reset",
        "the GPAs claimed are forgotten when the epoch closes (a dirty round sends a page again)",
        MIGRATION,
        "_Import.claim_gfns",
        "if self.claimed is None or self.claimed_epoch != self.rules.epoch:",
        "if self.claimed is None:",
        (T_DATAPATH,),
    ),
    Mutant(
        "abort-token-mac",
        "a frozen source resumes only with the abort token MAC'd under K_b",
        MIGRATION,
        "MigrationFirmware.export_abort_with_token",
        "if exp.k_b is None or not _check_abort_token(exp.k_b, exp.session_id, token):",
        "if exp.k_b is None:",
        (T_MIGFW,),
    ),
    _never(
        MIGRATION,
        "MigrationFirmware.ma_import_install_forward_key",
        "K_f installed once per import",
        "imp.k_f is not None",
        [T_SECURITY],
        id="kf-single-use",
    ),
    _never(
        MIGRATION,
        "MigrationFirmware.ma_import_generate_backward_key",
        "K_b generated once per import",
        "imp.k_b is not None",
        [T_SECURITY],
        id="kb-single-use",
    ),
    _never(
        MIGRATION,
        "MigrationFirmware.ma_export_prepare",
        "one export session at a time (K_f single use)",
        "handle in self._exports and self._exports[handle].session.state is not ExportOpState.RUNNABLE",
        [T_SECURITY],
        id="export-one-session",
    ),
    _never(
        MIGRATION,
        "MigrationFirmware.ma_export_prepare",
        "export only if the guest policy has MIGRATE_MA",
        "not ctx.policy.migrate_ma",
        [T_MIGFW],
        id="migrate-ma",
    ),
    # -- guest messages (firmware/guest_request.py) -----------------------------------------------------
    Mutant(
        "guest-seqno",
        "guest message sequence numbers strictly increase (no replay)",
        GUEST_REQUEST,
        "handle_guest_request",
        "if header.msg_seqno != last + 1 or header.msg_version != 1:",
        "if header.msg_version != 1:",
        (T_GUEST,),
    ),
    Mutant(
        "report-vmpl",
        "a report's VMPL is not below the requester's",
        GUEST_REQUEST,
        "_report_response",
        "    if not requester_vmpl <= req.vmpl <= 3:\n        return ReportRsp(",
        "    if not req.vmpl <= 3:\n        return ReportRsp(",
        (T_GUEST,),
    ),
    Mutant(
        "key-vmpl",
        "a derived key's VMPL is not below the requester's",
        GUEST_REQUEST,
        "_key_response",
        "    if not requester_vmpl <= req.vmpl <= 3:\n        return failed",
        "    if not req.vmpl <= 3:\n        return failed",
        (T_SECURITY,),
    ),
    _never(
        GUEST_REQUEST,
        "_key_response",
        "a derived key's GUEST_SVN not above the launch SVN",
        "fields & GuestFieldSelect.GUEST_SVN and req.guest_svn > ctx.identity.guest_svn",
        [T_SECURITY],
        id="key-svn",
    ),
    # -- the migration agent (agent/) ------------------------------------------------------------------
    _never(
        "cvmotion/agent/ratls.py",
        "verify_ratls_certificate",
        "RA-TLS report_data binds the TLS key",
        "verified.report.report_data != report_data_for(key)",
        [T_RATLS],
        id="ratls-report-data",
    ),
    Mutant(
        "transcript",
        "both MAs saw the same HELLOs and certificates (no splice, no downgrade)",
        "cvmotion/agent/session.py",
        "SessionBase._check_transcript",
        "        if differ:\n            raise ProtocolError(",
        "        if False:\n            raise ProtocolError(",
        (T_AGENT_ATTACKS, T_SESSION),
    ),
    Mutant(
        "policy-product",
        "same product family",
        POLICY,
        "evaluate",
        "c.rule(src.product is dst.product,",
        "c.rule(True,",
        (T_POLICY,),
    ),
    _always(
        POLICY,
        "evaluate",
        "peer MA measurement allowed by the VM",
        "peer.ma_measurement in policy.allowed_ma_measurements",
        [T_POLICY],
        id="policy-ma-vm",
    ),
    _always(
        POLICY,
        "evaluate",
        "peer MA measurement allowed by this host",
        "peer.ma_measurement in config.allowed_ma_measurements",
        [T_POLICY],
        id="policy-ma-host",
    ),
    Mutant(
        "policy-ma-flags",
        "peer MA not debuggable, not migratable, VMPL 0",
        POLICY,
        "evaluate",
        "ma_ok = not peer.ma_policy.debug and not peer.ma_policy.migrate_ma and peer.ma_vmpl == 0",
        "ma_ok = True",
        (T_POLICY,),
    ),
    _always(POLICY, "evaluate", "destination TCB meets the VM's minimum", "not short", [T_POLICY], id="policy-min-tcb"),
    _always(
        POLICY,
        "evaluate",
        "peer chip not revoked",
        "peer.chip_id not in config.revoked_chip_ids",
        [T_POLICY],
        id="policy-revoked-chip",
    ),
    _always(
        POLICY,
        "evaluate",
        "peer TCB not revoked",
        "(peer.product, peer.reported_tcb) not in config.revoked_tcbs",
        [T_POLICY],
        id="policy-revoked-tcb",
    ),
    _always(
        POLICY,
        "evaluate",
        "guest policy allows migration (MIGRATE_MA)",
        "gp.migrate_ma",
        [T_POLICY],
        id="policy-migrate-ma",
    ),
    _always(
        POLICY,
        "evaluate",
        "DEBUG guests only where allowed",
        "not gp.debug or policy.allow_debug",
        [T_POLICY],
        id="policy-debug",
    ),
    _always(
        POLICY, "evaluate", "no policy_svn rollback", "dst.policy_svn >= src.policy_svn", [T_POLICY], id="policy-svn"
    ),
    _always(
        POLICY,
        "evaluate",
        "policy document bound to HOST_DATA",
        "hashlib.sha256(policy.canonical()).digest() == guest.host_data",
        [T_POLICY],
        id="policy-host-data",
    ),
    _always(
        POLICY,
        "_pool_rules",
        "pool credential names the attested chip",
        "cred.chip_id == peer.chip_id",
        [T_POLICY],
        id="policy-pool-chip",
    ),
    _always(
        POLICY,
        "_pool_rules",
        "peer's pool allowed by the VM",
        "cred.pool in policy.allowed_pools",
        [T_POLICY],
        id="policy-pool",
    ),
    # -- the verifier (attestation/) -------------------------------------------------------------------
    Mutant(
        "report-signature",
        "report signed by the endorsement key",
        VERIFY,
        "_verify_signature",
        "key.verify(signature, raw[:SIGNED_LEN], _ECDSA_SHA384)",
        "(signature, raw)",
        (T_VERIFY,),
    ),
    Mutant(
        "chain-signature",
        "each certificate signed by its issuer (RSASSA-PSS)",
        "cvmotion/attestation/evidence.py",
        "verify_pss_signature",
        "key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())",
        "(cert, hashes)",
        (T_VERIFY,),
    ),
    _never(
        VERIFY,
        "verify_report",
        "REPORTED_TCB equals the VCEK's TCB",
        "reported != endorsed.extensions.tcb",
        [T_VERIFY],
        id="tcb-binding",
    ),
    _never(
        VERIFY, "_check_hwid", "VCEK hwID is the report's CHIP_ID", "hwid != chip_id[:n]", [T_VERIFY], id="hwid-binding"
    ),
    _never(
        "cvmotion/attestation/evidence.py",
        "check_validity",
        "certificates not expired",
        "at > cert.not_valid_after_utc",
        [T_VERIFY],
        id="cert-expiry",
    ),
    # -- the platform process's host boundary (platformd/server.py) ------------------------------------
    Mutant(
        "host-methods",
        "host and VM clients only send their own role's commands (the role's enum is its allowlist)",
        PLATFORM,
        "PlatformService.dispatch",
        "table = self._vm_table if role is _Role.VM else self._host_table",
        "table = {**self._host_table, **self._vm_table}",
        (T_PLATFORM,),
    ),
    Mutant(
        "vm-dirty-owner",
        "only the VM process that attached a VM feeds its dirty pages",
        PLATFORM,
        "PlatformService._vm_dirty",
        "if hw is None or not hw.attached_by(call.endpoint):",
        "if hw is None:",
        (T_PLATFORM,),
    ),
    # -- the VM process (vmd/dirty.py): the SP's dirty view only grows -------------------------------
    Mutant(
        "dirty-start-clears",
        "starting dirty tracking drops no bit the SP has not seen",
        "cvmotion/vmd/dirty.py",
        "DirtyViews.start",
        '        self.take("engine")\n',
        "        with self._lock:\n            self._vm.memory.vmm_dirty.take()\n",
        (T_DIRTY,),
    ),
    # -- the secure processor's boundary: hardware, handles, decommission, commit receipt ---------------
    _never(
        PLATFORM,
        "PlatformService._claim",
        "hardware serves one guest (no second LAUNCH or import over it: no fork, no page oracle)",
        "hw.claimed",
        [T_PLATFORM],
        id="hardware-claimed",
    ),
    _never(
        HARDWARE,
        "check_launch_ranges",
        "launch ranges never cover the secrets page",
        "gpa < SECRETS_PAGE_GPA + PAGE and gpa + length > SECRETS_PAGE_GPA",
        [T_PLATFORM],
        id="launch-secrets-page",
    ),
    _never(
        PLATFORM,
        "PlatformService._vm_guest",
        "host commands name only VM guests (never the MA's context)",
        "handle not in self.handles.values()",
        [T_PLATFORM],
        id="vm-guests-only",
    ),
    _never(
        "cvmotion/firmware/device.py",
        "SecureProcessor.decommission",
        "DECOMMISSION only where the guest is not the only copy",
        "ctx.op_state not in _DECOMMISSIONABLE",
        [T_TABLE],
        id="decommission-op-state",
    ),
    Mutant(
        "commit-receipt",
        "the source decommissions only on the destination firmware's commit receipt (MAC under K_b)",
        MIGRATION,
        "MigrationFirmware.export_finish",
        "                or not _check_commit_receipt(exp.k_b, exp.session_id, exp.start_token_digest, receipt)\n",
        "",
        (T_MIGFW, T_TABLE),
    ),
    # -- host-to-host calls (host/peers.py), options, provisioning, the DMA device --------------------
    Mutant(
        "peer-signature",
        "host-to-host requests signed by the calling host's key",
        PEERS,
        "PeerAuth.verify",
        "            public.verify(signature, _message(method, path, date, nonce, body), ec.ECDSA(hashes.SHA384()))\n",
        "",
        (T_PEERS,),
    ),
    _never(
        PEERS, "PeerAuth._fresh", "a signed request is accepted once", "nonce in self._seen", [T_PEERS], id="peer-nonce"
    ),
    _never(
        PEERS,
        "PeerAuth.verify",
        "a signed request is fresh (date within the skew)",
        "abs(now - int(date)) > SKEW",
        [T_PEERS],
        id="peer-date",
    ),
    Mutant(
        "peer-ca",
        "the caller's credential was issued by a trusted pool CA",
        PEERS,
        "PeerAuth._check_certificate",
        "                cert.verify_directly_issued_by(ca)\n",
        "                pass\n",
        (T_PEERS,),
    ),
    _never(
        "cvmotion/migration/options.py",
        "_parse",
        "unknown migration options refused, not dropped",
        "unknown",
        [T_OPTIONS],
        id="options-unknown",
    ),
    _never(
        "cvmotion/host/lifecycle.py",
        "VmLifecycle.delete",
        "a VM whose migration has not settled is not deleted (409 unless forced)",
        "record.state in UNSETTLED",
        [T_DELETE],
        id="delete-unsettled",
    ),
    # -- the secure processor's state across a platform restart (firmware/sp_seal.py, platformd) --------------
    _never(
        SP_SEAL,
        "open_sealed",
        "a sealed SP state opens once, and only the newest (no rollback, no fork)",
        "pending is None or not hmac.compare_digest(pending, hashlib.sha256(blob).digest())",
        [T_SEAL, T_SEAL_MIG],
        id="sp-state-once",
    ),
    _never(
        SP_SEAL,
        "SpNvram.read",
        "the replay-protected counter's record is the SP's (MAC)",
        "len(raw) != _NV.size + 32 or not hmac.compare_digest(mac, self._mac(body))",
        [T_SEAL],
        id="sp-nvram-mac",
    ),
    _never(
        "cvmotion/firmware/device.py",
        "SecureProcessor._check_live",
        "a sealed SP refuses every command",
        "self._stopped",
        [T_SEAL],
        id="sp-sealed-stops",
    ),
    Mutant(
        "sp-detached-export",
        "a guest restored mid-export does not run until its export is aborted or finished",
        MIGRATION,
        "MigrationFirmware.can_run",
        "                if exp.detached:\n                    return False\n",
        "",
        (T_SEAL_MIG,),
    ),
    _never(
        "cvmotion/firmware/sp_snapshot.py",
        "check_sealable",
        "no seal while an import is in flight (its hardware binding cannot be carried)",
        "imp.rules.state in _IN_FLIGHT_IMPORT",
        [T_SEAL_MIG],
        id="sp-seal-import",
    ),
    Mutant(
        "reattach-token",
        "after a platform restart a guest is bound only to the VM process holding its hardware token",
        PLATFORM,
        "PlatformService._rebind",
        "if restored is None or not token_matches(restored.token, token):",
        "if restored is None:",
        (T_SUCCESSION,),
    ),
    Mutant(
        "reattach-claimed",
        "re-attaching hardware is claimed: never launched over",
        PLATFORM,
        "PlatformService._rebind",
        "        hw.claimed = True\n        restored = self._restored.get(name)\n",
        "        restored = self._restored.get(name)\n",
        (T_SUCCESSION,),
    ),
    Mutant(
        "dma-quiesce",
        "a paused VM's DMA device writes nothing (the start token's clean check would otherwise fail)",
        "cvmotion/vmd/process.py",
        "VmProcess.pause",
        "                self.dma.quiesce()",
        "                pass",
        ("tests/unit/vmd/test_pause_quiesces_dma.py", T_DMA),
    ),
    Mutant(
        "lane-inline-only",
        "an RPC lane serves only the serving end's inline methods, whatever its peer writes on it",
        "cvmotion/ipc/rpc.py",
        "Endpoint._lane_loop",
        'if header.get("kind") == "call" and method in self._inline:',
        'if header.get("kind") == "call":',
        ("tests/unit/ipc/test_rpc_lane.py",),
    ),
    Mutant(
        "lane-late-answer",
        "an RPC lane whose call timed out is ended, so a late answer is never taken for the next call's",
        "cvmotion/ipc/rpc.py",
        "Endpoint._call_on_lane",
        "        except TimeoutError:\n            self._drop_lane(lane)\n",
        "        except TimeoutError:\n",
        ("tests/unit/ipc/test_rpc_lane.py",),
    ),
)
