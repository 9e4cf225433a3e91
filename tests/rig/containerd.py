"""containerd on private paths, for tests and benchmarks that compare with it or use its
``ctr`` to make archives (Debian's containerd package; skipped without it)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Containerd:
    """A running containerd: its socket, and ``ctr`` in the CRI's namespace against it."""

    base: Path
    socket: Path

    def ctr(self, *args: str, stdin: bytes | None = None) -> bytes:
        """Run ``ctr --namespace=k8s.io ARGS``; its output (fails on a non-zero exit)."""
        done = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace=k8s.io", *args],
            input=stdin,
            capture_output=True,
            check=False,
        )
        if done.returncode:
            raise AssertionError(f"ctr {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout


def require_containerd() -> None:
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: install the Debian package 'containerd'")


@contextlib.contextmanager
def containerd(base: Path) -> Iterator[Containerd]:
    """containerd with its root, state and socket under ``base``; stopped afterwards."""
    base.mkdir(parents=True, exist_ok=True)
    socket = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{base / "root"}"\nstate = "{base / "state"}"\n'
        f'[grpc]\n  address = "{socket}"\n'
    )
    with (base / "containerd.log").open("wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "containerd.log").read_text()[-3000:])
            time.sleep(0.1)
        yield Containerd(base, socket)
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
