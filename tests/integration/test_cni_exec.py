"""CNI ADD/CHECK/DEL with the real plugins of /usr/lib/cni (bridge, host-local, portmap, loopback).

Network safety: the tests use their own conf dir, their own bridge (``crishim-t0``), their
own private subnet (10.88.213.0/24, skipped if the host routes it) and host-local data dir,
and send traffic only between namespaces they created. The fixture removes the namespaces,
the bridge and the iptables chains portmap created for this subnet, and checks that nothing
naming the subnet or the test's host port is left in iptables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crishim.errors import Unavailable
from crishim.network.cni import CniManager
from crishim.network.cni_result import pod_ips
from crishim.network.netns import PodNamespaces, create_pod_namespaces, remove_pod_namespaces
from tests.rig.host import drop_chain, iptables_chains, iptables_rules, run

pytestmark = pytest.mark.root

CNI_BIN = "/usr/lib/cni"
BRIDGE = "crishim-t0"
SUBNET = "10.88.213.0/24"
SUBNET_PREFIX = "10.88.213."
NETWORK = "crishim-t0-net"
HOST_PORT = 38213
BRIDGE_MAC = "02:00:0a:58:d5:01"
# portmap's shared chains: created by the first pod with a port mapping, never removed by it.
PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")

# An ICMP echo over a raw socket (the image has no ping): exits 0 when the peer answers.
PING = r"""
import os, socket, struct, sys, time
def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(1.0)
for seq in range(3):
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"crishim-ping"
    packet = struct.pack("!BBHHH", 8, 0, checksum(header), ident, seq) + b"crishim-ping"
    sock.sendto(packet, (sys.argv[1], 0))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            break
        icmp = data[(data[0] & 0x0F) * 4:]
        kind, _, _, rid, _ = struct.unpack("!BBHHH", icmp[:8])
        if kind == 0 and rid == ident and addr[0] == sys.argv[1]:
            sys.exit(0)
sys.exit(1)
"""

FAILING_PLUGIN = """#!/bin/sh
cat >/dev/null
[ "$CNI_COMMAND" = ADD ] || exit 0
echo '{"cniVersion": "1.0.0", "code": 11, "msg": "fake failure for the test"}'
exit 1
"""


def cleanup_iptables(chains_before: dict[str, set[str]]) -> None:
    """Remove what portmap left for this test's subnet, and its shared chains if new and unused."""
    for table, before in chains_before.items():
        rules = iptables_rules(table)
        ours = {
            line.split()[1]
            for line in rules
            if line.startswith("-A CNI-DN-") and SUBNET_PREFIX in line
        }
        for chain in ours - before:
            drop_chain(table, chain)
        dnat_in_use = any(r.startswith("-A CNI-HOSTPORT-DNAT ") for r in iptables_rules(table))
        if not dnat_in_use:
            for chain in PORTMAP_CHAINS:
                if chain in iptables_chains(table) and chain not in before:
                    drop_chain(table, chain)


@dataclass
class NetEnv:
    """One test's private CNI setup."""

    conf_dir: Path
    bin_dirs: list[str]
    cache_dir: Path
    ipam_dir: Path
    ns_dir: Path
    pods: list[PodNamespaces]

    def manager(self) -> CniManager:
        return CniManager(str(self.conf_dir), self.bin_dirs, self.cache_dir)

    def write_conflist(self, *extra_plugins: dict[str, object]) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    # No gateway: the bridge plugin would otherwise switch on the host's
                    # ip_forward, and the pods need only to reach each other.
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET}]],
                        "dataDir": str(self.ipam_dir),
                    },
                },
                *extra_plugins,
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
        }
        (self.conf_dir / "10-crishim-test.conflist").write_text(json.dumps(conflist))

    async def pod(self, sandbox_id: str) -> str:
        ns = await create_pod_namespaces(
            self.ns_dir, sandbox_id, network=True, ipc=False, uts=False, hostname="", sysctls={}
        )
        self.pods.append(ns)
        assert ns.network is not None
        return ns.network

    def leases(self) -> list[str]:
        directory = self.ipam_dir / NETWORK
        if not directory.exists():
            return []
        return sorted(p.name for p in directory.iterdir() if p.name.startswith(SUBNET_PREFIX))


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetEnv]:
    if os.geteuid() != 0:
        pytest.skip("CNI plugins need root")
    if not os.access(f"{CNI_BIN}/bridge", os.X_OK):
        pytest.skip("CNI plugins missing: install the Debian package containernetworking-plugins")
    if run("ip", "route", "show", SUBNET).strip() or run("ip", "link", "show", BRIDGE, check=False):
        pytest.skip(f"{SUBNET} or bridge {BRIDGE} is already in use on this host")
    chains_before = {table: iptables_chains(table) for table in ("nat", "filter")}
    env = NetEnv(
        conf_dir=tmp_path / "net.d",
        bin_dirs=[str(tmp_path / "bin"), CNI_BIN],
        cache_dir=tmp_path / "cache",
        ipam_dir=tmp_path / "ipam",
        ns_dir=tmp_path / "ns",
        pods=[],
    )
    env.conf_dir.mkdir()
    (tmp_path / "bin").mkdir()
    try:
        # Created here with a fixed MAC (the bridge plugin reuses it): without a gateway
        # address the plugin leaves the bridge MAC to the kernel, which takes the lowest
        # port's MAC, so a second pod would make CHECK of the first fail
        # (containernetworking/plugins#60).
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "link", "set", BRIDGE, "address", BRIDGE_MAC)
        yield env
    finally:
        # Removing the namespaces destroys the pods' veth ends, and with them the host ends.
        for ns in env.pods:
            await remove_pod_namespaces(ns)
        run("ip", "link", "del", BRIDGE, check=False)
        cleanup_iptables(chains_before)
        if env.ns_dir.exists():
            run("umount", "-l", str(env.ns_dir), check=False)
    assert not run("ip", "link", "show", BRIDGE, check=False)
    for table in ("nat", "filter"):
        leftovers = [r for r in iptables_rules(table) if SUBNET_PREFIX in r or str(HOST_PORT) in r]
        assert not leftovers, leftovers


