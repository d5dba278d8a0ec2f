"""firmware layer: the emulated KDS over HTTP: FastAPI app, a loopback server helper, and an httpx client.

The app is a thin adapter: every route hands the request line to ``Kds.handle`` so the HTTP service and
the in-process function cannot drift apart.  ``KdsClient`` speaks AMD's URL scheme and so also works
against any KDS look-alike; it implements ``EndorsementSource`` for a host's ``SecureProcessor``.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import uvicorn
from cryptography import x509
from fastapi import FastAPI, Request, Response

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.firmware.kds import Kds, KdsError, vcek_path
from cvmotion.ipc.http import ServerThread, listen_socket, parse_listen, uvicorn_config
from cvmotion.ipc.http_client import HttpClient

__all__ = ["KdsClient", "KdsServer", "create_app", "listen_socket", "parse_listen", "server_config"]


def create_app(kds: Kds) -> FastAPI:
    app = FastAPI(
        title="cvmotion emulated AMD KDS",
        description="EMULATED AMD Key Distribution Service: VCEK certificates and cert chains by AMD's URL scheme.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )

    def respond(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = kds.handle(request.method, target)
        return Response(
            answer.body, status_code=answer.status, media_type=answer.content_type, headers=dict(answer.headers)
        )

    # Declared for the OpenAPI document; each one (and the catch-all) delegates to Kds.handle.
    app.add_api_route("/vcek/v1/{product}/cert_chain", respond, methods=["GET"], summary="ASK then ARK (PEM)")
    app.add_api_route("/vlek/v1/{product}/cert_chain", respond, methods=["GET"], summary="ASVK then ARK (PEM)")
    app.add_api_route("/vcek/v1/{product}/{hwid}", respond, methods=["GET"], summary="VCEK (DER) for a hwID and TCB")
    app.add_api_route(
        "/{path:path}", respond, methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False
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
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = str(json.loads(response.content)["error"]["message"])
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
