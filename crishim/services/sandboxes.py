"""Pod sandbox use cases: run, stop, remove, status and list.

A sandbox is a set of pinned namespaces (network, IPC, UTS, and user for a pod with
``hostUsers: false``) under the state directory,
its network (CNI), a /dev/shm, and the files containers mount: hostname, hosts and
resolv.conf. No infra container exists unless the pod shares one PID namespace; then a
catatonit process holds it. Every step of RunPodSandbox registers its undo, so a failure
leaves nothing behind. The network and the infra process need only the namespaces, so they
are set up (and, at stop, torn down) at the same time.

Contracts kept for recovery: the record is written only once the sandbox is ready; a
record whose namespaces are gone (after a reboot) is reported not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import FailedPrecondition, InvalidArgument, NotFound
from crishim.model import PodMetadata, Sandbox, SandboxFilter, SandboxState
from crishim.model.events import EventType
from crishim.model.specs import LinuxResources, NamespaceMode, SandboxConfig, UserNamespace
from crishim.model.userns import host_id_of, pod_userns
from crishim.network.cni import Attachment, CniManager
from crishim.network.netns import (
    PodNamespaces,
    create_pod_namespaces,
    namespace_alive,
    remove_pod_namespaces,
)
from crishim.runtime.cgroup_driver import CgroupDriver, CgroupfsDriver
from crishim.runtime.idmap import unsearchable_parent
from crishim.runtime.mounts import MountRequest, mount_all, unmount
from crishim.services.events import EventBus
from crishim.store import ObjectStore
from crishim.util.disk import disk_full_as
from crishim.util.fs import remove_tree
from crishim.util.tasks import join_shared, run_all

log = logging.getLogger(__name__)

SHM_SIZE_BYTES = 64 * 1024 * 1024


@dataclass
class SandboxPaths:
    """Where a sandbox's files live under the state directory."""

    base: Path

    @property
    def hostname(self) -> Path:
        return self.base / "hostname"

    @property
    def hosts(self) -> Path:
        return self.base / "hosts"

    @property
    def resolv_conf(self) -> Path:
        return self.base / "resolv.conf"

    @property
    def shm(self) -> Path:
        return self.base / "shm"


# Called to stop (and optionally remove) every container of a sandbox; set by the app.
ContainerReaper = Callable[[str, bool], Awaitable[None]]
# Raises unless a runtime handler's binary is installed; set by the app.
RuntimeCheck = Callable[[str], None]
# Why a runtime handler cannot run pods with their own user namespace ("" = it can).
UsernsSupport = Callable[[str], str]
# Start and stop the process holding a shared PID namespace; set by the app.
InfraStarter = Callable[[Sandbox, SandboxConfig], Awaitable[int]]
InfraStopper = Callable[[Sandbox], Awaitable[None]]


