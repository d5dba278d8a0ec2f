"""The demo's client load cannot fill the kvstore guest's table, however fast the clients run.

The demo once wrote a new key per request into a 1,024-slot table, so a machine whose clients ran faster
filled it (PUTs answered FULL). Here the demo's own ``Load`` runs straight against a real guest's cvm-io,
without HTTP in between: many times the demo's request rate, bounded by count, not by time.
"""

from __future__ import annotations

import time
from typing import Any

from vmm_helpers import VmFactory

from cvmotion.cli.demo import KEYS_PER_CLIENT, Load
from cvmotion.vmm.devices.cvmio import CvmIo
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.workloads import KvClient, KvOp, KvStats, decode_response, encode_request

DEMO_MEMORY = 64 * MIB  # the demo's --memory default


class GuestEndpoint:
    """The load's endpoint as the guest itself: each request goes straight to the kvstore over cvm-io.

    A device failure raises ``DeviceError``, a ``CvmError``, which the load counts as a failed request.
    """

    def __init__(self, cvmio: CvmIo) -> None:
        self._cvmio = cvmio

    def kv(self, op: str, key: str, value: str = "") -> dict[str, Any]:
        reply = self._cvmio.submit(encode_request(KvOp[op.upper()], key.encode(), value.encode()), 10.0)
        status, data = decode_response(reply)
        return {"status": status.name, "value": data.decode() if data else None}


def test_default_table_is_sized_from_memory(vms: VmFactory) -> None:
    small = vms.boot("kvstore", "hb_ms=1000", memory=16 * MIB)
    large = vms.boot("kvstore", "hb_ms=1000", memory=DEMO_MEMORY)
    for vm in (small, large):
        assert vm.console.wait_for(r"^kvstore: ready", 30)
    small_slots = KvClient(small.cvmio).stats().slots
    large_slots = KvClient(large.cvmio).stats().slots
    # A quarter of the RAM above the 4 MiB base, in 1,096-byte slots.
    assert small_slots == (16 - 4) * MIB // 4 // 1096
    assert large_slots == (64 - 4) * MIB // 4 // 1096
    assert large_slots > 10 * 1024


def test_demo_load_at_many_times_its_rate_never_fills_the_store(vms: VmFactory) -> None:
    # A 16 MiB guest's table (2,870 slots) is far smaller than the demo's, so a load that wrote a new key per
    # request would fill it within this run; the demo's bounded key set never can.
    vm = vms.boot("kvstore", "hb_ms=1000", memory=16 * MIB)
    assert vm.console.wait_for(r"^kvstore: ready", 30)
    kv = KvClient(vm.cvmio)
    slots = kv.stats().slots
    clients = 4
    requests = 3 * slots  # about 2.4 x slots PUTs: more distinct keys than the table holds, if keys were unique
    load = Load(GuestEndpoint(vm.cvmio), clients, seed=7, max_requests=requests)
    t0 = time.monotonic()
    load.start()
    assert load.wait_requests(requests, 240), f"{load.requests} of {requests} requests in 240 s"
    load.finish()
    elapsed = time.monotonic() - t0
    assert load.full == 0
    assert load.failed == 0
    assert load.wrong_reads == 0
    assert load.acked_writes > slots  # the run wrote more often than the table has slots
    stats: KvStats = kv.stats()
    assert stats.keys == len(load.acked) <= clients * KEYS_PER_CLIENT
    for key, value in load.acked.items():  # the latest acknowledged value of every key, none rolled back
        assert kv.get(key.encode()) == value.encode()
    # For the record (not asserted: the rate depends on the machine): the demo over HTTP ran ~500 requests/s.
    print(f"{load.requests} requests in {elapsed:.2f} s ({load.requests / elapsed:.0f}/s) against {slots} slots")
