"""``cvmotion vm run``: bad input gets one clear line and exit code 1, never a traceback or a hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmotion.cli.main import main
from cvmotion.vmm.images import guest_dir

_PROBE = ("--image", "probe", "--memory", "16M", "--backend", "emulated")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["vm", "run", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "memdirty", "--memory", "12Q"], "invalid memory size '12Q'"),
        (["--image", "memdirty", "--size", "Standard_X1"], "unknown VM size"),
        (["--image", "/nonexistent.elf"], "no such image file"),
        (["--memory", "64M"], "--image is required"),
        (["--restore", "snap", "--image", "memdirty"], "takes the image"),
        (["--image", "memdirty", "--seconds", "0"], "--seconds must be positive"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 1
    assert message in err
    assert "Traceback" not in err


def test_not_a_multiboot_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bogus = tmp_path / "kernel"
    bogus.write_bytes(b"\x7fELF" + bytes(200))
    code, _, err = run(capsys, "--image", str(bogus))
    assert code == 1
    assert "not a multiboot kernel" in err


def test_restore_of_a_non_snapshot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bogus = tmp_path / "snap"
    bogus.write_bytes(b"hello")
    code, _, err = run(capsys, "--restore", str(bogus))
    assert code == 1
    assert "not a cvmotion snapshot" in err


@pytest.mark.skipif(not (guest_dir() / "probe.elf").is_file(), reason="guests not built")
def test_emulated_guest_fault_names_the_rip(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "--image", "probe", "--memory", "16M", "--cmdline", "action=triple", "--backend", "emulated"
    )
    assert code == 3
    assert "last RIP 0x" in err
    assert "probe: executing ud2" in out


@pytest.mark.skipif(not (guest_dir() / "probe.elf").is_file(), reason="guests not built")
def test_emulated_clean_shutdown_and_image_too_big(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--image", "probe", "--memory", "16M", "--cmdline", "action=exit code=0", "--backend", "emulated"
    )
    assert code == 0
    assert "emulated" in err
    assert "guest requested shutdown with exit code 0" in err
    code, _, err = run(capsys, "--image", "probe", "--memory", "4M", "--cmdline", "x" * 9000, "--backend", "emulated")
    assert code == 1
    assert "command line" in err
