"""Cgroup, directory and network counters read from fake v1, v2 and hybrid trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crishim.network.stats import InterfaceStats, parse_net_dev, read_interfaces
from crishim.runtime.cgroup_stats import (
    CgroupMounts,
    CgroupPaths,
    CgroupSample,
    HierarchyMount,
    cgroup_for_path,
    combine,
    find_cgroup,
    read_stats,
)
from crishim.util.fs import directory_usage

PID = 4242
CG = "/kubepods/pod1/crishim-abc"
V1_UNLIMITED = "9223372036854771712"


def _write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text + "\n")


def _proc_cgroup(proc: Path, text: str) -> Path:
    _write(proc / str(PID), {"cgroup": text})
    return proc


def _v1_tree(root: Path) -> None:
    base = CG.lstrip("/")
    _write(root / "cpuacct" / base, {"cpuacct.usage": "123456789"})
    _write(
        root / "memory" / base,
        {
            "memory.usage_in_bytes": "10000",
            "memory.limit_in_bytes": "50000",
            "memory.memsw.usage_in_bytes": "10600",
            "memory.memsw.limit_in_bytes": "60000",
            "memory.stat": "cache 5000\nrss 4000\ninactive_file 999999\n"
            "total_rss 4096\ntotal_inactive_file 3000\ntotal_pgfault 77\ntotal_pgmajfault 5",
        },
    )
    _write(root / "pids" / base, {"pids.current": "3"})
    _write(
        root / "hugetlb" / base,
        {
            "hugetlb.2MB.usage_in_bytes": "4194304",
            "hugetlb.1GB.usage_in_bytes": "0",
            "hugetlb.2MB.rsvd.usage_in_bytes": "77",
            "hugetlb.2MB.limit_in_bytes": V1_UNLIMITED,
        },
    )


def _v2_tree(root: Path) -> None:
    _write(
        root / "unified" / CG.lstrip("/"),
        {
            "cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500",
            "memory.current": "8192",
            "memory.max": "max",
            "memory.stat": "anon 2048\nfile 6000\ninactive_file 10000\npgfault 9\npgmajfault 1",
            "memory.swap.current": "100",
            "memory.swap.max": "1000",
            "pids.current": "2",
            "hugetlb.2MB.current": "2097152",
            "hugetlb.2MB.rsvd.current": "5",
        },
    )


V1_CGROUP_FILE = (
    f"12:hugetlb:{CG}\n11:pids:{CG}\n4:memory:{CG}\n3:cpu,cpuacct:{CG}\n"
    f"1:name=systemd:/system.slice/x.scope\n0::/\n"
)
V2_CGROUP_FILE = f"0::{CG}\n"


def test_v1_tree_gives_every_counter(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    mounts = CgroupMounts.at(tmp_path, v1=["cpu", "cpuacct", "memory", "pids", "hugetlb"])
    proc = _proc_cgroup(tmp_path / "proc", V1_CGROUP_FILE)

    paths = find_cgroup(PID, mounts=mounts, proc=proc)
    sample = read_stats(paths, clock=7)

    assert paths.v1["memory"] == tmp_path / "memory" / CG.lstrip("/")
    assert paths.v2 is None
    assert sample == CgroupSample(
        timestamp=7,
        cpu_usage_core_nanoseconds=123456789,
        memory_usage_bytes=10000,
        working_set_bytes=7000,  # usage - total_inactive_file (hierarchical, not local)
        rss_bytes=4096,
        page_faults=77,
        major_page_faults=5,
        memory_limit_bytes=50000,
        swap_usage_bytes=600,  # memsw - memory
        swap_limit_bytes=10000,
        pids_current=3,
        hugetlb_usage_bytes={"2MB": 4194304, "1GB": 0},
    )
    assert sample.available_bytes == 43000
    assert sample.swap_available_bytes == 9400


def test_v1_unlimited_is_none(tmp_path: Path) -> None:
    directory = tmp_path / "memory" / "x"
    _write(
        directory,
        {
            "memory.usage_in_bytes": "100",
            "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.memsw.usage_in_bytes": "100",
            "memory.memsw.limit_in_bytes": V1_UNLIMITED,
        },
    )

    sample = read_stats(CgroupPaths(v1={"memory": directory}))

    assert (sample.memory_limit_bytes, sample.available_bytes) == (None, None)
    assert (sample.swap_usage_bytes, sample.swap_limit_bytes) == (0, None)
    assert sample.working_set_bytes == 100  # no memory.stat: nothing to subtract


def test_v2_tree_gives_every_counter(tmp_path: Path) -> None:
    _v2_tree(tmp_path)
    mounts = CgroupMounts.at(tmp_path, v2="unified")
    proc = _proc_cgroup(tmp_path / "proc", V2_CGROUP_FILE)

    sample = read_stats(find_cgroup(PID, mounts=mounts, proc=proc), clock=1)

    assert sample == CgroupSample(
        timestamp=1,
        cpu_usage_core_nanoseconds=2_500_000,
        memory_usage_bytes=8192,
        working_set_bytes=0,  # inactive_file above usage: floored at 0
        rss_bytes=2048,
        page_faults=9,
        major_page_faults=1,
        memory_limit_bytes=None,  # "max"
        swap_usage_bytes=100,
        swap_limit_bytes=1000,
        pids_current=2,
        hugetlb_usage_bytes={"2MB": 2097152},
    )
    assert sample.available_bytes is None
    assert sample.swap_available_bytes == 900


def test_hybrid_prefers_v1_controllers_and_falls_back_to_v2(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    _v2_tree(tmp_path)
    # cpuacct is not mounted as v1 here: cpu comes from v2's cpu.stat, memory from v1.
    mounts = CgroupMounts.at(tmp_path, v1=["memory", "pids"], v2="unified")
    proc = _proc_cgroup(tmp_path / "proc", V1_CGROUP_FILE.replace("0::/", f"0::{CG}"))

    sample = read_stats(find_cgroup(PID, mounts=mounts, proc=proc))

    assert sample.cpu_usage_core_nanoseconds == 2_500_000
    assert sample.memory_usage_bytes == 10000
    assert sample.pids_current == 3
    assert sample.hugetlb_usage_bytes == {"2MB": 2097152}


def test_missing_files_are_none_and_a_gone_process_raises(tmp_path: Path) -> None:
    mounts = CgroupMounts.at(tmp_path, v1=["memory"], v2="unified")
    proc = _proc_cgroup(tmp_path / "proc", V1_CGROUP_FILE)
    paths = find_cgroup(PID, mounts=mounts, proc=proc)

    sample = read_stats(paths, clock=3)

    assert not paths.exists()
    assert sample == CgroupSample(timestamp=3)
    with pytest.raises(ProcessLookupError):
        find_cgroup(PID + 1, mounts=mounts, proc=proc)


def test_mountinfo_gives_hierarchies_with_their_roots() -> None:
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw shared:5 - cgroup cgroup rw,memory\n"
        "36 31 0:33 / /sys/fs/cgroup/sys\\040temd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
        "42 31 0:38 / /elsewhere rw - cgroup2 cgroup2 rw\n"
    )

    mounts = CgroupMounts.parse(mountinfo)

    cpu = HierarchyMount(Path("/sys/fs/cgroup/cpu,cpuacct"), "/")
    assert mounts.v1 == {
        "cpu": cpu,
        "cpuacct": cpu,
        "memory": HierarchyMount(Path("/sys/fs/cgroup/memory"), "/docker/abc"),
    }
    assert mounts.v2 == HierarchyMount(Path("/sys/fs/cgroup/unified"), "/")
    # A hierarchy mounted from a sub-cgroup: the mount's root is stripped from paths.
    paths = mounts.paths({"memory": "/docker/abc/pod/c1", "cpu": "/pod/c1"}, "/pod/c1")
    assert paths.v1["memory"] == Path("/sys/fs/cgroup/memory/pod/c1")
    assert paths.v1["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct/pod/c1")
    assert paths.v2 == Path("/sys/fs/cgroup/unified/pod/c1")


def test_cgroup_for_path_in_every_hierarchy(tmp_path: Path) -> None:
    mounts = CgroupMounts.at(tmp_path, v1=["memory"], v2="unified")

    cgroupfs = cgroup_for_path("/kubepods/burstable/pod1/", mounts=mounts)

    assert cgroupfs.v1 == {"memory": tmp_path / "memory/kubepods/burstable/pod1"}
    assert cgroupfs.v2 == tmp_path / "unified/kubepods/burstable/pod1"
    assert cgroup_for_path("/", mounts=mounts).v2 == tmp_path / "unified"


def test_combine_sums_counters_and_keeps_limits_only_when_all_have_one() -> None:
    a = CgroupSample(
        timestamp=1,
        cpu_usage_core_nanoseconds=10,
        memory_usage_bytes=100,
        working_set_bytes=80,
        memory_limit_bytes=1000,
        pids_current=1,
        hugetlb_usage_bytes={"2MB": 2},
    )
    b = CgroupSample(
        timestamp=2,
        cpu_usage_core_nanoseconds=5,
        memory_usage_bytes=50,
        working_set_bytes=40,
        pids_current=2,
        hugetlb_usage_bytes={"2MB": 1, "1GB": 0},
    )

    total = combine([a, b], clock=9)
    nothing = combine([], clock=9)

    assert (total.timestamp, total.cpu_usage_core_nanoseconds, total.pids_current) == (9, 15, 3)
    assert (total.memory_usage_bytes, total.working_set_bytes) == (150, 120)
    assert total.memory_limit_bytes is None  # b has none: the pod is not limited
    assert total.rss_bytes is None  # nobody knows it
    assert total.hugetlb_usage_bytes == {"2MB": 3, "1GB": 0}
    assert combine([a, a]).memory_limit_bytes == 2000
    assert (nothing.cpu_usage_core_nanoseconds, nothing.working_set_bytes) == (0, 0)


def test_directory_usage_counts_hardlinks_once(tmp_path: Path) -> None:
    root = tmp_path / "upper"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "big").write_bytes(b"x" * 100_000)
    os.link(root / "etc" / "big", root / "etc" / "big-link")
    (root / "dangling").symlink_to("/nowhere")

    used, inodes = directory_usage(root)

    assert inodes == 4  # upper, etc, big (twice linked), dangling
    assert 100_000 <= used < 200_000
    with pytest.raises(FileNotFoundError):
        directory_usage(tmp_path / "missing")


NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 5000 40 2 0 0 0 0 0 7000 50 3 0 0 0 0 0
veth_x:0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
"""  # noqa: E501


def test_net_dev_skips_loopback_and_reads_counters(tmp_path: Path) -> None:
    _write(tmp_path / str(PID) / "net", {"dev": NET_DEV})

    assert parse_net_dev(NET_DEV) == [
        InterfaceStats("eth0", rx_bytes=5000, rx_errors=2, tx_bytes=7000, tx_errors=3),
        InterfaceStats("veth_x", rx_bytes=0, rx_errors=0, tx_bytes=0, tx_errors=0),
    ]
    assert read_interfaces(PID, proc=tmp_path) == parse_net_dev(NET_DEV)
    with pytest.raises(ProcessLookupError):
        read_interfaces(PID + 1, proc=tmp_path)