def pod_addresses(netns: str) -> str:
    return run("nsenter", f"--net={netns}", "ip", "-o", "-4", "addr", "show", "dev", "eth0")


def ping(netns: str, address: str) -> bool:
    done = subprocess.run(
        ["nsenter", f"--net={netns}", sys.executable, "-I", "-c", PING, address],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


async def test_two_pods_get_addresses_and_reach_each_other(net: NetEnv) -> None:
    net.write_conflist()
    cni = net.manager()
    ns_a = await net.pod("poda")
    ns_b = await net.pod("podb")
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "a"}
    result_a = (await cni.add("poda", ns_a, args=args)).result
    result_b = (await cni.add("podb", ns_b, args=args | {"K8S_POD_NAME": "b"})).result
    [ip_a] = pod_ips(result_a)
    [ip_b] = pod_ips(result_b)
    assert ip_a != ip_b
    assert ip_a.startswith(SUBNET_PREFIX)
    assert ip_b.startswith(SUBNET_PREFIX)
    assert result_a.ips[0].address.endswith("/24")
    assert f"inet {ip_a}/24" in pod_addresses(ns_a)
    assert f"inet {ip_b}/24" in pod_addresses(ns_b)
    assert net.leases() == sorted([ip_a, ip_b])

    assert ping(ns_a, ip_b)
    assert ping(ns_b, ip_a)

    await cni.check("poda", ns_a)
    await cni.check("podb", ns_b)

    await cni.delete("poda", ns_a)
    assert net.leases() == [ip_b]
    assert "eth0" not in run("nsenter", f"--net={ns_a}", "ip", "-o", "link")
    await cni.delete("poda", ns_a)  # idempotent
    await cni.delete("podb", ns_b)
    assert net.leases() == []


async def test_delete_after_restart_without_config_or_netns(net: NetEnv) -> None:
    net.write_conflist()
    ns_a = await net.pod("podc")
    ns_b = await net.pod("podd")
    [ip_a] = pod_ips((await net.manager().add("podc", ns_a)).result)
    [ip_b] = pod_ips((await net.manager().add("podd", ns_b)).result)
    assert net.leases() == sorted([ip_a, ip_b])

    # A restarted crishim finds an empty conf dir: DEL must rely on the cache alone.
    for conf in net.conf_dir.iterdir():
        conf.unlink()
    restarted = net.manager()
    assert restarted.status().config is None
    await restarted.delete("podc", ns_a)
    assert net.leases() == [ip_b]

    # The pod's namespace is already gone: plugins get an empty CNI_NETNS and still release.
    pod_d = net.pods.pop()
    await remove_pod_namespaces(pod_d)
    await restarted.delete("podd", ns_b)
    assert net.leases() == []
    await restarted.delete("podd", None)
    assert not list(net.cache_dir.iterdir())


async def test_port_mapping_creates_and_removes_dnat_rule(net: NetEnv) -> None:
    net.write_conflist()
    cni = net.manager()
    ns = await net.pod("pode")
    mapping = {"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
    [ip] = pod_ips((await cni.add("pode", ns, capabilities={"portMappings": [mapping]})).result)
    dnat = [r for r in iptables_rules("nat") if f"--dport {HOST_PORT}" in r and "DNAT" in r]
    assert dnat, iptables_rules("nat")
    assert any(f"{ip}:80" in r for r in dnat)
    # No CHECK here: portmap's CHECK of an IPv4-only pod with mappings looks for IPv6 rules
    # and fails (containernetworking/plugins#819).
    await cni.delete("pode", ns)
    assert not [r for r in iptables_rules("nat") if str(HOST_PORT) in r]


async def test_failing_plugin_raises_its_message_and_rolls_back(net: NetEnv) -> None:
    fake = Path(net.bin_dirs[0]) / "crishim-fail"
    fake.write_text(FAILING_PLUGIN)
    fake.chmod(0o755)
    net.write_conflist({"type": "crishim-fail"})
    ns = await net.pod("podf")
    with pytest.raises(Unavailable) as caught:
        await net.manager().add("podf", ns)
    assert "fake failure for the test" in str(caught.value)
    assert "crishim-fail" in str(caught.value)
    assert NETWORK in str(caught.value)
    # The bridge plugin had already run: the rollback DEL gave its address back.
    assert net.leases() == []
    assert "eth0" not in run("nsenter", f"--net={ns}", "ip", "-o", "link")
    assert not list(net.cache_dir.iterdir())
