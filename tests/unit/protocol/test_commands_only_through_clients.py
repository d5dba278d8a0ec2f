"""Commands cross the process boundaries only through the typed clients (``platformd.client``, ``vmd.client``):
no other module of the host, the engine or the processes names an RPC method in a string (``.call("name", ...)``),
so the protocols' enums stay the one list of what crosses, and a new command cannot be sent around them."""

from __future__ import annotations

import re
from pathlib import Path

import cvmotion

PACKAGE = Path(cvmotion.__file__).resolve().parent
CHECKED = ("agent", "host", "migration", "platformd", "vmd")
CLIENTS = {Path("platformd/client.py"), Path("vmd/client.py")}
RAW_CALL = re.compile(r"\.call\(\s*[\"']")


def test_no_rpc_by_name_outside_the_clients() -> None:
    offenders = []
    for package in CHECKED:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            relative = path.relative_to(PACKAGE)
            if relative in CLIENTS:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if RAW_CALL.search(line):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []


def test_the_clients_send_only_their_enums() -> None:
    """Inside the clients, every call names an enum member, never a literal."""
    for relative in CLIENTS:
        text = (PACKAGE / relative).read_text()
        assert not RAW_CALL.search(text), relative
