"""The host's systemd and kubelet as the installer drives them.

:class:`HostSystem` is the narrow interface the installer uses; :class:`RealHost` runs
``systemctl`` in the host's namespaces and probes sockets and ports for real. Unit tests
put a recording fake in its place (a real systemd is not the unit under test there).

``systemctl`` from the DaemonSet's container: ``chroot /host systemctl`` is refused by
systemctl for start/stop/restart ("Running in chroot, ignoring request"), so the command
runs through ``nsenter --target 1`` into PID 1's mount, UTS, IPC, network and PID
namespaces (the pod is privileged and shares the host's PID namespace, so PID 1 is the
host's systemd), where ``systemctl`` is the host's own binary talking to its own manager.
Run by hand on the host, the namespaces are already PID 1's and systemctl runs directly.
``systemd-run`` (the transient unit a DaemonSet's run hands its work to) goes the same way;
the pods of a runtime are removed through its CRI socket.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Protocol

import httpx
from grpclib import GRPCError
from grpclib.client import Channel

from crishim.api import v1
from crishim.errors import DeadlineExceeded, FailedPrecondition
from crishim.util.proc import run_blocking

__all__ = ["HostSystem", "RealHost"]

_NSENTER = ["nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--"]


class HostSystem(Protocol):
    """What the installer asks of the host beyond its files."""

    def systemctl(self, *args: str) -> None:
        """Run ``systemctl args``; FailedPrecondition with its output when it fails."""

    def unit_active(self, unit: str) -> bool:
        """Whether ``unit`` is active."""

    def kubelet_args(self) -> list[str] | None:
        """The running kubelet's command line; None when no kubelet runs."""

    def wait_cri(self, socket: Path, timeout: float) -> str:
        """Wait until a CRI runtime answers on ``socket``; its name and version."""

    def wait_kubelet(self, port: int, timeout: float) -> None:
        """Wait until kubelet's healthz on 127.0.0.1:``port`` answers ok."""

    def remove_pods(self, socket: Path, timeout: float) -> int:
        """Stop and remove every pod of the CRI runtime on ``socket``; how many there were."""

    def in_container(self) -> bool:
        """Whether this process runs in a container (not in the host's mount namespace)."""

    def start_transient(self, unit: str, argv: list[str]) -> None:
        """Start ``argv`` as the host's transient service ``unit`` (gone once it ends)."""


def _same_mount_namespace_as_init() -> bool:
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


class RealHost:
    """The host this process runs on (or, from a hostPID pod, under)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._prefix = [] if _same_mount_namespace_as_init() else _NSENTER

    def systemctl(self, *args: str) -> None:
        argv = [*self._prefix, "systemctl", *args]
        result = run_blocking(argv, what="systemctl", remedy="the host must run systemd")
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise FailedPrecondition(f"systemctl {' '.join(args)} failed: {output}")

    def unit_active(self, unit: str) -> bool:
        argv = [*self._prefix, "systemctl", "is-active", "--quiet", unit]
        return run_blocking(argv, what="systemctl").returncode == 0

    def kubelet_args(self) -> list[str] | None:
        for entry in self._proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "kubelet":
                    continue
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
        return None

    def wait_cri(self, socket: Path, timeout: float) -> str:
        return asyncio.run(_wait_cri(socket, timeout))

    def remove_pods(self, socket: Path, timeout: float) -> int:
        return asyncio.run(_remove_pods(socket, timeout))

    def in_container(self) -> bool:
        return bool(self._prefix)

    def start_transient(self, unit: str, argv: list[str]) -> None:
        command = ["systemd-run", f"--unit={unit}", "--collect", "--quiet"]
        command += ["--service-type=exec", "--", *argv]
        result = run_blocking([*self._prefix, *command], what="systemd-run")
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise FailedPrecondition(f"systemd-run --unit={unit} failed: {output}")

    def wait_kubelet(self, port: int, timeout: float) -> None:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + timeout
        problem = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(url, timeout=2.0)
                if reply.status_code == 200:
                    return
                problem = f"HTTP {reply.status_code}: {reply.text.strip()[:200]}"
            except httpx.HTTPError as exc:
                problem = str(exc) or type(exc).__name__
            time.sleep(1.0)
        raise DeadlineExceeded(f"kubelet not healthy within {timeout:g}s at {url}: {problem}")


async def _wait_cri(socket: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    problem = "no socket"
    while time.monotonic() < deadline:
        if socket.exists():
            channel = Channel(path=str(socket))
            try:
                reply = await asyncio.wait_for(
                    v1.RuntimeServiceStub(channel).version(v1.VersionRequest()), 5.0
                )
                return f"{reply.runtime_name} {reply.runtime_version}"
            except Exception as exc:  # any failure: not ready yet, tried again
                problem = str(exc) or type(exc).__name__
            finally:
                channel.close()
        await asyncio.sleep(0.5)
    raise DeadlineExceeded(f"crishim did not answer on {socket} within {timeout:g}s: {problem}")


async def _remove_pods(socket: Path, timeout: float) -> int:
    if not socket.exists():
        return 0
    channel = Channel(path=str(socket))
    try:
        stub = v1.RuntimeServiceStub(channel)
        listed = await stub.list_pod_sandbox(v1.ListPodSandboxRequest(), timeout=timeout)
        for pod in listed.items:
            await stub.stop_pod_sandbox(
                v1.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=timeout
            )
            await stub.remove_pod_sandbox(
                v1.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=timeout
            )
        return len(listed.items)
    except (TimeoutError, OSError, GRPCError) as exc:
        raise FailedPrecondition(f"removing the pods of the runtime on {socket}: {exc}") from exc
    finally:
        channel.close()