class SandboxService:
    """Pod sandboxes as kubelet sees them."""

    def __init__(
        self,
        store: ObjectStore[Sandbox],
        *,
        state_dir: Path,
        cni: CniManager | None = None,
        runtime_handlers: tuple[str, ...] = ("runc", "crun"),
        events: EventBus | None = None,
        cgroups: CgroupDriver | None = None,
    ) -> None:
        self._store = store
        self._state = state_dir
        self._cni = cni
        self._handlers = runtime_handlers
        self._events = events or EventBus()
        self._cgroups = cgroups or CgroupfsDriver()
        self._pod_cidr = ""
        self._creating: dict[tuple[str, str, str, int], asyncio.Task[Sandbox]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.reap_containers: ContainerReaper | None = None
        self.check_runtime: RuntimeCheck | None = None
        self.userns_support: UsernsSupport | None = None
        self.start_infra: InfraStarter | None = None
        self.stop_infra: InfraStopper | None = None

    # ---- queries ------------------------------------------------------------------------

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        """Sandboxes matching ``criteria``, oldest first."""
        found = [s for s in self._store.list() if criteria.matches(s)]
        found.sort(key=lambda s: s.created_at)
        return found

    def count(self) -> int:
        """How many sandboxes exist."""
        return len(self._store)

    def ids(self) -> list[str]:
        """The id of every sandbox."""
        return [s.id for s in self._store.list()]

    def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox with this id (or a unique prefix of it); NotFound otherwise."""
        found = self._store.find(sandbox_id)
        if found is not None:
            return found
        matches = [s for s in self._store.list() if sandbox_id and s.id.startswith(sandbox_id)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"pod sandbox {sandbox_id!r} not found")

    def find(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with exactly this id, or None."""
        return self._store.find(sandbox_id)

    def set_pod_cidr(self, cidr: str) -> None:
        """The node's pod CIDR from kubelet, offered to CNI IPAM as the ipRanges capability."""
        if cidr:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InvalidArgument(f"pod CIDR {cidr!r} is not a network") from None
        self._pod_cidr = cidr
        log.info("pod CIDR set to %s", cidr or "(none)")

    async def update_resources(self, sandbox_id: str, resources: LinuxResources | None) -> None:
        """Apply pod-level resources to the pod's cgroup (its cgroup parent), through the
        cgroup driver."""
        sandbox = self.get(sandbox_id)
        if resources is None:
            return
        if not sandbox.cgroup_parent:
            raise FailedPrecondition(
                f"pod sandbox {sandbox.id} has no cgroup parent to apply pod resources to"
            )
        await self._cgroups.update_pod_resources(sandbox.cgroup_parent, resources)

    def paths(self, sandbox_id: str) -> SandboxPaths:
        """The sandbox's files."""
        return SandboxPaths(self._state / "sandboxes" / sandbox_id)

    async def refresh(self) -> None:
        """After a restart: sandboxes whose namespaces are gone (a reboot) are not ready."""
        for sandbox in self._store.list():
            if sandbox.state is not SandboxState.READY:
                continue
            pins = [p for p in (sandbox.netns, sandbox.ipcns, sandbox.utsns, sandbox.userns) if p]
            if all(namespace_alive(p) for p in pins):
                continue
            log.warning("sandbox %s lost its namespaces: marking it not ready", sandbox.id[:12])
            await self._store.update(
                sandbox.id, lambda s: s.model_copy(update={"state": SandboxState.NOTREADY})
            )

    # ---- run ----------------------------------------------------------------------------

    async def run(self, config: SandboxConfig, runtime_handler: str) -> Sandbox:
        """Create a ready sandbox. A retry of a run still in progress joins it."""
        meta = config.metadata
        if meta is None or not meta.name or not meta.namespace or not meta.uid:
            raise InvalidArgument("sandbox config: metadata name, namespace and uid are required")
        # A parent the cgroup driver cannot use is refused now, not at the first container.
        self._cgroups.pod_cgroup(config.linux.cgroup_parent if config.linux else "")
        handler = runtime_handler or ""
        if handler and handler not in self._handlers:
            known = ", ".join(self._handlers)
            raise InvalidArgument(f"runtime handler {handler!r} is not configured (known: {known})")
        key = (meta.name, meta.namespace, meta.uid, meta.attempt)
        for existing in self._store.list():
            m = existing.metadata
            if (m.name, m.namespace, m.uid, m.attempt) == key:
                if existing.state is SandboxState.READY:
                    return existing
                raise FailedPrecondition(
                    f"pod sandbox {meta.name}/{meta.namespace} attempt {meta.attempt} exists as "
                    f"{existing.id} and is not ready; remove it first"
                )
        userns = pod_userns(config.namespace_options)
        if userns is not None:
            why_not = self.userns_support(handler) if self.userns_support else "not set up"
            why_not = why_not or unsearchable_parent(self._state)
            if why_not:
                raise FailedPrecondition(
                    f"runtime handler {handler or '(default)'!r} cannot run pods in a user "
                    f"namespace of their own here: {why_not}"
                )
        if self.check_runtime is not None:
            # Before anything is made: no container of the pod could run.
            self.check_runtime(handler)
        task = self._creating.get(key)
        if task is None:
            task = asyncio.create_task(self._run(config, handler))
            self._creating[key] = task
            task.add_done_callback(lambda _: self._creating.pop(key, None))
        return await join_shared(task, f"run of pod sandbox {meta.namespace}/{meta.name}")

    async def _run(self, config: SandboxConfig, handler: str) -> Sandbox:
        assert config.metadata is not None
        sandbox_id = secrets.token_hex(32)
        paths = self.paths(sandbox_id)
        linux = config.linux
        ns_opts = config.namespace_options  # all POD when unset, as the CRI defines it
        host_network = ns_opts.network is NamespaceMode.NODE
        host_ipc = ns_opts.ipc is NamespaceMode.NODE
        host_pid = ns_opts.pid is NamespaceMode.NODE
        shared_pid = ns_opts.pid is NamespaceMode.POD
        # Like containerd: no hostname asked for means the node's name.
        hostname = config.hostname or os.uname().nodename
        sysctls = dict(linux.sysctls) if linux else {}
        userns = pod_userns(ns_opts)
        async with contextlib.AsyncExitStack() as undo:
            with disk_full_as("making the pod sandbox directory", paths.base):
                paths.base.mkdir(parents=True, exist_ok=True)
            undo.push_async_callback(remove_tree, paths.base)
            namespaces = await create_pod_namespaces(
                self._state / "ns",
                sandbox_id,
                network=not host_network,
                ipc=not host_ipc,
                uts=not host_network,
                hostname=hostname,
                sysctls=sysctls,
                userns=userns,
            )
            undo.push_async_callback(remove_pod_namespaces, namespaces)
            await self._make_shm(paths, host_ipc, userns)
            undo.push_async_callback(unmount, paths.shm)
            record = Sandbox(
                id=sandbox_id,
                metadata=PodMetadata(
                    name=config.metadata.name,
                    uid=config.metadata.uid,
                    namespace=config.metadata.namespace,
                    attempt=config.metadata.attempt,
                ),
                state=SandboxState.READY,
                created_at=time.time_ns(),
                labels=dict(config.labels),
                annotations=dict(config.annotations),
                runtime_handler=handler,
                hostname=hostname,
                log_directory=config.log_directory,
                cgroup_parent=linux.cgroup_parent if linux else "",
                host_network=host_network,
                host_ipc=host_ipc,
                host_pid=host_pid,
                shared_pid=shared_pid,
                netns=namespaces.network or "",
                ipcns=namespaces.ipc or "",
                utsns=namespaces.uts or "",
                userns=namespaces.user or "",
                config=config.model_dump(mode="json"),
            )
            # The network and the infra process need only the namespaces: they start at
            # once. Each registers its undo the moment it has succeeded.
            attachment: Attachment | None
            infra_pid: int
            attachment, infra_pid = await run_all(
                self._attach(undo, sandbox_id, namespaces.network, config),
                self._start_infra(undo, record, config),
            )
            ips = [ip.address.split("/")[0] for ip in attachment.result.ips] if attachment else []
            with disk_full_as("writing hostname, hosts and resolv.conf in", paths.base):
                self._write_files(paths, config, hostname, ips, host_network)
            sandbox = record.model_copy(
                update={
                    "ips": ips,
                    "network_ready": attachment is not None,
                    "network": attachment.network if attachment else "",
                    "network_config": attachment.source if attachment else "",
                    "infra_pid": infra_pid,
                }
            )
            await self._store.add(sandbox)
            undo.pop_all()
        self._events.publish(sandbox.id, sandbox.id, EventType.CREATED)
        self._events.publish(sandbox.id, sandbox.id, EventType.STARTED)
        log.info(
            "sandbox %s ready (%s/%s, %s)",
            sandbox_id[:12],
            config.metadata.namespace,
            config.metadata.name,
            f"ips {', '.join(ips)} on network {sandbox.network}" if ips else "host network",
        )
        return sandbox

    async def _attach(
        self,
        undo: contextlib.AsyncExitStack,
        sandbox_id: str,
        netns: str | None,
        config: SandboxConfig,
    ) -> Attachment | None:
        """The pod's network (none for a host-network pod), its undo registered."""
        if netns is None:
            return None
        attachment = await self._network_up(sandbox_id, netns, config)
        undo.push_async_callback(self._network_down, sandbox_id, netns)
        return attachment

    async def _start_infra(
        self, undo: contextlib.AsyncExitStack, sandbox: Sandbox, config: SandboxConfig
    ) -> int:
        """The pid of the pod's infra process (0: the pod shares no PID namespace), its
        undo registered."""
        if not sandbox.shared_pid:
            return 0
        if self.start_infra is None:
            raise FailedPrecondition("pods sharing a PID namespace are not supported here")
        infra_pid = await self.start_infra(sandbox, config)
        if self.stop_infra is not None:
            undo.push_async_callback(self.stop_infra, sandbox)
        return infra_pid

    async def _make_shm(
        self, paths: SandboxPaths, host_ipc: bool, userns: UserNamespace | None
    ) -> None:
        paths.shm.mkdir(parents=True, exist_ok=True)
        if host_ipc:
            return  # containers bind the host's /dev/shm
        options: tuple[str, ...] = ("nosuid", "nodev", "noexec", "mode=1777")
        options += (f"size={SHM_SIZE_BYTES}",)
        if userns is not None:
            # Owned by the pod's root, as it is in a pod of the node's user namespace.
            uid, gid = host_id_of(0, userns.uids), host_id_of(0, userns.gids)
            options += (f"uid={uid}", f"gid={gid}")
        await mount_all([MountRequest("tmpfs", "shm", options)], paths.shm)

    async def _network_up(self, sandbox_id: str, netns: str, config: SandboxConfig) -> Attachment:
        if self._cni is None:
            raise FailedPrecondition("no CNI network is configured; only host-network pods can run")
        assert config.metadata is not None
        ports = [
            {
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.name.lower(),
                "hostIP": p.host_ip,
            }
            for p in config.port_mappings
            if p.host_port
        ]
        capabilities: dict[str, object] = {}
        if ports:
            capabilities["portMappings"] = ports
        if self._pod_cidr:
            capabilities["ipRanges"] = [[{"subnet": self._pod_cidr}]]
        return await self._cni.add(
            sandbox_id,
            netns,
            args={
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": config.metadata.namespace,
                "K8S_POD_NAME": config.metadata.name,
                "K8S_POD_INFRA_CONTAINER_ID": sandbox_id,
                "K8S_POD_UID": config.metadata.uid,
            },
            capabilities=capabilities,
        )

    async def _network_down(self, sandbox_id: str, netns: str | None) -> None:
        if self._cni is not None:
            await self._cni.delete(sandbox_id, netns)

    @staticmethod
    def _write_files(
        paths: SandboxPaths,
        config: SandboxConfig,
        hostname: str,
        ips: list[str],
        host_network: bool,
    ) -> None:
        paths.hostname.write_text(hostname + "\n")
        if host_network:
            shutil.copyfile("/etc/hosts", paths.hosts)
        else:
            lines = [
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost ip6-localhost ip6-loopback",
                "fe00::0\tip6-localnet",
                "fe00::0\tip6-mcastprefix",
                "fe00::1\tip6-allnodes",
                "fe00::2\tip6-allrouters",
            ]
            lines += [f"{ip}\t{hostname}" for ip in ips]
            paths.hosts.write_text("\n".join(lines) + "\n")
        dns = config.dns_config
        if dns is not None and (dns.servers or dns.searches or dns.options):
            text = "".join(f"nameserver {s}\n" for s in dns.servers)
            if dns.searches:
                text += "search " + " ".join(dns.searches) + "\n"
            if dns.options:
                text += "options " + " ".join(dns.options) + "\n"
            paths.resolv_conf.write_text(text)
        else:
            shutil.copyfile("/etc/resolv.conf", paths.resolv_conf)

    # ---- stop and remove ----------------------------------------------------------------

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    async def stop(self, sandbox_id: str) -> None:
        """Stop every container, tear down the network; idempotent; missing is fine."""
        try:
            sandbox = self.get(sandbox_id)
        except NotFound:
            return
        async with self._lock(sandbox.id):
            if self.reap_containers is not None:
                await self.reap_containers(sandbox.id, False)
            sandbox = self._store.get(sandbox.id)
            # The infra process and the network are independent: both go at once. Once
            # both are gone the record says so, and a second stop (remove's) skips them.
            teardown = []
            if sandbox.infra_pid and self.stop_infra is not None:
                teardown.append(self.stop_infra(sandbox))
            if sandbox.network_ready:
                teardown.append(self._network_down(sandbox.id, sandbox.netns or None))
            await run_all(*teardown)
            await unmount(self.paths(sandbox.id).shm)
            was_ready = sandbox.state is SandboxState.READY
            await self._store.update(
                sandbox.id,
                lambda s: s.model_copy(
                    update={"state": SandboxState.NOTREADY, "network_ready": False, "infra_pid": 0}
                ),
            )
        if was_ready:
            self._events.publish(sandbox.id, sandbox.id, EventType.STOPPED)

    async def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything in it, stopping first; missing is fine."""
        try:
            sandbox = self.get(sandbox_id)
        except NotFound:
            return
        await self.stop(sandbox.id)
        async with self._lock(sandbox.id):
            if self.reap_containers is not None:
                await self.reap_containers(sandbox.id, True)
            sandbox = self._store.get(sandbox.id)
            await remove_pod_namespaces(
                PodNamespaces(
                    network=sandbox.netns or None,
                    ipc=sandbox.ipcns or None,
                    uts=sandbox.utsns or None,
                    user=sandbox.userns or None,
                )
            )
            await remove_tree(self.paths(sandbox.id).base)
            await self._store.delete(sandbox.id)
        self._locks.pop(sandbox.id, None)
        self._events.publish(sandbox.id, sandbox.id, EventType.DELETED, removed_sandbox=sandbox)
