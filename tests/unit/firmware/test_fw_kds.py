"""firmware.kds: AMD's KDS URL scheme, in process and over a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import UsageError
from cvmotion.firmware.certs import amd_extensions_of
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds, KdsError, vcek_path
from cvmotion.firmware.kds_http import KdsClient, KdsServer, parse_listen
from cvmotion.firmware.vendor import Vendor


@pytest.fixture(scope="module")
def chip(emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory) -> Chip:
    return Chip.create(tmp_path_factory.mktemp("kds-host"), emulated_vendor, Product.GENOA, seed=31)


@pytest.fixture(scope="module")
def server(emulated_vendor: Vendor) -> Iterator[KdsServer]:
    with KdsServer(Kds(emulated_vendor)) as srv:
        yield srv


def test_vcek_in_process(emulated_vendor: Vendor, chip: Chip) -> None:
    answer = Kds(emulated_vendor).handle("GET", vcek_path(chip.product, chip.hwid, chip.reported_tcb))
    assert answer.status == 200
    assert answer.content_type == "application/pkix-cert"
    assert ("X-Cvmotion-Platform", "emulated") in answer.headers
    cert = x509.load_der_x509_certificate(answer.body)
    assert amd_extensions_of(cert).hwid == chip.chip_id
    assert amd_extensions_of(cert).tcb == chip.reported_tcb


def test_path_is_amds(chip: Chip) -> None:
    tcb = TcbVersion(boot_loader=10, tee=0, snp=25, microcode=84)
    assert vcek_path(Product.GENOA, chip.hwid, tcb) == (
        f"/vcek/v1/Genoa/{chip.hwid.hex()}?blSPL=10&teeSPL=0&snpSPL=25&ucodeSPL=84"
    )
    turin = vcek_path(Product.TURIN, b"\xab" * 8, TcbVersion(1, 0, 2, 71, fmc=3))
    assert turin == "/vcek/v1/Turin/abababababababab?fmcSPL=3&blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71"


def _bad(chip: Chip) -> list[tuple[str, str, int, str]]:
    hwid = chip.hwid.hex()
    ok = "blSPL=10&teeSPL=0&snpSPL=25&ucodeSPL=84"
    return [
        ("GET", f"/vcek/v1/Rome/{hwid}?{ok}", 404, "unknown_product"),
        ("GET", f"/vcek/v1/Genoa/{'00' * 64}?{ok}", 404, "unknown_chip"),
        ("GET", f"/vcek/v1/Genoa/{hwid[:-2]}?{ok}", 400, "bad_hwid"),
        ("GET", f"/vcek/v1/Genoa/{'zz' * 64}?{ok}", 400, "bad_hwid"),
        ("GET", f"/vcek/v1/Genoa/{hwid}?blSPL=10&teeSPL=0&snpSPL=25", 400, "missing_spl"),
        ("GET", f"/vcek/v1/Genoa/{hwid}?blSPL=10&teeSPL=0&snpSPL=256&ucodeSPL=84", 400, "bad_spl"),
        ("GET", f"/vcek/v1/Genoa/{hwid}?blSPL=-1&teeSPL=0&snpSPL=25&ucodeSPL=84", 400, "bad_spl"),
        ("GET", f"/vcek/v1/Genoa/{hwid}?{ok}&fmcSPL=0", 400, "bad_query"),
        ("GET", f"/vcek/v1/Genoa/{hwid}?{ok}&blSPL=1", 400, "bad_query"),
        ("GET", "/vcek/v1/Genoa/cert_chain?x=1", 400, "bad_query"),
        ("GET", "/vcek/v2/Genoa/cert_chain", 404, "not_found"),
        ("GET", f"/vlek/v1/Genoa/{hwid}?{ok}", 404, "not_found"),
        ("POST", "/vcek/v1/Genoa/cert_chain", 405, "method_not_allowed"),
    ]


def test_bad_requests_in_process(emulated_vendor: Vendor, chip: Chip) -> None:
    kds = Kds(emulated_vendor)
    for method, target, status, kind in _bad(chip):
        answer = kds.handle(method, target)
        assert (answer.status, json.loads(answer.body)["error"]["kind"]) == (status, kind), target
        assert answer.content_type == "application/json"


def test_turin_requires_fmc(emulated_vendor: Vendor, tmp_path: Path) -> None:
    turin = Chip.create(tmp_path / "t", emulated_vendor, Product.TURIN, seed=32)
    kds = Kds(emulated_vendor)
    good = vcek_path(Product.TURIN, turin.hwid, turin.reported_tcb)
    assert kds.handle("GET", good).status == 200
    without_fmc = good.replace(f"fmcSPL={turin.reported_tcb.fmc}&", "")
    assert json.loads(kds.handle("GET", without_fmc).body)["error"]["kind"] == "missing_spl"


def test_http_server_serves_the_same_bytes(emulated_vendor: Vendor, chip: Chip, server: KdsServer) -> None:
    kds = Kds(emulated_vendor)
    path = vcek_path(chip.product, chip.hwid, chip.reported_tcb)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = http.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/pkix-cert"
        assert response.headers["x-cvmotion-platform"] == "emulated"
        assert response.content == kds.handle("GET", path).body
        chain = http.get("/vcek/v1/Genoa/cert_chain")
        assert chain.status_code == 200
        assert chain.content == emulated_vendor.cert_chain_pem(Product.GENOA)
        for method, target, status, kind in _bad(chip):
            answer = http.request(method, target)
            assert answer.status_code == status, target
            assert answer.json()["error"]["kind"] == kind


def test_client_and_sp_over_http(emulated_vendor: Vendor, chip: Chip, server: KdsServer) -> None:
    with KdsClient(server.url) as client:
        cert = client.fetch_vcek(chip.product, chip.hwid, chip.reported_tcb)
        assert amd_extensions_of(cert).tcb == chip.reported_tcb
        chain = client.fetch_cert_chain(Product.GENOA)
        assert [c.subject.rfc4514_string().split(",")[0] for c in chain] == ["CN=SEV-Genoa", "CN=ARK-Genoa"]
        with pytest.raises(KdsError, match="HTTP 404") as info:
            client.fetch_vcek(Product.GENOA, bytes(64), chip.reported_tcb)
        assert "no Genoa chip" in str(info.value)
        # A host's SP can use the KDS over HTTP as its endorsement source.
        sp = SecureProcessor(chip, endorsements=client)
        assert sp.get_ext_certs().endorsement_der == client.vcek_der(chip.product, chip.hwid, chip.reported_tcb)


def test_client_reports_an_unreachable_kds() -> None:
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with KdsClient(url, timeout=2) as client, pytest.raises(KdsError, match="failed"):
            client.cert_chain_pem(Product.GENOA)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8780") == ("127.0.0.1", 8780)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("8780", "host:", "host:99999", ":80"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            parse_listen(bad)


_SEGMENTS = ["vcek", "vlek", "v1", "Genoa", "Turin", "cert_chain", "ab" * 32, "", "%00", ".."]


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.lists(st.sampled_from(_SEGMENTS), max_size=5),
    st.text(max_size=60),
)  # fmt: skip
def test_kds_never_fails_badly(emulated_vendor: Vendor, method: str, parts: list[str], query: str) -> None:
    """Any request line gets a 200 or a 4xx with the JSON error shape — never an exception."""
    answer = Kds(emulated_vendor).handle(method, "/" + "/".join(parts) + ("?" + query if query else ""))
    assert answer.status == 200 or 400 <= answer.status < 500
    if answer.status != 200:
        assert set(json.loads(answer.body)["error"]) == {"kind", "message"}
