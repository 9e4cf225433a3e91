"""Classifying the host's cgroup layout from /proc/self/mounts."""

from __future__ import annotations

from crishim.runtime.cgroups import CgroupMode, parse_mounts

V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
V1 = (
    "tmpfs /sys/fs/cgroup tmpfs rw,mode=755 0 0\n"
    "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,relatime,cpu,cpuacct 0 0\n"
    "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
    "cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0\n"
)
HYBRID = V1 + "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"


def test_unified_host_is_v2() -> None:
    layout = parse_mounts(V2)
    assert layout.mode is CgroupMode.V2
    assert layout.v2_mount == "/sys/fs/cgroup"
    assert not layout.hugetlb_only_on_v2


def test_v1_host_lists_controllers_not_mount_options() -> None:
    layout = parse_mounts(V1)
    assert layout.mode is CgroupMode.V1
    assert layout.v1_controllers == {"cpu", "cpuacct", "memory"}


def test_hybrid_host_without_v1_hugetlb_is_flagged_for_crun() -> None:
    layout = parse_mounts(HYBRID)
    assert layout.mode is CgroupMode.HYBRID
    assert layout.v2_mount == "/sys/fs/cgroup/unified"
    assert layout.hugetlb_only_on_v2


def test_hybrid_host_with_v1_hugetlb_is_fine_for_crun() -> None:
    layout = parse_mounts(HYBRID + "none /sys/fs/cgroup/hugetlb cgroup rw,hugetlb 0 0\n")
    assert layout.mode is CgroupMode.HYBRID
    assert not layout.hugetlb_only_on_v2
