"""Key canaries through a whole session at the firmware boundary: the MAs' set-up and the sealed stream.

K_f and K_b (read inside the in-process SPs), the guest's VMPCK0..3 (its secrets page is guest memory that
migrates) and keys the SP derives for the guest (VMRK- and VCEK-rooted, asked for over VMPCK0 as the guest
would) must not appear, whole, halved or hex-encoded, in any byte the untrusted hosts carry or are answered:
the relayed MA frames, the session summaries, every bundle, the abort token and the relayed guest messages.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from agent_harness import FakeClock, Pair, default_policy, make_host

from cvmotion.abi.wire import BundleType, bundle_capacity
from cvmotion.agent.pool import PoolAuthority
from cvmotion.firmware.vendor import Vendor
from cvmotion.testing.canary import find_canaries, guest_key_canaries, session_key_canaries
from cvmotion.vmm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from mig_harness import MEMORY, FakeHardware  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SECRETS_GPA = 0x7000


def _fragments(labelled: dict[str, bytes]) -> tuple[list[str], list[bytes]]:
    labels: list[str] = []
    out: list[bytes] = []
    for label, key in labelled.items():
        for part, fragment in (("", key), (" (first half)", key[:16]), (" (second half)", key[16:])):
            labels.append(label + part)
            out.append(fragment)
        labels.append(label + " (hex)")
        out.append(key.hex().encode())
    return labels, out


def test_no_session_or_guest_key_in_anything_the_hosts_carry(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock)
    dst = make_host(emulated_vendor, tmp_path / "d", pool_ca, clock)
    pair = Pair(src, dst, default_policy())
    carried: list[bytes] = []

    def relay(message: bytes) -> bytes:
        carried.append(message)
        response = src.sp.guest_request(pair.handle, message)
        carried.append(response)
        return response

    vmpcks = src.sp._guest_ctx(pair.handle).vmpcks
    derived = guest_key_canaries(vmpcks[0], relay)
    pair.run()
    assert pair.source.state.name == "ESTABLISHED"
    assert pair.destination.state.name == "ESTABLISHED"
    carried += [frame for _, frame in pair.relayed]
    carried += [repr(pair.source.result).encode(), repr(pair.destination.result).encode()]

    # The guest's memory: its secrets page (VMPCK0..3 at 0x20) and a working set; all of it migrates, sealed.
    hw = FakeHardware(GuestMemory(MEMORY))
    rng = random.Random(21)
    hw.memory.write(SECRETS_GPA + 0x20, b"".join(vmpcks))
    for gfn in range(0x200, 0x240):
        hw.memory.write(gfn << 12, rng.randbytes(4096))
    mig = src.sp.migration
    mig.export_start(pair.handle, hw)
    keys = session_key_canaries(src.sp, export=pair.handle) | session_key_canaries(dst.sp, ref=pair.ref)
    assert {"K_f", "K_b"} <= set(keys)
    assert keys["K_f"] == keys["K_f (destination copy)"]
    assert keys["K_b"] == keys["K_b (source copy)"]
    carried.append(mig.export_immutable(pair.handle, 0))
    out = memoryview(bytearray(bundle_capacity(64)))
    gfns = [g for gpa, n in hw.memory.populated_ranges() for g in range(gpa >> 12, (gpa + n) >> 12)]
    for i in range(0, len(gfns), 64):
        carried.append(bytes(out[: mig.export_memory(pair.handle, 0, gfns[i : i + 64], out)]))
    carried.append(mig.export_epoch_token(pair.handle, 0))
    hw.paused = True
    mig.export_pause(pair.handle)
    for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
        carried.append(mig.export_state(pair.handle, 0, kind))
    carried.append(mig.export_start_token(pair.handle, 0))
    # The destination refuses (its hardware here holds no memory) and hands the source its abort token.
    token = dst.sp.migration.import_abort(pair.ref)
    carried.append(token)
    mig.export_abort_with_token(pair.handle, token)

    labels, canaries = _fragments({**keys, **{f"VMPCK{i}": k for i, k in enumerate(vmpcks)}, **derived})
    assert len(carried) > 10
    # Not vacuous: the plaintext memory holds the VMPCKs the scan looks for.
    assert find_canaries([hw.memory.read(SECRETS_GPA, 4096)], canaries)
    leaked = [labels[i] for i in find_canaries(carried, canaries)]
    assert not leaked, f"the hosts carried {leaked}"
