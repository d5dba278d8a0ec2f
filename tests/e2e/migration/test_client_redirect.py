"""Clients of a migrated VM: the source host sends them to the destination (307 + Location) instead of an
error, also when their request was waiting on the paused guest at the switchover."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from mig_world import Victim, World

from cvmotion.abi.wire import BundleType
from cvmotion.testing.tampering import On, bundle, freeze

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def kv_vm(attack_world: World) -> Iterator[Victim]:
    victim = attack_world.new_kv_vm("redirect-kv")
    yield victim
    attack_world.drop_vm(victim)


def _kv(url: str, name: str, op: str, key: str, value: str = "", *, follow: bool = False) -> httpx.Response:
    body = {"op": op, "key": key, "value": value}
    return httpx.post(f"{url}/v1/vms/{name}/kv", json=body, timeout=30, follow_redirects=follow)


def test_a_request_caught_by_the_switchover_is_redirected(attack_world: World, kv_vm: Victim) -> None:
    world = attack_world
    assert _kv(world.a.url, kv_vm.name, "put", "before", "1").json()["status"] == "OK"
    # Hold the start token: the source has paused the guest, the destination has not committed.
    mig = world.start_migration(kv_vm, On(bundle(BundleType.START_TOKEN), freeze))
    assert world.proxy.frozen.wait(60), "the migration never reached its start token"
    caught: list[httpx.Response] = []
    client = threading.Thread(target=lambda: caught.append(_kv(world.a.url, kv_vm.name, "put", "during", "2")))
    client.start()
    world.proxy.thaw()
    assert world.wait_migration(mig)["status"] == "completed"
    client.join(30)
    assert caught, "the client's request never returned"
    # Whether it waited on the paused guest or arrived after the move, the answer is where the VM went.
    moved = caught[0]
    location = f"{world.b.url}/v1/vms/{kv_vm.name}/kv"
    assert moved.status_code == 307, moved.text
    assert moved.headers["location"] == location
    assert moved.json()["error"]["kind"] == "Moved"

    # A client that follows redirects reaches the VM on its new host with the same request.
    after = _kv(world.a.url, kv_vm.name, "put", "after", "3", follow=True)
    assert after.status_code == 200
    assert after.json()["status"] == "OK"
    assert str(after.url) == location
    for key, value in (("before", "1"), ("after", "3")):
        assert _kv(world.b.url, kv_vm.name, "get", key).json()["value"] == value
    world.finish(kv_vm, expect_host="host-b")
