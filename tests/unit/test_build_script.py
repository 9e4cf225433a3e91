"""docker/build.sh refuses bad arguments before it builds anything (no root, no buildah)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BUILD_SH = Path(__file__).resolve().parents[2] / "docker" / "build.sh"


def build_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD_SH), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_help_lists_every_option() -> None:
    result = build_sh("--help")
    assert result.returncode == 0
    for option in ("--push", "--oci-archive", "--base", "--apt-sources", "--pip-cert"):
        assert option in result.stdout


def test_without_a_destination_it_says_where_the_image_may_go() -> None:
    result = build_sh("--base", "debian:bookworm-slim")
    assert result.returncode == 2
    assert "--push REF and/or --oci-archive FILE" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument: --bogus"),
        (["--tls-verify", "maybe"], "--tls-verify takes true or false, not 'maybe'"),
        (["--apt-sources", "/nonexistent/debian.sources"], "--apt-sources: no file"),
        (["--pip-cert", "/nonexistent/ca.pem"], "pip CA bundle /nonexistent/ca.pem"),
    ],
)
def test_a_bad_argument_is_named(args: list[str], message: str) -> None:
    result = build_sh("--oci-archive", "/tmp/never-written.tar", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not Path("/tmp/never-written.tar").exists()


def test_one_line_apt_sources_are_refused_for_deb822(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("deb http://deb.debian.org/debian bookworm main\n")
    result = build_sh("--oci-archive", str(tmp_path / "out.tar"), "--apt-sources", str(sources))
    assert result.returncode == 2
    assert "not in deb822 format" in result.stderr
