"""The shipped systemd unit, ``crishim unit``, and readiness over $NOTIFY_SOCKET."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from crishim.cli import main
from crishim.node.unit import crishim_executable, render_unit, unit_path
from crishim.util.sdnotify import Notifier


def _service(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser["Service"]


def test_the_unit_keeps_containers_across_restarts_and_says_when_ready() -> None:
    service = _service(unit_path().read_text())
    assert service["Type"] == "notify"
    assert service["KillMode"] == "process"
    assert service["Delegate"] == "yes"
    assert service["Restart"] == "always"
    assert service["OOMScoreAdjust"] == "-999"
    assert int(service["LimitNOFILE"]) >= 1048576
    assert service["TasksMax"] == "infinity"


def test_render_points_exec_start_at_this_crishim() -> None:
    text = render_unit("[Service]\nExecStart=/usr/local/bin/crishim serve\n", "/opt/c/bin/crishim")
    assert text == "[Service]\nExecStart=/opt/c/bin/crishim serve\n"


def test_crishim_unit_prints_the_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unit"]) == 0
    service = _service(capsys.readouterr().out)
    assert service["ExecStart"] == f"{crishim_executable()} serve"
    assert os.path.isabs(crishim_executable())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    unit = tmp_path / "crishim.service"
    unit.write_text(render_unit(unit_path().read_text(), crishim_executable()))
    if not os.access(crishim_executable(), os.X_OK):
        pytest.skip(f"{crishim_executable()} is not installed here")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "crishim.service" not in result.stderr, result.stderr


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listener(path) as sock:
        assert Notifier(path).notify("READY=1", "STATUS=serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_reaches_an_abstract_socket(tmp_path: Path) -> None:
    name = f"crishim-test-{os.getpid()}-{tmp_path.name}"
    with _listener("\0" + name) as sock:
        assert Notifier("@" + name).notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.notify("READY=1")


def test_the_socket_is_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@somewhere")
    assert Notifier.from_environment().enabled
    assert "NOTIFY_SOCKET" not in os.environ


def test_a_vanished_manager_is_logged_not_raised(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone")).notify("READY=1")
