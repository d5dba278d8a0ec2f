"""Host-to-host requests from outside the pool, and hostile ones from inside it (finding 5).

``POST /v1/migrations/incoming`` creates a VM process and files on the destination, and ``/outcome`` hands out
verdicts: both answer only requests signed with a host credential the pool CA issued (``host.peers``), and a
signed request is still validated — one name rule, the spec named as the VM, memory within the SKU catalogue,
options known and bounded — so nothing is written outside the data directory and the host keeps serving.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from mig_world import MEMORY, Victim, World

from cvmotion.host.peers import PeerAuth
from cvmotion.testing.hosts import ApiError
from cvmotion.vmd.protocol import VmSpec

pytestmark = pytest.mark.timeout(180)

A, B = "host-a", "host-b"
INCOMING = "/v1/migrations/incoming"


def _body(name: str) -> dict[str, Any]:
    return {
        "vm": name,
        "spec": json.loads(VmSpec(name=name, memory=MEMORY, image="memdirty").to_json()),
        "session_id": "ab" * 16,
        "options": {"io_timeout": 5.0},
        "source": A,
        "source_migration": "0123456789ab",
        "policy": 0x30000,
    }


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_outsiders_get_401_and_nothing_is_created(attack_world: World, victim: Victim) -> None:
    world = attack_world
    before = _files(world.b.data_dir.parent)
    for method, path, body in (("POST", INCOMING, _body("intruder")), ("GET", "/v1/migrations/abc/outcome", None)):
        response = httpx.request(method, f"{world.b.url}{path}", json=body, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["kind"] == "Unauthorized"
    # A signed request replayed by someone who saw it on the wire: refused by its nonce. (The original is
    # refused for a reason of its own, after authentication, so no VM is created either way.)
    body = _body("replayed")
    body["spec"]["memory"] = 1 << 50
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json", **PeerAuth.load(world.a.data_dir).sign("POST", INCOMING, content)}
    with pytest.raises(ApiError) as first:
        _post(world, content, headers)
    assert first.value.status == 400
    with pytest.raises(ApiError) as replay:
        _post(world, content, headers)
    assert replay.value.status == 401
    assert "intruder" not in world.b.vms()
    created = {p for p in _files(world.b.data_dir.parent) - before if "intruder" in str(p)}
    assert not created
    world.finish(victim, expect_host=A)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vm": "../x"}, "vm"),
        ({"spec.name": "../x"}, "spec.name"),
        ({"spec.name": "other-vm"}, "is not the VM"),
        ({"vm": "x\n"}, "vm"),
        ({"spec.memory": 1 << 50}, "spec.memory"),
        ({"spec.memory": 1 << 10}, "spec.memory"),
        ({"spec.vcpus": 100_000}, "spec.vcpus"),
        ({"spec.unknown": 1}, "spec.unknown"),
        ({"options": {"io_timeout": 1e9}}, "io timeout"),
        ({"options": {"commit_timeout": "soon"}}, "commit_timeout"),
        ({"options": {"no_such_option": 1}}, "unknown migration option"),
        ({"session_id": "zz"}, "session_id"),
        ({"policy": -1}, "policy"),
        ({"extra": True}, "extra"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_signed_but_invalid_incoming_requests_get_400(
    attack_world: World, victim: Victim, change: dict[str, Any], message: str
) -> None:
    world = attack_world
    body = copy.deepcopy(_body("valid-name"))
    for key, value in change.items():
        target, _, leaf = key.rpartition(".")
        (body[target] if target else body)[leaf] = value
    before = _files(world.b.data_dir.parent.parent)
    with pytest.raises(ApiError) as refused:
        world.b.api("POST", INCOMING, body, signed_by=world.a)
    assert refused.value.status == 400, refused.value
    assert message in str(refused.value.body), refused.value.body
    assert not {p for p in _files(world.b.data_dir.parent.parent) - before if p.name == "x" or "valid-name" in str(p)}
    assert world.b.api("GET", "/v1/host")["name"] == B  # still serving
    world.finish(victim, expect_host=A)


def _post(world: World, content: bytes, headers: dict[str, str]) -> Any:
    response = httpx.post(f"{world.b.url}{INCOMING}", content=content, headers=headers, timeout=60)
    if response.status_code >= 300:
        raise ApiError(response.status_code, response.json(), "POST incoming")
    return response.json()
