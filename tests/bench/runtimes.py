"""The runtimes a benchmark compares: crishim and containerd (Debian's, private paths).

Each runs on its own root, state, socket and CNI network (its own bridge and subnet, so a
round of one never meets the other's pods), both pulling from the same local registry.
containerd needs a sandbox ("pause") image: a busybox image whose entrypoint sleeps, pushed
by :func:`push_images` next to the busybox image the pods run.

Only ratios between the two measured in one run, alternating, mean anything on this
machine: its absolute speed drifts from run to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.rig.cni import bridge_conflist
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.oci_image import busybox_image, push
from tests.rig.registry import Registry

CNI_BIN = "/usr/lib/cni"
# Bridges and subnets of the benchmarks' own (tests use 10.88.213-224).
NETWORKS = {
    "crishim": ("crishim-bn0", "10.88.230.0/23"),
    "containerd": ("crishim-bn1", "10.88.232.0/23"),
}


@dataclass(frozen=True)
class Images:
    """What the benchmarks run, in the local registry."""

    busybox: str
    pause: str


def push_images(registry: Registry) -> Images:
    """Push the pods' busybox and containerd's sandbox image; their references."""
    push(registry.url, "bench/busybox", "1", busybox_image())
    # PID 1 of containerd's sandbox container only has to stay alive.
    pause = busybox_image(entrypoint=["/bin/sleep", "2147483647"], cmd=[])
    push(registry.url, "bench/pause", "1", pause)
    return Images(f"{registry.host}/bench/busybox:1", f"{registry.host}/bench/pause:1")


def conflist(name: str, ipam_dir: Path) -> str:
    """A bridge + host-local network on the runtime's own bridge and subnet."""
    bridge, subnet = NETWORKS[name]
    return bridge_conflist(f"bench-{name}", bridge, subnet, ipam_dir)


def rss_kib(pid: int) -> int:
    """A process's resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_whose_cmdline_has(marker: str, name: str) -> list[int]:
    """Pids of processes called ``name`` whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != name:
                continue
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Crishim:
    """crishim under test (runc by default)."""

    name = "crishim"

    def __init__(self, base: Path, runtime: str = "runc", log_level: str = "info") -> None:
        self.base = base
        self.proc = CrishimProcess(
            base / "crishim",
            config=f'default_runtime = "{runtime}"\nlog_level = "{log_level}"\n',
        )

    @property
    def socket(self) -> Path:
        return self.proc.socket

    def start(self) -> None:
        self.proc.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (self.proc.cni_conf_dir / "10-bench.conflist").write_text(
            conflist(self.name, self.base / "ipam-crishim")
        )
        self.proc.start()

    def memory_kib(self) -> tuple[int, int]:
        """(the runtime's own RSS, the RSS of its per-container helpers: conmons)."""
        assert self.proc.proc is not None
        helpers = pids_whose_cmdline_has(str(self.proc.state), "conmon")
        return rss_kib(self.proc.proc.pid), sum(rss_kib(p) for p in helpers)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.unmount_all()
        subprocess.run(["ip", "link", "del", NETWORKS[self.name][0]], capture_output=True)


class Containerd:
    """containerd 1.6 (Debian) with its CRI plugin on private paths, runc via its v2 shim."""

    name = "containerd"

    def __init__(self, base: Path, registry_host: str, pause_image: str) -> None:
        self.base = base / "containerd"
        self.registry_host = registry_host
        self.pause_image = pause_image
        self.socket = self.base / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("containerd") is not None

    def start(self) -> None:
        base = self.base
        certs = base / "certs.d" / self.registry_host
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "hosts.toml").write_text(f'server = "http://{self.registry_host}"\n')
        (base / "cni").mkdir(exist_ok=True)
        (base / "cni" / "10-bench.conflist").write_text(conflist(self.name, base / "ipam"))
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        (base / "config.toml").write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\nstate = "{base / "state"}"\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{base / "ttrpc.sock"}"\n'
            f'{cri}\n  sandbox_image = "{self.pause_image}"\n'
            # No CAP_SYS_RESOURCE here: oom_score_adj may not go below containerd's own.
            "  restrict_oom_score_adj = true\n"
            f"{cri[:-1]}.cni]\n"
            f'  bin_dir = "{CNI_BIN}"\n  conf_dir = "{base / "cni"}"\n'
            f'{cri[:-1]}.registry]\n  config_path = "{base / "certs.d"}"\n'
        )
        log = (base / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "containerd.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(1.0)  # the CRI plugin registers its services a moment after the socket

    def memory_kib(self) -> tuple[int, int]:
        """(containerd's RSS, the RSS of its shims)."""
        assert self.proc is not None
        shims = pids_whose_cmdline_has(str(self.base), "containerd-shim")
        return rss_kib(self.proc.pid), sum(rss_kib(p) for p in shims)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        for pid in pids_whose_cmdline_has(str(self.base), "containerd-shim"):
            os.kill(pid, 9)
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.base))
        ]
        for point in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["ip", "link", "del", NETWORKS[self.name][0]], capture_output=True)
