"""Pods through crishim's CRI socket: a real crishim with a private CNI network, per runtime.

``pod_rig`` (module scope, parametrised over runc and crun) starts one crishim whose pods
join bridge ``crishim-pt0`` on 10.88.215.0/24 (host-local leases in the test's tmp dir,
then portmap and loopback), pulls the rig's busybox images and yields a :class:`PodRig`.
``rig`` (function scope) hands out the same rig and, after each test, removes every pod
through the CRI and checks that no container, conmon or iptables rule of the test is left.

Import both fixtures into a test module (``from tests.rig.pods import pod_rig_fixture,
rig_fixture``); tests of such a module run on the module's event loop
(``pytestmark = pytest.mark.asyncio(loop_scope="module")``).

Network safety: the bridge, subnet and host ports are the rig's own; the fixture skips when
the host already routes the subnet or has the bridge. Teardown deletes the bridge, the
iptables chains and rules portmap created for the subnet and, lazily, every mount left
under the tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpclib.client import Channel

from crishim.api import v1
from tests.rig.cni import bridge_conflist
from tests.rig.crishim_fixtures import CriClient
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import PushedImage, require_busybox
from tests.rig.host import (
    active_snapshots,
    cgroups_of,
    conmons_of,
    drop_chain,
    entries,
    iptables_chains,
    iptables_rules,
    mounts_below,
    mounts_under,
    run,
)
from tests.rig.oci_image import DEFAULT_PATH_ENV, busybox_image, push
from tests.rig.registry import Registry

__all__ = [
    "BRIDGE",
    "NETWORK",
    "SUBNET",
    "SUBNET_PREFIX",
    "PodRig",
    "force_cleanup",
    "pod_rig_fixture",
    "rig_fixture",
]

CNI_BIN = "/usr/lib/cni"
BRIDGE = "crishim-pt0"
BRIDGE_MAC = "02:00:0a:58:d7:01"
SUBNET = "10.88.215.0/24"
SUBNET_PREFIX = "10.88.215."
NETWORK = "crishim-pt0-net"
RUNTIMES = ("runc", "crun")
# portmap's shared chains: created by the first pod with a port mapping, never removed by it.
PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")
# An image whose config sets what containers inherit: entrypoint, cmd, env, working dir.
CONFIGURED_REPO = "library/busybox-configured"
CONFIGURED_ENV = [DEFAULT_PATH_ENV, "FROM_IMAGE=image", "OVERRIDDEN=image"]
CONFIGURED_ENTRYPOINT = ["/bin/sh", "-c"]
# (exit 0 last: busybox sh would otherwise exec the last command in place of itself)
CONFIGURED_CMD = ["echo from-image-cmd; sleep 1000; exit 0"]
CONFIGURED_WORKDIR = "/var/www"


# ---- iptables ------------------------------------------------------------------------------


def subnet_rules() -> list[str]:
    """Every iptables rule (nat and filter) naming the rig's subnet."""
    return [
        f"{table}: {rule}"
        for table in ("nat", "filter")
        for rule in iptables_rules(table)
        if SUBNET_PREFIX in rule
    ]


def cleanup_iptables(chains_before: dict[str, set[str]]) -> None:
    """Remove what portmap and bridge left for the subnet, and new shared chains if unused."""
    for table, before in chains_before.items():
        rules = iptables_rules(table)
        ours = {
            line.split()[1]
            for line in rules
            if line.startswith("-A CNI-") and SUBNET_PREFIX in line
        } - set(PORTMAP_CHAINS)
        for chain in ours - before:
            drop_chain(table, chain)
        for line in iptables_rules(table):
            if line.startswith("-A ") and SUBNET_PREFIX in line:
                run("iptables", "-t", table, "-D", *shlex.split(line)[1:], check=False)
        dnat_in_use = any(r.startswith("-A CNI-HOSTPORT-DNAT ") for r in iptables_rules(table))
        if not dnat_in_use:
            for chain in PORTMAP_CHAINS:
                if chain in iptables_chains(table) and chain not in before:
                    drop_chain(table, chain)


