"""The built-in default network through a real crishim, real CNI plugins and real pods (root).

A node whose conf dir is empty runs pods on crishim's built-in network (bridge, host-local,
portmap); a network plugin writing its config takes over for new pods without a restart,
while pods already on the default keep their address and are torn down on it, even after a
restart of crishim. With the default turned off, an empty conf dir keeps NetworkReady false.

Network safety: each crishim has its own conf dir, and the tests use their own bridges and
subnets for both networks (``crishim-dn0`` on 10.88.226.0/24 for the default,
``crishim-dn1`` on 10.88.227.0/24 for the "cluster" network written later, skipped if the
host already routes either or has either bridge) and their own host port. Teardown deletes
both bridges and whatever iptables rules name the subnets, then checks that nothing of them
is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import v1
from crishim.network.default_network import DEFAULT_NETWORK_NAME
from tests.rig.cni import bridge_conflist
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import PushedImage, require_busybox
from tests.rig.host import (
    conmons_of,
    drop_chain,
    iptables_chains,
    iptables_rules,
    mounts_under,
    run,
)
from tests.rig.pods import PORTMAP_CHAINS, PodRig

pytestmark = [pytest.mark.root]

CNI_BIN = "/usr/lib/cni"
DEFAULT_BRIDGE = "crishim-dn0"
DEFAULT_SUBNET = "10.88.226.0/24"
CLUSTER_BRIDGE = "crishim-dn1"
CLUSTER_SUBNET = "10.88.227.0/24"
CLUSTER_NETWORK = "crishim-dn1-net"
SUBNET_PREFIXES = ("10.88.226.", "10.88.227.")
HOST_PORT = 38226
# Answers every connection with the pod's hostname.
SERVE_HOSTNAME = ["/bin/busybox", "nc", "-ll", "-p", "80", "-e", "hostname"]
SLEEP = ["sleep", "1000"]


def subnet_rules() -> list[str]:
    """Every iptables rule (nat and filter) naming one of the tests' subnets or host port."""
    return [
        f"{table}: {rule}"
        for table in ("nat", "filter")
        for rule in iptables_rules(table)
        if any(prefix in rule for prefix in SUBNET_PREFIXES) or f"--dport {HOST_PORT}" in rule
    ]


def cleanup_iptables(chains_before: dict[str, set[str]]) -> None:
    """Drop the chains made for the tests' subnets, and portmap's shared ones if new and unused."""
    for table, before in chains_before.items():
        ours = {
            line.split()[1]
            for line in iptables_rules(table)
            if line.startswith("-A CNI-") and any(p in line for p in SUBNET_PREFIXES)
        } - set(PORTMAP_CHAINS)
        for chain in ours - before:
            drop_chain(table, chain)
        for line in iptables_rules(table):
            if line.startswith("-A ") and any(p in line for p in SUBNET_PREFIXES):
                run("iptables", "-t", table, "-D", *line.split()[1:], check=False)
        if not any(r.startswith("-A CNI-HOSTPORT-DNAT ") for r in iptables_rules(table)):
            for chain in PORTMAP_CHAINS:
                if chain in iptables_chains(table) and chain not in before:
                    drop_chain(table, chain)


def bridge_ports(bridge: str) -> list[str]:
    """The interfaces (pods' host-side veths) attached to ``bridge``."""
    out = run("ip", "-o", "link", "show", "master", bridge, check=False)
    return [line.split(":")[1].strip() for line in out.splitlines() if line.strip()]


def lease_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit())


def cluster_conflist(ipam_dir: Path) -> str:
    """What a cluster's network plugin would write: another bridge on another subnet."""
    return bridge_conflist(CLUSTER_NETWORK, CLUSTER_BRIDGE, CLUSTER_SUBNET, ipam_dir)


