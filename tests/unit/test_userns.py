"""User namespaces of pods: which requests are valid, the ID maps, and the spec option."""

from __future__ import annotations

from pathlib import Path

import pytest

from crishim.errors import InvalidArgument
from crishim.model import (
    ContainerConfig,
    ContainerMetadata,
    IdMapping,
    LinuxContainerConfig,
    LinuxSandboxConfig,
    NamespaceMode,
    NamespaceOptions,
    PodMetadata,
    SandboxConfig,
    SandboxSecurityContext,
    SecurityContext,
    UserNamespace,
)
from crishim.model.userns import (
    check_container_userns,
    check_mount_mappings,
    host_id_of,
    id_map_text,
    pod_userns,
)
from crishim.oci import opts
from crishim.oci.context import BuildContext
from crishim.oci.spec import base_spec
from crishim.util.mountpoint import is_mount_point

KUBELET = [IdMapping(host_id=65536, container_id=0, length=65536)]
POD = UserNamespace(mode=NamespaceMode.POD, uids=KUBELET, gids=KUBELET)


def pod_options(userns: UserNamespace | None, **modes: NamespaceMode) -> NamespaceOptions:
    return NamespaceOptions(userns_options=userns, **modes)


def m(container_id: int, host_id: int, length: int) -> IdMapping:
    return IdMapping(container_id=container_id, host_id=host_id, length=length)


# -- what a pod may ask for ---------------------------------------------------------------------


def test_kubelets_mapping_gives_the_pod_a_user_namespace() -> None:
    assert pod_userns(pod_options(POD)) == POD


@pytest.mark.parametrize(
    "userns", [None, UserNamespace(mode=NamespaceMode.NODE)], ids=["unset", "node"]
)
def test_node_mode_or_nothing_means_the_nodes_user_namespace(userns: UserNamespace | None) -> None:
    assert pod_userns(pod_options(userns)) is None


def test_several_disjoint_ranges_are_fine() -> None:
    ranges = [m(0, 100000, 1000), m(1000, 300000, 64536)]
    userns = UserNamespace(mode=NamespaceMode.POD, uids=ranges, gids=KUBELET)
    assert pod_userns(pod_options(userns)) == userns
    assert id_map_text(ranges) == "0 100000 1000\n1000 300000 64536\n"


@pytest.mark.parametrize(
    ("uids", "message"),
    [
        ([], "needs UID mappings"),
        ([m(0, 65536, 0)], "is empty"),
        ([m(0, 65536, -1)], "is empty"),
        ([m(0, 4294901760, 65536)], "does not fit in the host ID space"),
        ([m(4294901760, 65536, 65536)], "does not fit in the container ID space"),
        ([m(0, -5, 10)], "does not fit in the host ID space"),
        # critest's "more than one mapping": both start at container ID 0.
        ([m(0, 1000, 100000), m(0, 2000, 100000)], "overlap on the container side"),
        ([m(0, 65536, 1000), m(500, 200000, 1000)], "overlap on the container side"),
        ([m(0, 65536, 1000), m(1000, 66000, 1000)], "overlap on the host side"),
        ([m(1, 1000, 100000)], "do not map container ID 0"),
        ([m(n, 100000 + n, 1) for n in range(341)], "at most 340"),
    ],
)
def test_bad_mappings_are_invalid_naming_the_problem(uids: list[IdMapping], message: str) -> None:
    userns = UserNamespace(mode=NamespaceMode.POD, uids=uids, gids=KUBELET)
    with pytest.raises(InvalidArgument, match=message):
        pod_userns(pod_options(userns))


def test_gid_mappings_are_checked_too() -> None:
    userns = UserNamespace(mode=NamespaceMode.POD, uids=KUBELET, gids=[])
    with pytest.raises(InvalidArgument, match="needs GID mappings"):
        pod_userns(pod_options(userns))


@pytest.mark.parametrize("mode", [NamespaceMode.CONTAINER, NamespaceMode.TARGET])
def test_container_and_target_modes_are_invalid(mode: NamespaceMode) -> None:
    with pytest.raises(InvalidArgument, match=f"mode {mode.name} is not supported"):
        pod_userns(pod_options(UserNamespace(mode=mode)))


def test_node_mode_takes_no_mappings() -> None:
    with pytest.raises(InvalidArgument, match="takes no UID/GID mappings"):
        pod_userns(pod_options(UserNamespace(mode=NamespaceMode.NODE, uids=KUBELET)))


@pytest.mark.parametrize("kind", ["network", "ipc", "pid"])
def test_a_user_namespaced_pod_cannot_share_the_nodes_namespaces(kind: str) -> None:
    with pytest.raises(InvalidArgument, match="cannot use the node's"):
        pod_userns(pod_options(POD, **{kind: NamespaceMode.NODE}))


# -- containers and mounts of such a pod ---------------------------------------------------------