def leases(ipam_dir: Path) -> list[str]:
    """The addresses host-local has handed out on the rig's network."""
    directory = ipam_dir / NETWORK
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(SUBNET_PREFIX))


# ---- the rig -------------------------------------------------------------------------------


@dataclass
class PodRig:
    """One crishim on one runtime, its client and helpers for pods and containers."""

    runtime_name: str
    proc: CrishimProcess
    base: Path
    image: str
    image_id: str
    image_digest_ref: str
    configured_image: str
    configured_image_id: str
    cri: CriClient = field(init=False)
    #: every pod and container id handed out, to look for their cgroups afterwards
    created: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.connect()

    # -- connection --

    def connect(self) -> None:
        channel = Channel(path=str(self.proc.socket))
        self.cri = CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))

    def close(self) -> None:
        self.cri.channel.close()

    @property
    def runtime(self) -> v1.RuntimeServiceStub:
        return self.cri.runtime

    @property
    def images(self) -> v1.ImageServiceStub:
        return self.cri.images

    def log_tail(self) -> str:
        """The end of crishim's log, for assertion messages."""
        return "\n--- crishim log tail ---\n" + self.proc.log()[-3000:]

    @property
    def ipam_dir(self) -> Path:
        return self.base / "ipam"

    @property
    def log_dir(self) -> Path:
        return self.base / "pod-logs"

    async def restart(self, *, kill: bool = False, down_seconds: float = 0.0) -> None:
        """Stop crishim (SIGTERM, or SIGKILL with ``kill``), wait, start it again."""
        self.close()
        if kill:
            self.proc.kill()
        else:
            code = self.proc.terminate()
            assert code == 0, f"crishim exited {code} on SIGTERM{self.log_tail()}"
        if down_seconds:
            await asyncio.sleep(down_seconds)
        await asyncio.to_thread(self.proc.start)
        self.connect()

    # -- configs as kubelet builds them --

    def sandbox_config(
        self,
        name: str,
        *,
        network: v1.NamespaceMode = v1.NamespaceMode.POD,
        pid: v1.NamespaceMode = v1.NamespaceMode.CONTAINER,
        ipc: v1.NamespaceMode = v1.NamespaceMode.POD,
        **overrides: Any,
    ) -> v1.PodSandboxConfig:
        uid = overrides.pop("uid", str(uuid.uuid4()))
        attempt = overrides.pop("attempt", 0)
        namespace = overrides.pop("namespace", "crishim-test")
        log_directory = self.log_dir / f"{namespace}_{name}_{uid}"
        values: dict[str, Any] = {
            "metadata": v1.PodSandboxMetadata(
                name=name, uid=uid, namespace=namespace, attempt=attempt
            ),
            "hostname": name,
            "log_directory": str(log_directory),
            "dns_config": v1.DnsConfig(
                servers=["10.96.0.10"],
                searches=[f"{namespace}.svc.cluster.local", "svc.cluster.local"],
                options=["ndots:5"],
            ),
            "port_mappings": [
                v1.PortMapping(protocol=v1.Protocol.TCP, container_port=80, host_port=0)
            ],
            "labels": {
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
                "app": name,
            },
            "annotations": {"kubernetes.io/config.source": "api"},
            "linux": v1.LinuxPodSandboxConfig(
                cgroup_parent="",
                security_context=v1.LinuxSandboxSecurityContext(
                    namespace_options=v1.NamespaceOption(network=network, pid=pid, ipc=ipc)
                ),
            ),
        }
        values.update(overrides)
        return v1.PodSandboxConfig(**values)

    def container_config(
        self,
        name: str,
        command: list[str] | None = None,
        namespaces: v1.NamespaceOption | None = None,
        **overrides: Any,
    ) -> v1.ContainerConfig:
        """A container config as kubelet builds it; ``namespaces`` are the pod's (kubelet
        gives containers the namespace options of their pod), filled into an overriding
        ``linux`` whose security context names none."""
        if namespaces is None:  # not ``or``: a message with only default values is falsy
            namespaces = v1.NamespaceOption(
                network=v1.NamespaceMode.POD,
                pid=v1.NamespaceMode.CONTAINER,
                ipc=v1.NamespaceMode.POD,
            )
        attempt = overrides.pop("attempt", 0)
        linux = overrides.pop(
            "linux",
            v1.LinuxContainerConfig(
                resources=v1.LinuxContainerResources(cpu_shares=2, oom_score_adj=1000),
                security_context=v1.LinuxContainerSecurityContext(),
            ),
        )
        if linux is not None:
            if linux.security_context is None:
                linux.security_context = v1.LinuxContainerSecurityContext()
            if linux.security_context.namespace_options is None:
                linux.security_context.namespace_options = namespaces
        values: dict[str, Any] = {
            "metadata": v1.ContainerMetadata(name=name, attempt=attempt),
            "image": v1.ImageSpec(image=self.image, user_specified_image=self.image),
            "command": command or [],
            "log_path": f"{name}/{attempt}.log",
            "labels": {"io.kubernetes.container.name": name},
            "annotations": {"io.kubernetes.container.restartCount": str(attempt)},
            "linux": linux,
        }
        values.update(overrides)
        return v1.ContainerConfig(**values)

    # -- helpers --

    async def run_pod(self, name: str, **config_overrides: Any) -> str:
        """RunPodSandbox with a kubelet-like config; the sandbox id."""
        config = self.sandbox_config(name, **config_overrides)
        reply = await self.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
        assert reply.pod_sandbox_id, f"no sandbox id{self.log_tail()}"
        self.created.add(reply.pod_sandbox_id)
        return reply.pod_sandbox_id

    async def pod_status(self, pod_id: str) -> v1.PodSandboxStatus:
        status = (
            await self.runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        ).status
        assert status is not None
        return status

    async def create_container(
        self, pod_id: str, name: str, command: list[str] | None = None, **overrides: Any
    ) -> str:
        """CreateContainer (not started); the container id."""
        pod = await self.pod_status(pod_id)
        assert pod.metadata is not None
        assert pod.linux is not None
        assert pod.linux.namespaces is not None
        options = pod.linux.namespaces.options
        assert options is not None
        sandbox_config = self.sandbox_config(
            pod.metadata.name,
            uid=pod.metadata.uid,
            namespace=pod.metadata.namespace,
            network=options.network,
            pid=options.pid,
            ipc=options.ipc,
        )
        reply = await self.runtime.create_container(
            v1.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=self.container_config(name, command, options, **overrides),
                sandbox_config=sandbox_config,
            )
        )
        assert reply.container_id, f"no container id{self.log_tail()}"
        self.created.add(reply.container_id)
        return reply.container_id

    async def create_container_raw(
        self, pod_id: str, config: v1.ContainerConfig
    ) -> v1.CreateContainerResponse:
        """CreateContainer with exactly this config (for error cases)."""
        return await self.runtime.create_container(
            v1.CreateContainerRequest(pod_sandbox_id=pod_id, config=config)
        )

    async def start_container(
        self, pod_id: str, name: str, command: list[str] | None = None, **overrides: Any
    ) -> str:
        """CreateContainer then StartContainer; the container id."""
        cid = await self.create_container(pod_id, name, command, **overrides)
        await self.runtime.start_container(v1.StartContainerRequest(container_id=cid))
        return cid

    async def status(self, container_id: str, verbose: bool = False) -> v1.ContainerStatus:
        reply = await self.runtime.container_status(
            v1.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        )
        assert reply.status is not None
        return reply.status

    async def exec(self, container_id: str, *cmd: str, timeout: int = 10) -> v1.ExecSyncResponse:
        return await self.runtime.exec_sync(
            v1.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        )

    async def exec_out(self, container_id: str, *cmd: str) -> str:
        """ExecSync that must exit 0; its stdout as text."""
        reply = await self.exec(container_id, *cmd)
        assert reply.exit_code == 0, (
            f"{cmd} exited {reply.exit_code}: {reply.stderr!r}{self.log_tail()}"
        )
        return reply.stdout.decode()

    async def wait_state(
        self, container_id: str, state: v1.ContainerState, timeout: float = 5.0
    ) -> v1.ContainerStatus:
        """Poll ContainerStatus until the container is in ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(container_id)
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                pytest.fail(
                    f"container {container_id[:12]} is {status.state.name} after {timeout}s, "
                    f"not {state.name}{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def until(
        self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def remove_all_pods(self) -> None:
        """RemovePodSandbox for every pod crishim knows."""
        listed = await self.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
        for item in listed.items:
            await self.runtime.remove_pod_sandbox(
                v1.RemovePodSandboxRequest(pod_sandbox_id=item.id)
            )

    async def assert_nothing_left(self, timeout: float = 5.0) -> None:
        """Fail unless :meth:`leftovers` comes back empty within ``timeout`` (conmons and
        runtimes take a moment to go)."""
        deadline = time.monotonic() + timeout
        left = await self.leftovers()
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            left = await self.leftovers()
        assert left == [], f"left behind: {left}{self.log_tail()}"

    async def leftovers(self) -> list[str]:
        """What a test left behind that removing its pods should have cleaned."""
        found: list[str] = []
        pods = (await self.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items
        found += [f"pod {p.id[:12]}" for p in pods]
        containers = (await self.runtime.list_containers(v1.ListContainersRequest())).containers
        found += [f"container {c.id[:12]}" for c in containers]
        found += [f"conmon pid {pid}" for pid in conmons_of(self.proc)]
        found += [f"lease {ip}" for ip in leases(self.ipam_dir)]
        for kind in ("containers", "sandboxes"):
            found += [f"mount {m}" for m in mounts_under(self.proc.state / kind)]
            found += [f"{kind} dir {d[:12]}" for d in entries(self.proc.state / kind)]
        for ns in ("net", "ipc", "uts", "user"):
            found += [f"mount {m}" for m in mounts_under(self.proc.state / "ns" / ns)]
            found += [f"{ns} pin {d[:12]}" for d in entries(self.proc.state / "ns" / ns)]
        # (``idmapped`` itself is a private mount point, made once and kept)
        found += [f"mount {m}" for m in mounts_below(self.proc.state / "idmapped")]
        found += [f"idmapped dir {d[:12]}" for d in entries(self.proc.state / "idmapped")]
        found += [f"exit file {e[:12]}" for e in entries(self.proc.state / "exits")]
        found += [f"attach dir {e[:12]}" for e in entries(self.proc.state / "attach")]
        found += [f"CNI cache {e[:12]}" for e in entries(self.proc.root / "cni-cache")]
        found += [f"snapshot of {name[:12]}" for name in active_snapshots(self.proc.root)]
        found += subnet_rules()
        runtime_root = self.proc.state / "runtimes" / self.runtime_name
        if runtime_root.is_dir():
            found += [f"{self.runtime_name} state {p.name[:12]}" for p in runtime_root.iterdir()]
        found += [f"cgroup {c}" for c in cgroups_of(self.created)]
        return found


def _write_conflist(proc: CrishimProcess, ipam_dir: Path) -> None:
    proc.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = bridge_conflist(NETWORK, BRIDGE, SUBNET, ipam_dir)
    (proc.cni_conf_dir / "10-crishim-pods.conflist").write_text(conflist)


def force_cleanup(proc: CrishimProcess, runtime_name: str) -> None:
    """Last resort after a failed teardown: the conmons this instance started (by pid),
    then every container left in its runtime's state directory."""
    for pid in conmons_of(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runtime_root = proc.state / "runtimes" / runtime_name
    if runtime_root.is_dir():
        for entry in runtime_root.iterdir():
            run(
                runtime_name,
                "--root",
                str(runtime_root),
                "delete",
                "--force",
                entry.name,
                check=False,
            )


@pytest_asyncio.fixture(
    name="pod_rig", scope="module", loop_scope="module", params=RUNTIMES, ids=list(RUNTIMES)
)
async def pod_rig_fixture(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    registry: Registry,
    busybox_pushed: PushedImage,
) -> AsyncIterator[PodRig]:
    """crishim on runc or crun with the rig's CNI network and busybox images pulled."""
    if os.geteuid() != 0:
        pytest.skip("pods need root")
    for tool in ("conmon", "catatonit", request.param):
        if not any(os.access(f"{d}/{tool}", os.X_OK) for d in os.get_exec_path()):
            pytest.skip(f"{tool} not found on PATH")
    if not os.access(f"{CNI_BIN}/bridge", os.X_OK):
        pytest.skip("CNI plugins missing: install the Debian package containernetworking-plugins")
    require_busybox()
    if run("ip", "route", "show", SUBNET).strip() or run("ip", "link", "show", BRIDGE, check=False):
        pytest.skip(f"{SUBNET} or bridge {BRIDGE} is already in use on this host")
    runtime_name: str = request.param
    base = tmp_path_factory.mktemp(f"pods-{runtime_name}")
    configured = busybox_image(
        env=CONFIGURED_ENV,
        entrypoint=CONFIGURED_ENTRYPOINT,
        cmd=CONFIGURED_CMD,
        working_dir=CONFIGURED_WORKDIR,
    )
    push(registry.url, CONFIGURED_REPO, "pods", configured)
    configured_ref = f"{registry.host}/{CONFIGURED_REPO}:pods"
    chains_before = {table: iptables_chains(table) for table in ("nat", "filter")}
    proc = CrishimProcess(
        base / "crishim",
        config=f'default_runtime = "{runtime_name}"\n\n[cni]\nbin_dirs = ["{CNI_BIN}"]\n',
        # A module sets FD_CANARY to run crishim with threads that catch stray closes.
        fd_canary=getattr(request.module, "FD_CANARY", False),
    )
    rig: PodRig | None = None
    try:
        # A fixed MAC (the bridge plugin reuses an existing bridge): otherwise the kernel
        # gives the bridge its lowest port's MAC, racing plugins 1.1.1's CHECK.
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "link", "set", BRIDGE, "address", BRIDGE_MAC)
        run("ip", "link", "set", BRIDGE, "up")
        _write_conflist(proc, base / "ipam")
        await asyncio.to_thread(proc.start)
        rig = PodRig(
            runtime_name=runtime_name,
            proc=proc,
            base=base,
            image=busybox_pushed.ref,
            image_id="",
            image_digest_ref=busybox_pushed.ref_by_digest,
            configured_image=configured_ref,
            configured_image_id="",
        )
        for ref in (busybox_pushed.ref, configured_ref):
            pulled = await rig.images.pull_image(v1.PullImageRequest(image=v1.ImageSpec(image=ref)))
            assert pulled.image_ref.startswith("sha256:"), rig.log_tail()
            if ref == busybox_pushed.ref:
                rig.image_id = pulled.image_ref
            else:
                rig.configured_image_id = pulled.image_ref
        yield rig
    finally:
        try:
            if rig is not None and proc.proc is not None and proc.proc.poll() is None:
                await asyncio.wait_for(rig.remove_all_pods(), 60)
        finally:
            if rig is not None:
                rig.close()
            proc.kill()
            force_cleanup(proc, runtime_name)
            run("ip", "link", "del", BRIDGE, check=False)
            cleanup_iptables(chains_before)
            for point in mounts_under(base):
                run("umount", "-R", "-l", point, check=False)
    assert not run("ip", "link", "show", BRIDGE, check=False), f"bridge {BRIDGE} left"
    assert subnet_rules() == [], subnet_rules()
    assert mounts_under(base) == [], mounts_under(base)


@pytest_asyncio.fixture(name="rig", loop_scope="module")
async def rig_fixture(pod_rig: PodRig) -> AsyncIterator[PodRig]:
    """The module's rig; afterwards every pod is removed and nothing may be left."""
    try:
        yield pod_rig
    finally:
        if pod_rig.proc.proc is None or pod_rig.proc.proc.poll() is not None:
            await asyncio.to_thread(pod_rig.proc.start)
            pod_rig.connect()
        await asyncio.wait_for(pod_rig.remove_all_pods(), 60)
    await pod_rig.assert_nothing_left()
