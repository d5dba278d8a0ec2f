"""control.placement: each filter's reason, and the spread order (table-driven)."""

from __future__ import annotations

import pytest

from cvmotion.control.placement import Candidate, Demand, NoHost, choose_host
from cvmotion.control.resources import HostState


def host(name: str, **kw: object) -> Candidate:
    base: dict[str, object] = dict(
        pool="a", product="Genoa", tcb=10, state=HostState.AVAILABLE, vcpus=16, memory_gib=64,
        used_vcpus=0, used_memory_gib=0, vm_count=0,
    )  # fmt: skip
    base.update(kw)
    return Candidate(name, **base)  # type: ignore[arg-type]


def any_pool(_pool: str) -> bool:
    return True


@pytest.mark.parametrize(
    ("candidate", "demand", "reason"),
    [
        pytest.param(host("h", state=HostState.UNAVAILABLE), Demand(2, 8), "Unavailable", id="unavailable"),
        pytest.param(host("h", product="Milan"), Demand(2, 8, product="Genoa"), "product Milan", id="product"),
        pytest.param(host("h", tcb=5), Demand(2, 8, minimum_tcb=6), "below the minimum", id="tcb"),
        pytest.param(host("h", used_vcpus=15), Demand(2, 8), "vCPUs free", id="vcpus"),
        pytest.param(host("h", used_memory_gib=60), Demand(2, 8), "GiB free", id="memory"),
        pytest.param(host("h"), Demand(2, 8, pinned_host="other"), "not the pinned host", id="pinned"),
        pytest.param(host("h"), Demand(2, 8, exclude="h"), "already there", id="source"),
    ],
)
def test_filters_give_reasons(candidate: Candidate, demand: Demand, reason: str) -> None:
    with pytest.raises(NoHost, match=reason):
        choose_host([candidate], demand, any_pool)


def test_policy_pool_filter() -> None:
    with pytest.raises(NoHost, match="not allowed by policy"):
        choose_host([host("h", pool="b")], Demand(2, 8), lambda pool: pool == "a")


def test_spread_then_free_memory_then_name() -> None:
    hosts = [host("c", vm_count=1), host("b", used_memory_gib=8), host("a", used_memory_gib=16)]
    assert choose_host(hosts, Demand(2, 8), any_pool).name == "b"
    assert choose_host([host("b"), host("a")], Demand(2, 8), any_pool).name == "a"


def test_no_hosts() -> None:
    with pytest.raises(NoHost, match="no hosts are registered"):
        choose_host([], Demand(2, 8), any_pool)
