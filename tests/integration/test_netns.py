"""Pod namespaces pinned by bind mounts: real namespaces, hostname, sysctls, rollback.

Every test works under its own temporary ns_dir; the fixture unmounts whatever is left there
(pins and the ns_dir mount itself), so no namespace outlives a test.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from crishim.errors import AlreadyExists, InvalidArgument
from crishim.network.netns import (
    PodNamespaces,
    create_pod_namespaces,
    namespace_alive,
    remove_pod_namespaces,
)

pytestmark = pytest.mark.root


def mountinfo_fields() -> list[list[str]]:
    """The fields before the " - " separator of each line of this process' mountinfo."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split(" - ")[0].split(" ") for line in lines]


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` in this mount namespace."""
    prefix = str(directory)
    points = [fields[4] for fields in mountinfo_fields()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def ns_run(kind: str, path: str, *argv: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--{kind}={path}", *argv], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def ns_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("pod namespaces need root (unshare, mount)")
    directory = tmp_path / "ns"
    yield directory
    for point in sorted(mounts_under(directory), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    assert not mounts_under(directory)


def pins(ns_dir: Path) -> list[Path]:
    return [p for p in ns_dir.rglob("*") if p.is_file()]


async def test_creates_real_namespaces_with_hostname_and_sysctls(ns_dir: Path) -> None:
    host_somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    host_port_start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip()
    host_shmmax = Path("/proc/sys/kernel/shmmax").read_text().strip()
    host_name = os.uname().nodename
    sysctls = {
        "net.core.somaxconn": "1234" if host_somaxconn != "1234" else "1235",
        "net/ipv4/ip_unprivileged_port_start": "0" if host_port_start != "0" else "1",
        "kernel.shmmax": "65536" if host_shmmax != "65536" else "65537",
    }
    ns = await create_pod_namespaces(
        ns_dir, "pod1", network=True, ipc=True, uts=True, hostname="pod-one", sysctls=sysctls
    )
    try:
        assert ns == PodNamespaces(
            str(ns_dir / "net" / "pod1"), str(ns_dir / "ipc" / "pod1"), str(ns_dir / "uts" / "pod1")
        )
        for kind, path in (("net", ns.network), ("ipc", ns.ipc), ("uts", ns.uts)):
            assert path is not None
            assert namespace_alive(path)
            assert os.stat(path).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino
        assert ns.network is not None
        assert ns.ipc is not None
        assert ns.uts is not None
        links = ns_run("net", ns.network, "ip", "-o", "link")
        assert len(links.splitlines()) == 1, links
        assert "lo:" in links
        assert ",UP" in links, "lo is brought up"
        assert ns_run("uts", ns.uts, "hostname") == "pod-one"
        assert os.uname().nodename == host_name
        somaxconn = ns_run("net", ns.network, "cat", "/proc/sys/net/core/somaxconn")
        assert somaxconn == sysctls["net.core.somaxconn"]
        port_start = ns_run(
            "net", ns.network, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"
        )
        assert port_start == sysctls["net/ipv4/ip_unprivileged_port_start"]
        assert ns_run("ipc", ns.ipc, "cat", "/proc/sys/kernel/shmmax") == sysctls["kernel.shmmax"]
        assert Path("/proc/sys/net/core/somaxconn").read_text().strip() == host_somaxconn
        assert Path("/proc/sys/kernel/shmmax").read_text().strip() == host_shmmax
    finally:
        await remove_pod_namespaces(ns)
    assert not pins(ns_dir)
    assert mounts_under(ns_dir) == [str(ns_dir)]
    assert not namespace_alive(ns_dir / "net" / "pod1")
    await remove_pod_namespaces(ns)  # idempotent


async def test_ns_dir_is_a_private_mount_point(ns_dir: Path) -> None:
    ns = await create_pod_namespaces(
        ns_dir, "pod2", network=True, ipc=False, uts=False, hostname="x", sysctls={}
    )
    await create_pod_namespaces(
        ns_dir, "pod3", network=True, ipc=False, uts=False, hostname="x", sysctls={}
    )
    own = [fields for fields in mountinfo_fields() if fields[4] == str(ns_dir)]
    assert len(own) == 1, "ns_dir is bind-mounted once, not once per pod"
    assert not any(tag.startswith(("shared:", "master:")) for tag in own[0][6:])
    assert ns.ipc is None
    assert ns.uts is None
    with pytest.raises(AlreadyExists):
        await create_pod_namespaces(
            ns_dir, "pod2", network=True, ipc=False, uts=False, hostname="x", sysctls={}
        )
    assert ns.network is not None
    assert namespace_alive(ns.network), "a refused duplicate leaves the existing pin alone"
    await remove_pod_namespaces(ns)
    await remove_pod_namespaces(PodNamespaces(str(ns_dir / "net" / "pod3"), None, None))
    assert not pins(ns_dir)


async def test_host_namespaces_need_no_pins(ns_dir: Path) -> None:
    ns = await create_pod_namespaces(
        ns_dir, "pod4", network=False, ipc=False, uts=False, hostname="h", sysctls={}
    )
    assert ns == PodNamespaces(None, None, None)
    await remove_pod_namespaces(ns)
    assert not ns_dir.exists()


@pytest.mark.parametrize(
    ("network", "ipc", "name", "complaint"),
    [
        (True, True, "kernel.panic", "not namespaced"),
        (True, True, "vm.swappiness", "not namespaced"),
        (True, True, "kernel.hostname", "not namespaced"),
        (True, True, "net/../../kernel/panic", "not a valid"),
        (True, True, "net.ipv4..x", "not a valid"),
        (True, True, "/proc/sys/net/x", "not a valid"),
        (False, True, "net.core.somaxconn", "host's network"),
        (True, False, "kernel.shmmax", "host's IPC"),
        (True, False, "fs.mqueue.msg_max", "host's IPC"),
    ],
)
async def test_refused_sysctls_name_the_sysctl(
    ns_dir: Path, network: bool, ipc: bool, name: str, complaint: str
) -> None:
    with pytest.raises(InvalidArgument, match=complaint) as caught:
        await create_pod_namespaces(
            ns_dir, "pod5", network=network, ipc=ipc, uts=True, hostname="h", sysctls={name: "1"}
        )
    assert name in str(caught.value)
    assert not ns_dir.exists(), "refused before anything was created"


async def test_failure_rolls_back_everything(ns_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"net.core.somaxconn='lots'"):
        await create_pod_namespaces(
            ns_dir,
            "pod6",
            network=True,
            ipc=True,
            uts=True,
            hostname="h",
            sysctls={"kernel.shmmax": "65536", "net.core.somaxconn": "lots"},
        )
    assert not pins(ns_dir)
    assert mounts_under(ns_dir) == [str(ns_dir)]


async def test_bad_sandbox_id_and_hostname_are_refused(ns_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="sandbox id"):
        await create_pod_namespaces(
            ns_dir, "../x", network=True, ipc=True, uts=True, hostname="h", sysctls={}
        )
    with pytest.raises(InvalidArgument, match="hostname"):
        await create_pod_namespaces(
            ns_dir, "pod7", network=True, ipc=True, uts=True, hostname="h" * 65, sysctls={}
        )
    assert not ns_dir.exists()


def test_namespace_alive_is_false_for_plain_and_missing_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    assert not namespace_alive(plain)
    assert not namespace_alive(tmp_path / "missing")
    assert namespace_alive("/proc/self/ns/net")


async def test_remove_tolerates_unmounted_and_missing_pins(tmp_path: Path) -> None:
    plain = tmp_path / "unmounted"
    plain.write_text("")
    await remove_pod_namespaces(PodNamespaces(str(plain), str(tmp_path / "gone"), None))
    assert not plain.exists()
