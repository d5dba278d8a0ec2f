"""firmware layer: the emulated KDS over HTTP: FastAPI app, a loopback server helper, and an httpx client.

The app is a thin adapter: every route hands the request line to ``Kds.handle`` so the HTTP service and
the in-process function cannot drift apart.  Its OpenAPI document has one path per product (Milan and
Genoa take a 64-byte hwID, Turin an 8-byte one and ``fmcSPL``), so every rule of a request is in the
schema.  ``KdsClient`` speaks AMD's URL scheme and so also works against any KDS look-alike; it
implements ``EndorsementSource`` for a host's ``SecureProcessor``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
import uvicorn
from cryptography import x509
from fastapi import FastAPI, Request, Response

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.firmware.kds import EMULATED_HEADER, PEM_FILE, PKIX_CERT, Kds, KdsError, vcek_path
from cvmotion.ipc.envelope import parse_error
from cvmotion.ipc.http import ServerThread, listen_socket, parse_listen, uvicorn_config
from cvmotion.ipc.http_client import HttpClient
from cvmotion.ipc.openapi import error_responses, install_error_handlers

__all__ = ["KdsClient", "KdsServer", "create_app", "listen_socket", "parse_listen", "server_config"]


def _spl(name: str, what: str) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 0, "maximum": 255}
    return {"name": name, "in": "query", "required": True, "description": f"{what} SPL", "schema": schema}


def _vcek_parameters(product: Product) -> list[dict[str, Any]]:
    digits = 2 * product.hwid_len
    hwid = {
        "name": "hwid",
        "in": "path",
        "required": True,
        "description": f"the chip's hwID: {product.hwid_len} bytes of CHIP_ID in hex",
        "schema": {"type": "string", "pattern": f"^[0-9a-fA-F]{{{digits}}}$"},
        "example": "00" * product.hwid_len,
    }
    spls = [_spl("blSPL", "boot loader"), _spl("teeSPL", "TEE"), _spl("snpSPL", "SNP"), _spl("ucodeSPL", "microcode")]
    return [hwid, *([_spl("fmcSPL", "FMC")] if product is Product.TURIN else []), *spls]


def _answer(media_type: str, description: str, example: str) -> dict[int | str, dict[str, Any]]:
    platform = {"description": "always 'emulated'", "schema": {"type": "string", "enum": [EMULATED_HEADER[1]]}}
    content = {media_type: {"schema": {"type": "string", "format": "binary"}, "example": example}}
    return {200: {"description": description, "content": content, "headers": {EMULATED_HEADER[0]: platform}}}


_CHAIN_REFUSALS = error_responses({400: ("cert_chain takes no query parameters", "bad_query")})
_VCEK_REFUSALS = error_responses(
    {
        400: ("a bad hwID, SPL or query string", "bad_hwid", "bad_spl", "missing_spl", "bad_query", "bad_tcb"),
        404: ("the vendor made no chip with this hwID", "unknown_chip"),
    }
)


def create_app(kds: Kds) -> FastAPI:
    app = FastAPI(
        title="cvmotion emulated AMD KDS",
        description=(
            "EMULATED AMD Key Distribution Service: VCEK certificates and cert chains by AMD's URL scheme "
            "(AMD pub. 57230), one path per product since each has its own hwID length and SPLs."
        ),
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    def respond(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = kds.handle(request.method, target)
        return Response(
            answer.body, status_code=answer.status, media_type=answer.content_type, headers=dict(answer.headers)
        )

    async def not_found(request: Request, _exc: Exception) -> Response:
        return respond(request)  # a path no route documents: Kds.handle names what is wrong with it

    # Every route hands its request line to Kds.handle; the routes exist to be documented.  An undeclared
    # method on them is the router's 405 (with Allow); any other path is Kds.handle's answer, as in process.
    app.add_exception_handler(404, not_found)
    for product in Product:
        name, key = product.value, product.value.lower()
        pem = "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n"
        for kind, leaf in (("vcek", "ASK"), ("vlek", "ASVK")):
            app.add_api_route(
                f"/{kind}/v1/{name}/cert_chain",
                respond,
                methods=["GET"],
                summary=f"{leaf} then ARK of {name} (PEM)",
                operation_id=f"{kind}_cert_chain_{key}",
                responses={**_answer(PEM_FILE, f"{leaf}-{name} then ARK-{name}", pem), **_CHAIN_REFUSALS},
            )
        app.add_api_route(
            f"/vcek/v1/{name}/{{hwid}}",
            respond,
            methods=["GET"],
            summary=f"VCEK (DER) of a {name} chip at a TCB",
            operation_id=f"vcek_{key}",
            responses={**_answer(PKIX_CERT, "the VCEK certificate (DER)", "MIIF..."), **_VCEK_REFUSALS},
            openapi_extra={"parameters": _vcek_parameters(product)},
        )
    return app


def server_config(kds: Kds) -> uvicorn.Config:
    return uvicorn_config(create_app(kds))


class KdsServer(ServerThread):
    """The KDS app on a loopback socket in a background thread (for tests and in-process fabrics)."""

    def __init__(self, kds: Kds, host: str = "127.0.0.1", port: int = 0) -> None:
        sock, url = listen_socket(host, port)
        super().__init__(create_app(kds), sock, url, name="kds-server")


class KdsClient(HttpClient):
    """HTTP client for a KDS (AMD's or ours). Failures become ``KdsError`` with the server's message."""

    def _get(self, path: str) -> httpx.Response:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise KdsError(502, "unreachable", f"KDS request {path} failed: {exc}") from exc
        if response.status_code != 200:
            message = response.text[:200]
            with contextlib.suppress(ValueError):
                info = parse_error(response.status_code, json.loads(response.content))
                message = info.message if info.kind != "http_error" else message
            raise KdsError(response.status_code, "kds_error", f"KDS {path} -> HTTP {response.status_code}: {message}")
        return response

    def vcek_der(self, product: Product, hwid: bytes, tcb: TcbVersion) -> bytes:
        return self._get(vcek_path(product, hwid, tcb)).content

    def fetch_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion) -> x509.Certificate:
        der = self.vcek_der(product, hwid, tcb)
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise KdsError(502, "bad_certificate", "KDS answered a VCEK that is not DER X.509") from exc

    def cert_chain_pem(self, product: Product) -> bytes:
        return self._get(f"/vcek/v1/{product.value}/cert_chain").content

    def vlek_chain_pem(self, product: Product) -> bytes:
        return self._get(f"/vlek/v1/{product.value}/cert_chain").content

    def fetch_cert_chain(self, product: Product) -> list[x509.Certificate]:
        """ASK then ARK, parsed."""
        try:
            return x509.load_pem_x509_certificates(self.cert_chain_pem(product))
        except ValueError as exc:
            raise KdsError(502, "bad_certificate", "KDS cert_chain is not PEM X.509") from exc
