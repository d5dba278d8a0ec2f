"""The VM process's protocol: each caller's enum is the table of commands it may send, and nothing else runs."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from cvmotion.errors import UsageError
from cvmotion.ipc.rpc import Call
from cvmotion.vmd import process as vm_process
from cvmotion.vmd import server
from cvmotion.vmd.process import VmProcess
from cvmotion.vmd.protocol import ControlCommand, HardwareCommand, VmSpec


def test_each_table_holds_exactly_its_enum() -> None:
    assert set(server._CONTROL) == {c.value for c in ControlCommand}
    assert set(server._HARDWARE) == {c.value for c in HardwareCommand}


@pytest.fixture
def proc(tmp_path: Path) -> VmProcess:
    return server.install(VmProcess(VmSpec(name="t", memory=16 << 20), tmp_path, str(tmp_path / "p.sock")))


@pytest.mark.parametrize("method", [c.value for c in HardwareCommand] + ["vm_attach", "nonsense"])
def test_the_daemon_cannot_send_the_secure_processors_commands(proc: VmProcess, method: str) -> None:
    assert proc.control_handler is not None
    with pytest.raises(UsageError, match="not a command the host daemon may send"):
        proc.control_handler(Call(method, {}))


@pytest.mark.parametrize("method", [ControlCommand.BIND.value, ControlCommand.RESUME.value, "info"])
def test_the_secure_processor_sends_only_its_own(proc: VmProcess, method: str) -> None:
    assert proc.hardware_handler is not None
    with pytest.raises(UsageError, match="not a command the secure processor may send"):
        proc.hardware_handler(Call(method, {}))


def test_bad_arguments_are_named_not_a_traceback(proc: VmProcess) -> None:
    assert proc.control_handler is not None
    with pytest.raises(UsageError, match="'pct' must be an integer"):
        proc.control_handler(Call("throttle", {"pct": "lots"}))


def test_a_spec_with_unknown_keys_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown VM spec keys: colour"):
        VmSpec.from_dict({"name": "a", "memory": 1, "colour": "red"})
    assert VmSpec.from_json(VmSpec(name="a", memory=1).to_json()) == VmSpec(name="a", memory=1)


def test_the_pid_file_exists_before_the_control_socket_listens(
    proc: VmProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon takes a standby the moment it can connect and moves its files away (CI: a pid written after
    listen() found the standby's directory gone, and the VM failed to start)."""
    seen: list[bool] = []

    class _Socket(socket.socket):
        def listen(self, backlog: int = 8) -> None:
            seen.append((tmp_path / "pid").exists())
            proc._stop.set()  # one look is enough: serve() returns at its next accept timeout
            super().listen(backlog)

    monkeypatch.setattr(vm_process.socket, "socket", _Socket)
    serving = threading.Thread(target=proc.serve, daemon=True)
    serving.start()
    serving.join(10)
    assert not serving.is_alive()
    assert seen == [True]