@dataclass
class DefaultNetRig:
    """A crishim whose conf dir starts empty, with its default network on a test bridge."""

    rig: PodRig
    cluster_ipam: Path

    @property
    def proc(self) -> CrishimProcess:
        return self.rig.proc

    @property
    def default_leases(self) -> Path:
        return self.proc.root / "cni-ipam" / DEFAULT_NETWORK_NAME

    @property
    def cluster_leases(self) -> Path:
        return self.cluster_ipam / CLUSTER_NETWORK

    def write_cluster_config(self) -> None:
        """Write the cluster network's conflist the way plugins do: a rename into place."""
        tmp = self.proc.cni_conf_dir / ".10-cluster.conflist.tmp"
        tmp.write_text(cluster_conflist(self.cluster_ipam))
        os.replace(tmp, self.proc.cni_conf_dir / "10-cluster.conflist")

    async def network_condition(self) -> v1.RuntimeCondition:
        reply = await self.rig.runtime.status(v1.StatusRequest())
        assert reply.status is not None
        return next(c for c in reply.status.conditions if c.type == "NetworkReady")

    async def pod_ip(self, pod_id: str) -> str:
        status = await self.rig.pod_status(pod_id)
        assert status.network is not None
        return status.network.ip

    async def pod_record(self, pod_id: str) -> dict[str, object]:
        """The sandbox record PodSandboxStatus shows in its verbose info."""
        reply = await self.rig.runtime.pod_sandbox_status(
            v1.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
        )
        record: dict[str, object] = json.loads(reply.info["info"])
        return record


