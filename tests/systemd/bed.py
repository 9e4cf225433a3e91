"""systemd booted in a container (systemd-nspawn), with crishim.service in it.

The container's root is an overlay over the cached rootfs (see :mod:`tests.systemd.rootfs`),
so every run starts clean and leaves the cache untouched. Before boot, crishim is installed
from the checkout into the rootfs's venv, its unit (``crishim unit``) is enabled and its
config sets the systemd cgroup driver.

What the container gets (and why):

- ``--register=no --keep-unit``: the host's PID 1 is not systemd, nothing to register with;
- its own cgroup ``crishim-bed-<pid>-<n>`` in every hierarchy, made before nspawn starts, so
  the container's cgroup namespace (and everything systemd does inside) stays below it;
- the init wrapper (writable v1 controllers, /proc/sys, /sys; see rootfs.INIT_SCRIPT) then
  systemd as PID 1, with ``--kill-signal=SIGRTMIN+3`` as ``-b`` would set;
- ``--capability=all`` and no seccomp filter (``SYSTEMD_SECCOMP=0``): runtimes hand
  containers capabilities nspawn drops by default (CAP_NET_ADMIN for CNI among them), and
  nspawn's filter refuses ``keyctl``, which runc and crun call for each container;
- the host's network namespace: crishim pulls from the rig's registry on 127.0.0.1, and pods
  join the bed's own bridge and subnet (``crishim-sd0``, 10.88.221.0/24);
- bind mounts from the test's directory: ``/run/crishim-cri`` (the CRI socket, reachable
  from the host), ``/var/lib/crishim`` (state on the host's file system: overlayfs
  snapshots need a non-overlay upper dir; pod logs readable from the host).

Stopping: SIGRTMIN+4 to the container's systemd (poweroff), then SIGKILL to what is left in
the bed's cgroups; the overlay is unmounted, the cgroups, the bridge and the subnet's
iptables rules removed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.rig.host import drop_chain, iptables_chains, iptables_rules, mounts_under
from tests.systemd.rootfs import INIT, REPO, VENV, ensure_rootfs

__all__ = ["BRIDGE", "SUBNET", "SUBNET_PREFIX", "Bed"]

BRIDGE = "crishim-sd0"
SUBNET = "10.88.221.0/24"
SUBNET_PREFIX = "10.88.221."
NETWORK = "crishim-sd0-net"
CRI_DIR = "/run/crishim-cri"
SOCKET = f"{CRI_DIR}/crishim.sock"
BOOT_TIMEOUT = 90.0
# What crishim's checkout needs to build and install.
_SOURCE = ("pyproject.toml", "README.md", "crishim", "bundles", "systemd")


def _conflist() -> str:
    return (
        '{"cniVersion": "1.0.0", "name": "' + NETWORK + '", "plugins": ['
        '{"type": "bridge", "bridge": "' + BRIDGE + '", "isGateway": true, "ipMasq": false,'
        ' "ipam": {"type": "host-local", "ranges": [[{"subnet": "' + SUBNET + '"}]]}},'
        ' {"type": "portmap", "capabilities": {"portMappings": true}},'
        ' {"type": "loopback"}]}\n'
    )


def _host_hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted on the host (v1 controllers, name=systemd, v2)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("cgroup", "cgroup2"):
            found.append(Path(parts[1]))
    return found


def _make_cgroup(directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = directory / name
        if mine.exists() and not mine.read_text().strip():
            mine.write_text((directory.parent / name).read_text())


def _cgroup_pids(directory: Path) -> list[int]:
    pids: list[int] = []
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


_BED_NUMBERS = itertools.count(1)


def _remove_cgroup_tree(directory: Path) -> None:
    # Killed processes leave their cgroups a moment after the kill: until then rmdir says
    # EBUSY. Tries for up to 10 s, then leaves what is still busy.
    for _ in range(100):
        if not directory.is_dir():
            return
        for child in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            directory.rmdir()
        time.sleep(0.1)


class Bed:
    """One booted container; ``base`` is a fresh directory of the test's."""

    def __init__(
        self,
        base: Path,
        *,
        crishim_config: str = "",
        pod_network: bool = True,
        binds: tuple[str, ...] = (),
    ) -> None:
        """``pod_network``: the bed's pods join its bridge (``BRIDGE``), which stopping the
        bed removes with its rules; a bed without it leaves them to the bed that has one.
        ``binds``: more paths inside the bed backed by directories of ``base`` (state on the
        host's file system, as ``/var/lib/crishim`` is: overlayfs refuses an overlay upper)."""
        self.base = base
        self.pod_network = pod_network
        self.lower = ensure_rootfs()
        self.root = base / "root"
        self.cri = base / "cri"
        self.state = base / "var-lib-crishim"
        self.log_file = base / "nspawn.log"
        # Unique per bed, not per test process: a bed never meets another's leftovers.
        self.name = f"crishim-bed-{os.getpid()}-{next(_BED_NUMBERS)}"
        self._extra_config = crishim_config
        self.binds = {inside: base / ("bind" + inside.replace("/", "-")) for inside in binds}
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # ---- inside ---------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        """The CRI socket as the host reaches it."""
        return self.cri / "crishim.sock"

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command inside the container (all its namespaces); its stdout."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {result.returncode}: {result.stderr}{result.stdout}"
            )
        return result.stdout

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` of a unit's properties."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def read(self, path: str) -> str:
        """A file as the container sees it (cgroup files through its cgroup namespace)."""
        return self.run("cat", path)

    def journal(self, unit: str = "crishim", lines: int = 60) -> str:
        return self.run("journalctl", "-u", unit, "-n", str(lines), "--no-pager", check=False)

    def wait_crishim(self, timeout: float = 30.0) -> None:
        """Wait until crishim.service is active (it says READY=1 once it serves)."""
        deadline = time.monotonic() + timeout
        while self.systemctl("is-active", "crishim", check=False).strip() != "active":
            if time.monotonic() > deadline:
                raise AssertionError(f"crishim.service not active:\n{self.journal()}")
            time.sleep(0.2)

    # ---- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Lay out the root, install crishim, boot, wait for a running system."""
        made = (self.cri, self.state, self.base / "upper", self.base / "work", self.root)
        for directory in (*made, *self.binds.values()):
            directory.mkdir(parents=True, exist_ok=True)
        upper, work = self.base / "upper", self.base / "work"
        options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], check=True
        )
        self._install()
        self._boot()

    def _chroot(self, *argv: str) -> str:
        return subprocess.run(
            ["chroot", str(self.root), *argv],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
        ).stdout

    def _install(self) -> None:
        source = self.root / "usr" / "src" / "crishim"
        source.mkdir(parents=True)
        for name in _SOURCE:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, source / name)
        self._chroot(
            f"{VENV}/bin/pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "/usr/src/crishim",
        )
        unit = self._chroot(f"{VENV}/bin/crishim", "unit")
        (self.root / "etc/systemd/system/crishim.service").write_text(unit)
        self._chroot("systemctl", "enable", "crishim.service")
        etc = self.root / "etc" / "crishim"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "crishim.toml").write_text(
            f'cgroup_driver = "systemd"\nsocket = "{SOCKET}"\nlog_level = "debug"\n'
            # The host's network namespace: no fixed port that another crishim may hold.
            '\n[metrics]\naddress = "127.0.0.1:0"\n' + self._extra_config
        )
        cni = self.root / "etc" / "cni" / "net.d"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-crishim-sd.conflist").write_text(_conflist())

    def _boot(self) -> None:
        procs = []
        for hierarchy in _host_hierarchies():
            _make_cgroup(hierarchy / self.name)
            procs.append(str(hierarchy / self.name / "cgroup.procs"))
        argv = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--quiet",
            "--console=read-only",
            "--kill-signal=SIGRTMIN+3",
            "--capability=all",
            f"--machine={self.name}",
            "-D",
            str(self.root),
            f"--bind={self.cri}:{CRI_DIR}",
            f"--bind={self.state}:/var/lib/crishim",
            *(f"--bind={outside}:{inside}" for inside, outside in self.binds.items()),
            INIT,
        ]
        # The shell joins the bed's cgroups, then becomes nspawn: nothing runs outside them.
        script = 'for p in $BED_PROCS; do echo $$ > "$p"; done; exec "$@"'
        with self.log_file.open("ab") as log:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", script, "sh", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # No seccomp filter (nspawn's refuses keyctl, which runc and crun need to give
                # each container its session keyring): a privileged container, as kind's.
                env={**os.environ, "BED_PROCS": " ".join(procs), "SYSTEMD_SECCOMP": "0"},
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.pid1:
            self.pid1 = self._find_pid1()
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited:\n{self.log_file.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the container's systemd did not start")
            time.sleep(0.1)
        # Until systemd answers on its socket, systemctl prints nothing.
        state = ""
        while not state and time.monotonic() < deadline:
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT
            ).strip()
            time.sleep(0.2)
        if state != "running":
            failed = self.systemctl("--failed", "--no-legend", check=False)
            raise RuntimeError(f"the container's system is {state!r}; failed units:\n{failed}")

    def _find_pid1(self) -> int:
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return 0

    def stop(self) -> None:
        """Power the container off, then remove everything the bed made on the host."""
        try:
            self._power_off()
        finally:
            for point in mounts_under(self.root):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            for hierarchy in _host_hierarchies():
                _remove_cgroup_tree(hierarchy / self.name)
            if self.pod_network:
                subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
                remove_subnet_rules()

    def _power_off(self) -> None:
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None and self.pid1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGRTMIN + 4)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(60)
        if self.nspawn.poll() is None:
            self.nspawn.kill()
            self.nspawn.wait(10)
        for hierarchy in _host_hierarchies():
            for pid in _cgroup_pids(hierarchy / self.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def subnet_rules() -> list[str]:
    """iptables rules (nat, filter) naming the bed's subnet."""
    return [
        f"{table}: {rule}"
        for table in ("nat", "filter")
        for rule in iptables_rules(table)
        if SUBNET_PREFIX in rule
    ]


def remove_subnet_rules() -> None:
    """Drop the chains and rules CNI made for the bed's subnet (containers and portmap)."""
    if shutil.which("iptables") is None:
        return
    for table in ("nat", "filter"):
        rules = iptables_rules(table)
        ours = {
            line.split()[1]
            for line in rules
            if line.startswith("-A CNI-") and SUBNET_PREFIX in line and "HOSTPORT" not in line
        }
        for chain in ours & iptables_chains(table):
            drop_chain(table, chain)
        for line in iptables_rules(table):
            if line.startswith("-A ") and SUBNET_PREFIX in line:
                subprocess.run(
                    ["iptables", "-t", table, "-D", *shlex.split(line)[1:]],
                    capture_output=True,
                    check=False,
                )
