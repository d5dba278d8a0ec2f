"""The kvstore guest and its Scheduled Events mailbox (cvm-io GET_BLOB / POST_BLOB), and the pause window.

Both backends (KVM skipped where /dev/kvm is unusable): the guest reads the IMDS document the host puts in
its mailbox, reports each new incarnation, approves Scheduled events early through POST_BLOB, and keeps
serving requests throughout.
"""

from __future__ import annotations

import json
import time

from vmm_helpers import VmFactory

from cvmotion.abi.cvmio import BlobKind
from cvmotion.vmm.workloads import KvClient


def _document(incarnation: int, *events: tuple[str, str, str]) -> bytes:
    return json.dumps(
        {
            "DocumentIncarnation": incarnation,
            "Events": [
                {
                    "EventId": event_id,
                    "EventType": kind,
                    "ResourceType": "VirtualMachine",
                    "Resources": ["vm1"],
                    "EventStatus": status,
                    "NotBefore": "Fri, 04 Dec 2026 19:00:00 GMT" if status == "Scheduled" else "",
                    "Description": 'host update {"quoted": [1, 2]} \\ done',
                    "EventSource": "Platform",
                    "DurationInSeconds": -1,
                }
                for event_id, kind, status in events
            ],
        }
    ).encode()


def test_kvstore_reads_and_approves_scheduled_events(vms: VmFactory) -> None:
    vm = vms.boot("kvstore", "slots=64 se_ms=20")
    assert vm.console.wait_for(r"^kvstore: ready", 30)
    kv = KvClient(vm.cvmio)
    kv.put(b"before", b"1")
    vm.cvmio.set_blob(BlobKind.SCHEDULED_EVENTS, _document(1, ("ev-1", "Freeze", "Scheduled")))
    posted = vm.cvmio.wait_posted(30)
    assert posted is not None
    kind, body = posted
    assert kind is BlobKind.SCHEDULED_EVENTS
    assert json.loads(body) == {"StartRequests": [{"EventId": "ev-1"}]}
    assert vm.console.wait_for(r"^SE event id=ev-1 type=Freeze status=Scheduled$", 30)
    assert vm.console.wait_for(r"^SE incarnation=1 events=1$", 1)
    # A new incarnation: one started event (nothing to approve), one more scheduled.
    mark = vm.console.line_count
    vm.cvmio.set_blob(
        BlobKind.SCHEDULED_EVENTS,
        _document(2, ("ev-1", "Freeze", "Started"), ("ev-2", "Reboot", "Scheduled")),
    )
    posted = vm.cvmio.wait_posted(30)
    assert posted is not None
    assert json.loads(posted[1]) == {"StartRequests": [{"EventId": "ev-2"}]}
    assert vm.console.collect(r"^SE ", 4, 30, since=mark)[:3] == [
        "SE incarnation=2 events=2",
        "SE event id=ev-1 type=Freeze status=Started",
        "SE event id=ev-2 type=Reboot status=Scheduled",
    ]
    assert kv.get(b"before") == b"1"
    # A document it cannot parse is reported, not acted on.
    vm.cvmio.set_blob(BlobKind.SCHEDULED_EVENTS, b'{"DocumentIncarnation": 3, "Events": [{')
    assert vm.console.wait_for(r"^SE unreadable", 30)
    assert vm.cvmio.wait_posted(0) is None
    kv.put(b"after", b"2")
    assert kv.get(b"after") == b"2"


def test_pause_window_is_measured_on_the_monotonic_clock(vms: VmFactory) -> None:
    vm = vms.boot("kvstore", "slots=64 hb_ms=50")
    assert vm.console.collect(r"^HB ", 1, 30)
    assert vm.paused_since is None
    before = time.monotonic()
    vm.pause()
    assert vm.paused_since is not None
    assert before <= vm.paused_since <= time.monotonic()
    stopped = vm.paused_since
    pause = vm.resume()
    after = time.monotonic()
    assert pause is not None
    assert vm.last_pause == pause
    assert 0 < pause <= after - stopped
    assert vm.paused_since is None
    assert vm.resume() is None  # not paused: nothing measured