def test_a_container_joins_its_pods_user_namespace() -> None:
    check_container_userns(None, POD)
    check_container_userns(NamespaceOptions(), POD)
    check_container_userns(pod_options(POD), POD)
    check_container_userns(pod_options(UserNamespace(mode=NamespaceMode.NODE)), None)


def test_the_same_ranges_in_another_order_are_the_same_mapping() -> None:
    two = [m(0, 100000, 10), m(10, 200000, 10)]
    pod = UserNamespace(mode=NamespaceMode.POD, uids=two, gids=two)
    swapped = UserNamespace(mode=NamespaceMode.POD, uids=two[::-1], gids=two)
    check_container_userns(pod_options(swapped), pod)


@pytest.mark.parametrize(
    ("asked", "pod", "message"),
    [
        (
            UserNamespace(mode=NamespaceMode.POD, uids=[m(0, 131072, 65536)], gids=KUBELET),
            POD,
            "mappings differ from its pod's",
        ),
        (UserNamespace(mode=NamespaceMode.NODE), POD, "every container of the pod joins"),
        (POD, None, "its pod uses the node's user namespace"),
    ],
)
def test_a_container_asking_for_another_user_namespace_is_invalid(
    asked: UserNamespace, pod: UserNamespace | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_container_userns(pod_options(asked), pod)


def test_mounts_are_id_mapped_only_when_they_ask_with_the_pods_mappings() -> None:
    assert check_mount_mappings("/data", [], [], POD) is False
    assert check_mount_mappings("/data", KUBELET, KUBELET, POD) is True
    with pytest.raises(InvalidArgument, match="mount /data: its UID/GID mappings differ"):
        check_mount_mappings("/data", [m(0, 1, 65536)], KUBELET, POD)
    with pytest.raises(InvalidArgument, match="mount /data: ID-mapped mounts need a pod"):
        check_mount_mappings("/data", KUBELET, KUBELET, None)


def test_host_ids_of_container_ids() -> None:
    ranges = [m(0, 100000, 10), m(10, 500000, 10)]
    assert host_id_of(0, ranges) == 100000
    assert host_id_of(12, ranges) == 500002
    with pytest.raises(InvalidArgument, match="ID 20 is not mapped"):
        host_id_of(20, ranges)


# -- the spec option ----------------------------------------------------------------------------


def _context(userns: UserNamespace | None) -> BuildContext:
    sandbox = SandboxConfig(
        metadata=PodMetadata(name="web", uid="u1", namespace="default"),
        linux=LinuxSandboxConfig(
            security_context=SandboxSecurityContext(
                namespace_options=NamespaceOptions(
                    pid=NamespaceMode.CONTAINER, userns_options=userns
                )
            )
        ),
    )
    paths: dict[str, str | None] = {
        "network": "/ns/net/s1",
        "ipc": "/ns/ipc/s1",
        "uts": "/ns/uts/s1",
        "user": "/ns/user/s1" if userns is not None else None,
    }
    return BuildContext(container_id="c1", sandbox_id="s1", sandbox=sandbox, namespace_paths=paths)


def _config(userns: UserNamespace | None = None) -> ContainerConfig:
    options = NamespaceOptions(pid=NamespaceMode.CONTAINER, userns_options=userns)
    security = SecurityContext(namespace_options=options)
    return ContainerConfig(
        metadata=ContainerMetadata(name="app"),
        linux=LinuxContainerConfig(security_context=security),
    )


def test_containers_of_a_user_namespaced_pod_join_it_with_its_mappings() -> None:
    spec = base_spec()
    opts.with_namespaces(spec, _config(POD), _context(POD))
    assert spec.linux is not None
    assert spec.linux.namespaces is not None
    joined = {ns.type: ns.path for ns in spec.linux.namespaces}
    assert joined["user"] == "/ns/user/s1"
    assert joined["network"] == "/ns/net/s1"
    dumped = spec.linux.model_dump(by_alias=True, exclude_none=True)
    assert dumped["uidMappings"] == [{"containerID": 0, "hostID": 65536, "size": 65536}]
    assert dumped["gidMappings"] == dumped["uidMappings"]


def test_containers_of_other_pods_stay_in_the_nodes_user_namespace() -> None:
    spec = base_spec()
    opts.with_namespaces(spec, _config(), _context(None))
    assert spec.linux is not None
    assert spec.linux.namespaces is not None
    assert "user" not in {ns.type for ns in spec.linux.namespaces}
    assert spec.linux.uid_mappings is None


def test_a_container_with_other_mappings_than_its_pod_is_refused() -> None:
    other = UserNamespace(mode=NamespaceMode.POD, uids=[m(0, 131072, 65536)], gids=KUBELET)
    with pytest.raises(InvalidArgument, match="differ from its pod's"):
        opts.with_namespaces(base_spec(), _config(other), _context(POD))


def test_mount_points_are_told_from_plain_directories(tmp_path: Path) -> None:
    # What decides whether the stages' directory still needs its private bind mount.
    assert is_mount_point("/")
    assert is_mount_point("/proc")
    assert not is_mount_point(str(tmp_path))