def in_subnet(ip: str, subnet: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(subnet)


def fetch_host_port(port: int, timeout: float = 10.0) -> str:
    """What the pod behind the host port answers, connecting to the node's loopback."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                data = b""
                while chunk := conn.recv(100):
                    data += chunk
                if data:
                    return data.decode()
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"nothing answered on host port {port}: {iptables_rules('nat')}")
        time.sleep(0.1)


def require_pod_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("pods need root")
    for tool in ("conmon", "runc"):
        if not any(os.access(f"{d}/{tool}", os.X_OK) for d in os.get_exec_path()):
            pytest.skip(f"{tool} not found on PATH")
    if not os.access(f"{CNI_BIN}/bridge", os.X_OK):
        pytest.skip("CNI plugins missing: install the Debian package containernetworking-plugins")


@pytest.fixture
async def dnet(tmp_path: Path, busybox_pushed: PushedImage) -> AsyncIterator[DefaultNetRig]:
    require_pod_tools()
    require_busybox()
    for subnet, bridge in ((DEFAULT_SUBNET, DEFAULT_BRIDGE), (CLUSTER_SUBNET, CLUSTER_BRIDGE)):
        if run("ip", "route", "show", subnet).strip() or run(
            "ip", "link", "show", bridge, check=False
        ):
            pytest.skip(f"{subnet} or bridge {bridge} is already in use on this host")
    chains_before = {table: iptables_chains(table) for table in ("nat", "filter")}
    proc = CrishimProcess(
        tmp_path / "crishim",
        config=(
            f'default_runtime = "runc"\n\n[cni]\nbin_dirs = ["{CNI_BIN}"]\n\n'
            f'[cni.default_network]\nenabled = true\nsubnet = "{DEFAULT_SUBNET}"\n'
            f'bridge = "{DEFAULT_BRIDGE}"\n'
        ),
    )
    rig: PodRig | None = None
    try:
        await asyncio.to_thread(proc.start)
        rig = PodRig(
            runtime_name="runc",
            proc=proc,
            base=tmp_path,
            image=busybox_pushed.ref,
            image_id="",
            image_digest_ref=busybox_pushed.ref_by_digest,
            configured_image="",
            configured_image_id="",
        )
        pulled = await rig.images.pull_image(
            v1.PullImageRequest(image=v1.ImageSpec(image=busybox_pushed.ref))
        )
        rig.image_id = pulled.image_ref
        env = DefaultNetRig(rig, tmp_path / "cluster-ipam")
        yield env
        if proc.proc is None or proc.proc.poll() is not None:
            await asyncio.to_thread(proc.start)
            rig.connect()
        await asyncio.wait_for(rig.remove_all_pods(), 60)
        await rig.assert_nothing_left()
        assert lease_files(env.default_leases) == []
        assert lease_files(env.cluster_leases) == []
        assert bridge_ports(DEFAULT_BRIDGE) == []
        assert bridge_ports(CLUSTER_BRIDGE) == []
        assert subnet_rules() == []
    finally:
        if rig is not None:
            rig.close()
        proc.kill()
        for pid in conmons_of(proc):
            os.kill(pid, signal.SIGKILL)
        for bridge in (DEFAULT_BRIDGE, CLUSTER_BRIDGE):
            run("ip", "link", "del", bridge, check=False)
        cleanup_iptables(chains_before)
        for point in mounts_under(tmp_path):
            run("umount", "-R", "-l", point, check=False)
    assert subnet_rules() == []


async def test_pods_join_the_default_network_until_a_plugin_writes_its_config(
    dnet: DefaultNetRig,
) -> None:
    rig = dnet.rig
    condition = await dnet.network_condition()
    assert condition.status is True
    assert condition.reason == "DefaultNetworkInUse"
    assert DEFAULT_BRIDGE in condition.message
    assert DEFAULT_SUBNET in condition.message

    # A pod on the default network, reached through its host port (portmap).
    web = await rig.run_pod(
        "web",
        port_mappings=[
            v1.PortMapping(protocol=v1.Protocol.TCP, container_port=80, host_port=HOST_PORT)
        ],
    )
    web_ip = await dnet.pod_ip(web)
    assert in_subnet(web_ip, DEFAULT_SUBNET), f"{web_ip}{rig.log_tail()}"
    assert web_ip != "10.88.226.1"  # the bridge's (gateway) address
    record = await dnet.pod_record(web)
    assert (record["network"], record["network_config"]) == (
        DEFAULT_NETWORK_NAME,
        "built-in default",
    )
    assert lease_files(dnet.default_leases) == [web_ip]
    assert len(bridge_ports(DEFAULT_BRIDGE)) == 1
    assert DEFAULT_SUBNET in run("ip", "route", "show", "dev", DEFAULT_BRIDGE)
    assert os.listdir(dnet.proc.cni_conf_dir) == [], "crishim wrote into the conf dir"
    await rig.start_container(web, "serve", SERVE_HOSTNAME)
    assert (await asyncio.to_thread(fetch_host_port, HOST_PORT)).strip() == "web"

    # The cluster's network plugin writes its config: new pods join it, no restart needed.
    dnet.write_cluster_config()
    condition = await dnet.network_condition()
    assert (condition.status, condition.reason) == (True, "")
    other = await rig.run_pod("other")
    other_ip = await dnet.pod_ip(other)
    assert in_subnet(other_ip, CLUSTER_SUBNET), f"{other_ip}{rig.log_tail()}"
    record = await dnet.pod_record(other)
    assert record["network"] == CLUSTER_NETWORK
    assert record["network_config"] == str(dnet.proc.cni_conf_dir / "10-cluster.conflist")
    assert lease_files(dnet.cluster_leases) == [other_ip]

    # The first pod keeps its address and its host port, across a restart of crishim too.
    await rig.restart()
    assert await dnet.pod_ip(web) == web_ip
    assert (await asyncio.to_thread(fetch_host_port, HOST_PORT)).strip() == "web"
    condition = await dnet.network_condition()
    assert (condition.status, condition.reason) == (True, "")

    # Removed, it is torn down on the default network: its address, veth and rules go.
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=web))
    assert lease_files(dnet.default_leases) == []
    assert bridge_ports(DEFAULT_BRIDGE) == []
    assert [r for r in subnet_rules() if "10.88.226." in r or str(HOST_PORT) in r] == []
    assert lease_files(dnet.cluster_leases) == [other_ip]
    assert len(bridge_ports(CLUSTER_BRIDGE)) == 1
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=other))
    assert lease_files(dnet.cluster_leases) == []


async def test_a_restart_before_the_switch_keeps_pods_on_the_default(dnet: DefaultNetRig) -> None:
    rig = dnet.rig
    pod = await rig.run_pod("early")
    ip = await dnet.pod_ip(pod)
    assert in_subnet(ip, DEFAULT_SUBNET)
    # crishim is down while the network plugin writes its config.
    rig.close()
    assert dnet.proc.terminate() == 0
    dnet.write_cluster_config()
    await asyncio.to_thread(dnet.proc.start)
    rig.connect()
    assert await dnet.pod_ip(pod) == ip
    late = await rig.run_pod("late")
    assert in_subnet(await dnet.pod_ip(late), CLUSTER_SUBNET)
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert lease_files(dnet.default_leases) == []
    assert bridge_ports(DEFAULT_BRIDGE) == []


async def test_pods_started_during_the_switch_each_get_one_network(dnet: DefaultNetRig) -> None:
    rig = dnet.rig
    count = 8

    async def start(index: int) -> str:
        await asyncio.sleep(index * 0.15)
        return await rig.run_pod(f"burst{index}")

    async def switch() -> None:
        await asyncio.sleep(0.5)
        dnet.write_cluster_config()

    switching = asyncio.create_task(switch())
    pods = await asyncio.gather(*(start(i) for i in range(count)))
    await switching
    on_default, on_cluster = [], []
    for pod in pods:
        ip = await dnet.pod_ip(pod)
        network = (await dnet.pod_record(pod))["network"]
        if network == DEFAULT_NETWORK_NAME:
            assert in_subnet(ip, DEFAULT_SUBNET), f"{pod[:12]} {ip}"
            on_default.append(ip)
        else:
            assert network == CLUSTER_NETWORK
            assert in_subnet(ip, CLUSTER_SUBNET), f"{pod[:12]} {ip}"
            on_cluster.append(ip)
    assert on_default, "no pod started before the switch"
    assert on_cluster, "no pod started after the switch"
    assert lease_files(dnet.default_leases) == sorted(on_default)
    assert lease_files(dnet.cluster_leases) == sorted(on_cluster)
    assert len(bridge_ports(DEFAULT_BRIDGE)) == len(on_default)
    assert len(bridge_ports(CLUSTER_BRIDGE)) == len(on_cluster)
    await asyncio.gather(
        *(
            rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=p))
            for p in pods
        )
    )
    assert lease_files(dnet.default_leases) == []
    assert lease_files(dnet.cluster_leases) == []
    assert bridge_ports(DEFAULT_BRIDGE) == []
    assert bridge_ports(CLUSTER_BRIDGE) == []


async def test_with_the_default_off_an_empty_conf_dir_means_not_ready(tmp_path: Path) -> None:
    require_pod_tools()
    # The test rig's config turns the default network off.
    proc = CrishimProcess(tmp_path / "crishim", config=f'[cni]\nbin_dirs = ["{CNI_BIN}"]\n')
    await asyncio.to_thread(proc.start)
    rig = PodRig("runc", proc, tmp_path, "", "", "", "", "")
    try:
        reply = await rig.runtime.status(v1.StatusRequest())
        assert reply.status is not None
        network = next(c for c in reply.status.conditions if c.type == "NetworkReady")
        assert (network.status, network.reason) == (False, "NetworkPluginNotReady")
        assert str(proc.cni_conf_dir) in network.message
        with pytest.raises(GRPCError) as caught:
            await rig.run_pod("nonet")
        assert caught.value.status is Status.UNAVAILABLE
        assert "network plugin not ready" in str(caught.value.message)
        assert (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items == []
        assert not (proc.root / "cni-ipam").exists()
    finally:
        rig.close()
        proc.kill()
        proc.unmount_all()
