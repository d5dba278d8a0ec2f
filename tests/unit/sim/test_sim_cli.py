"""``cvmotion simulate`` refuses bad input with one clear line and exit code 1, before starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmotion.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hosts", "0"], "--hosts 0: give 2 to"),
        (["--hosts", "1"], "--hosts 1: give 2 to"),
        (["--vms", "0"], "--vms 0: give 1 to"),
        (["--hosts", "10", "--vms", "1000"], "at most 110 fit"),
        (["--speed", "0"], "--speed 0"),
        (["--per-host", "0"], "--per-host 0"),
        (["--db", "mysql://x/y"], "expected sqlite:///PATH or postgresql://"),
        (["--plot", "out.svg"], "name it FILE.png"),
        (["--plot", "/nonexistent-dir/x.png"], "does not exist"),
        (["--failures", "600"], "at most half the hosts"),
    ],
    ids=[
        "no-hosts",
        "one-host",
        "no-vms",
        "overfull",
        "speed",
        "per-host",
        "db-url",
        "plot-kind",
        "plot-dir",
        "failures",
    ],
)
def test_bad_input_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_non_number_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--hosts", "many"])
    assert exited.value.code == 1
    assert "invalid int value" in capsys.readouterr().err
