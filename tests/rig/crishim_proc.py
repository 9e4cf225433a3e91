"""crishim as a real subprocess on temporary root, state and socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 15.0


class CrishimProcess:
    """One ``crishim serve`` with its own directories, config file and log file.

    ``config`` is extra TOML, written as a drop-in over the generated config (which sets
    root, state, socket, a private CNI conf dir and debug logging), so it may set top-level
    keys and tables alike. The generated config turns the built-in default network off:
    pods of a test join the network the test writes into the conf dir, or none; tests of
    the default network turn it on with their own subnet and bridge.
    """

    def __init__(
        self,
        base: Path,
        config: str = "",
        extra_args: list[str] | None = None,
        *,
        fd_canary: bool = False,
    ):
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.socket = base / "state" / "crishim.sock"
        self.cni_conf_dir = base / "cni"
        self.config_file = base / "etc" / "crishim.toml"
        self.log_file = base / "crishim.log"
        self._extra_config = config
        self._extra_args = extra_args or []
        #: where canary threads inside crishim report descriptors closed under them
        self.canary_report: Path | None = base / "fd-canary.txt" if fd_canary else None
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        """Write the instance's config file (called by start)."""
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        base = (
            f'root = "{self.root}"\nstate = "{self.state}"\nsocket = "{self.socket}"\n'
            f'log_level = "debug"\n\n[cni]\nconf_dir = "{self.cni_conf_dir}"\n'
            "\n[cni.default_network]\nenabled = false\n"
            '\n[metrics]\naddress = "127.0.0.1:0"\n'
        )
        self.config_file.write_text(base)
        drop_in = self.config_file.parent / "crishim.d" / "50-test.toml"
        drop_in.parent.mkdir(exist_ok=True)
        drop_in.write_text(self._extra_config)

    def command(self) -> list[str]:
        """The argv that starts this instance (under the fd canary when asked for)."""
        if self.canary_report is not None:
            launcher = ["tests.rig.fd_canary", "--report", str(self.canary_report), "--"]
        else:
            launcher = ["crishim.cli"]
        return [
            sys.executable,
            "-m",
            *launcher,
            "serve",
            "--config",
            str(self.config_file),
            *self._extra_args,
        ]

    def start(self) -> CrishimProcess:
        """Start crishim and wait until its socket accepts connections."""
        self.write_config()
        # The log is appended across restarts: only lines after this offset count.
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crishim exited {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists() and "serving CRI" in self.log()[offset:]:
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"crishim did not start in {START_TIMEOUT}s:\n{self.log()}")

    def canary_findings(self) -> tuple[list[str], int]:
        """What the fd canaries found, and how many rounds they ran (0 without canaries)."""
        if self.canary_report is None or not self.canary_report.exists():
            return [], 0
        findings, rounds = [], 0
        for line in self.canary_report.read_text().splitlines():
            if line.startswith("iterations "):
                rounds += 1000  # one line per thousand rounds of one canary
            else:
                findings.append(line)
        return findings, rounds

    def log(self) -> str:
        """Everything the instance has logged so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, for tests of crashes and for cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def unmount_all(self) -> None:
        """Lazily unmount everything crishim left mounted under the base directory
        (the private namespace dir, pod /dev/shm, container root filesystems)."""
        base = str(self.base.resolve())
        mounts = [
            line.split()[1].replace("\\040", " ")
            for line in Path("/proc/self/mounts").read_text().splitlines()
        ]
        for mountpoint in sorted((m for m in mounts if m.startswith(base + "/")), reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)

    @property
    def endpoint(self) -> str:
        """The CRI endpoint as kubelet and crictl spell it."""
        return f"unix://{self.socket}"
