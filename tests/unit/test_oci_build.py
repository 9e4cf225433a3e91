"""Whole container specs for typical kubelet requests, checked through their JSON form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from crishim.errors import InvalidArgument
from crishim.model import (
    ContainerConfig,
    ContainerMetadata,
    HugepageLimit,
    ImageConfigView,
    ImageSpec,
    KeyValue,
    LinuxContainerConfig,
    LinuxResources,
    LinuxSandboxConfig,
    MountSpec,
    NamespaceMode,
    NamespaceOptions,
    PodMetadata,
    ProfileType,
    SandboxConfig,
    SandboxSecurityContext,
    SecurityContext,
    SecurityProfile,
    SupplementalGroupsPolicy,
)
from crishim.oci import (
    BuildContext,
    DeviceNode,
    PasswdDb,
    Spec,
    build_container_spec,
    build_sandbox_infra_spec,
    bundles_dir,
    dump_spec,
    spec_json,
)
from crishim.oci.security import DEFAULT_CAPABILITIES, DEFAULT_MASKED_PATHS

BUSYBOX = ImageConfigView(
    env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], cmd=["sh"]
)
PASSWD = PasswdDb.parse(
    "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:101::/var/cache/nginx:/sbin/nologin\n",
    "root:x:0:\nnginx:x:101:\nwww-data:x:33:nginx\nshadow:x:42:\n",
)
SANDBOX_MOUNTS = [
    MountSpec(container_path="/etc/hosts", host_path="/var/lib/crishim/s1/hosts"),
    MountSpec(container_path="/etc/resolv.conf", host_path="/var/lib/crishim/s1/resolv.conf"),
    MountSpec(container_path="/etc/hostname", host_path="/var/lib/crishim/s1/hostname"),
    MountSpec(container_path="/dev/shm", host_path="/run/crishim/s1/shm"),
]


def pod(
    *,
    network: NamespaceMode = NamespaceMode.POD,
    pid: NamespaceMode = NamespaceMode.CONTAINER,
    privileged: bool = False,
    seccomp: SecurityProfile | None = None,
) -> SandboxConfig:
    return SandboxConfig(
        metadata=PodMetadata(name="web", uid="8b5a", namespace="default", attempt=0),
        hostname="web",
        log_directory="/var/log/pods/default_web_8b5a",
        linux=LinuxSandboxConfig(
            cgroup_parent="/kubepods/besteffort/pod8b5a",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0"}
            if network is NamespaceMode.POD
            else {},
            security_context=SandboxSecurityContext(
                namespace_options=NamespaceOptions(network=network, pid=pid),
                privileged=privileged,
                seccomp=seccomp,
            ),
        ),
    )


def context(sandbox: SandboxConfig | None = None, **kw: Any) -> BuildContext:
    sandbox = sandbox or pod()
    shared_pid = sandbox.namespace_options.pid is NamespaceMode.POD
    kw.setdefault("image", BUSYBOX)
    kw.setdefault("passwd", PASSWD)
    kw.setdefault("extra_mounts", SANDBOX_MOUNTS)
    kw.setdefault("min_oom_score_adj", -999)
    kw.setdefault("rootfs", "/run/crishim/containers/c1/rootfs")
    kw.setdefault("image_name", "docker.io/library/busybox:1.36")
    kw.setdefault("node_hostname", "node-1")
    kw.setdefault("cgroups_path", "/kubepods/besteffort/pod8b5a/crishim-c1")
    return BuildContext(
        container_id="c1",
        sandbox_id="s1",
        sandbox=sandbox,
        namespace_paths={
            "network": "/run/crishim/ns/net/s1",
            "ipc": "/run/crishim/ns/ipc/s1",
            "uts": "/run/crishim/ns/uts/s1",
            "pid": "/proc/77/ns/pid" if shared_pid else None,
        },
        **kw,
    )


def container(
    sc: SecurityContext | None = None, resources: LinuxResources | None = None, **kw: Any
) -> ContainerConfig:
    sc = sc or SecurityContext(namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER))
    return ContainerConfig(
        metadata=ContainerMetadata(name="app", attempt=0),
        image=ImageSpec(image="sha256:abc"),
        linux=LinuxContainerConfig(security_context=sc, resources=resources),
        **kw,
    )


def build(config: ContainerConfig, ctx: BuildContext) -> dict[str, Any]:
    """Build, serialize and read back: the JSON must be a valid spec."""
    document: dict[str, Any] = json.loads(spec_json(build_container_spec(config, ctx)))
    assert dump_spec(Spec.model_validate(document)) == document
    return document


def test_busybox_with_env_and_args() -> None:
    config = container(
        command=["sh", "-c"],
        args=["echo $GREETING; sleep 3600"],
        envs=[KeyValue(key="GREETING", value="hello")],
        labels={"io.kubernetes.container.name": "app"},
        log_path="app/0.log",
    )
    ctx = context()
    doc = build(config, ctx)
    process = doc["process"]
    assert process["args"] == ["sh", "-c", "echo $GREETING; sleep 3600"]
    assert process["env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOSTNAME=web",
        "GREETING=hello",
    ]
    assert process["cwd"] == "/"
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert process["terminal"] is False
    assert process["capabilities"]["bounding"] == list(DEFAULT_CAPABILITIES)
    assert "noNewPrivileges" not in process
    assert doc["root"] == {"path": "/run/crishim/containers/c1/rootfs"}
    assert doc["hostname"] == "web"
    mounts = {m["destination"]: m for m in doc["mounts"]}
    assert mounts["/etc/hosts"]["source"] == "/var/lib/crishim/s1/hosts"
    assert mounts["/dev/shm"]["type"] == "bind"
    linux = doc["linux"]
    assert linux["namespaces"] == [
        {"type": "pid"},
        {"type": "network", "path": "/run/crishim/ns/net/s1"},
        {"type": "ipc", "path": "/run/crishim/ns/ipc/s1"},
        {"type": "uts", "path": "/run/crishim/ns/uts/s1"},
        {"type": "mount"},
        {"type": "cgroup"},
    ]
    assert linux["cgroupsPath"] == "/kubepods/besteffort/pod8b5a/crishim-c1"
    assert linux["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert linux["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    assert "seccomp" not in linux
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert doc["annotations"]["io.kubernetes.cri.sandbox-id"] == "s1"
    assert doc["annotations"]["io.kubernetes.cri.image-name"] == "docker.io/library/busybox:1.36"
    assert ctx.warnings == []


def test_privileged_container() -> None:
    sc = SecurityContext(
        privileged=True,
        seccomp=SecurityProfile(),
        apparmor=SecurityProfile(),
        namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER),
    )
    host = [DeviceNode(type="c", major=10, minor=200, path="/dev/net/tun")]
    ctx = context(
        pod(privileged=True),
        host_devices=lambda: host,
        host_lsms=frozenset({"apparmor"}),
        apparmor_default_profile="crishim-default",
    )
    doc = build(container(sc), ctx)
    linux = doc["linux"]
    assert "maskedPaths" not in linux
    assert "readonlyPaths" not in linux
    assert "seccomp" not in linux
    assert "apparmorProfile" not in doc["process"]
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert linux["devices"][0]["path"] == "/dev/net/tun"
    assert len(doc["process"]["capabilities"]["bounding"]) == 41
    sysfs = next(m for m in doc["mounts"] if m["destination"] == "/sys")
    assert "ro" not in sysfs["options"]
    assert {"type": "cgroup"} not in linux["namespaces"]


def test_host_network_pod() -> None:
    sandbox = pod(network=NamespaceMode.NODE)
    sc = SecurityContext(
        namespace_options=NamespaceOptions(network=NamespaceMode.NODE, pid=NamespaceMode.CONTAINER)
    )
    doc = build(container(sc), context(sandbox))
    types = [ns["type"] for ns in doc["linux"]["namespaces"]]
    assert types == ["pid", "ipc", "mount", "cgroup"]
    assert "hostname" not in doc
    assert "HOSTNAME=node-1" in doc["process"]["env"]
    assert "sysctl" not in doc["linux"]


def test_resources_with_zero_hugepages_and_clamped_oom_score() -> None:
    resources = LinuxResources(
        cpu_period=100000,
        cpu_quota=20000,
        cpu_shares=204,
        memory_limit_in_bytes=64 << 20,
        oom_score_adj=-1000,
        hugepage_limits=[
            HugepageLimit(page_size="2MB", limit=0),
            HugepageLimit(page_size="1GB", limit=0),
        ],
    )
    doc = build(container(resources=resources), context())
    res = doc["linux"]["resources"]
    assert res["cpu"] == {"shares": 204, "quota": 20000, "period": 100000}
    assert res["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert "hugepageLimits" not in res
    assert doc["process"]["oomScoreAdj"] == -999


def test_user_by_name_from_the_image_passwd() -> None:
    ctx = context(image=BUSYBOX.model_copy(update={"user": "nginx"}))
    user = build(container(), ctx)["process"]["user"]
    assert user == {"uid": 101, "gid": 101, "additionalGids": [101, 33]}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (SupplementalGroupsPolicy.Merge, [101, 33, 2000]),
        (SupplementalGroupsPolicy.Strict, [101, 2000]),
    ],
)
def test_supplemental_groups_policy(policy: SupplementalGroupsPolicy, expected: list[int]) -> None:
    sc = SecurityContext(
        run_as_user=101,
        supplemental_groups=[2000],
        supplemental_groups_policy=policy,
        namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER),
    )
    assert build(container(sc), context())["process"]["user"]["additionalGids"] == expected


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (SecurityProfile(profile_type=ProfileType.RuntimeDefault), "SCMP_ACT_ERRNO"),
        (SecurityProfile(profile_type=ProfileType.Unconfined), None),
        (
            SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="/p/audit.json"),
            "SCMP_ACT_LOG",
        ),
    ],
)
def test_seccomp(profile: SecurityProfile, expected: str | None) -> None:
    files = {"/p/audit.json": b'{"defaultAction": "SCMP_ACT_LOG"}'}
    sc = SecurityContext(
        seccomp=profile, namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER)
    )
    doc = build(container(sc), context(load_file=files.__getitem__))
    assert doc["linux"].get("seccomp", {}).get("defaultAction") == expected


@pytest.mark.parametrize(
    ("sc", "sandbox_privileged", "expected"),
    [
        (SecurityContext(), False, list(DEFAULT_MASKED_PATHS)),
        (SecurityContext(masked_paths=["/proc/kcore"]), False, ["/proc/kcore"]),
        (SecurityContext(privileged=True), True, None),
    ],
)
def test_masked_paths(sc: SecurityContext, sandbox_privileged: bool, expected: Any) -> None:
    sc = sc.model_copy(update={"namespace_options": NamespaceOptions(pid=NamespaceMode.CONTAINER)})
    doc = build(container(sc), context(pod(privileged=sandbox_privileged)))
    assert doc["linux"].get("maskedPaths") == expected


def test_shared_pid_namespace_and_systemd_cgroups() -> None:
    sandbox = pod(pid=NamespaceMode.POD)
    sc = SecurityContext(namespace_options=NamespaceOptions(pid=NamespaceMode.POD))
    path = "kubepods-besteffort-pod8b5a.slice:crishim:c1"
    doc = build(container(sc), context(sandbox, cgroups_path=path))
    assert doc["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/77/ns/pid"}
    assert doc["linux"]["cgroupsPath"] == path


def test_apparmor_requested_without_apparmor_warns() -> None:
    sc = SecurityContext(
        apparmor=SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="k8s-web"),
        namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER),
    )
    ctx = context()
    doc = build(container(sc), ctx)
    assert "apparmorProfile" not in doc["process"]
    assert len(ctx.warnings) == 1


def test_invalid_request_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        build(container(), context(image=ImageConfigView()))


def test_infra_spec_holds_the_pid_namespace() -> None:
    sandbox = pod(pid=NamespaceMode.POD, seccomp=SecurityProfile())
    ctx = context(sandbox, rootfs="/run/crishim/sandboxes/s1/rootfs", min_oom_score_adj=-500)
    spec = build_sandbox_infra_spec(["/usr/bin/catatonit", "-P"], ctx)
    doc = json.loads(spec_json(spec))
    assert Spec.model_validate(doc) == spec
    process = doc["process"]
    assert process["args"] == ["/usr/bin/catatonit", "-P"]
    assert process["noNewPrivileges"] is True
    assert process["capabilities"]["bounding"] == []
    assert process["oomScoreAdj"] == -500
    assert doc["root"] == {"path": "/run/crishim/sandboxes/s1/rootfs", "readonly": True}
    assert doc["linux"]["namespaces"][0] == {"type": "pid"}
    assert {"type": "network", "path": "/run/crishim/ns/net/s1"} in doc["linux"]["namespaces"]
    assert doc["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert doc["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert "io.kubernetes.cri.container-name" not in doc["annotations"]
    assert not any(m["destination"] == "/etc/hosts" for m in doc["mounts"])


def test_image_config_view_from_an_oci_image_config() -> None:
    document = {
        "architecture": "amd64",
        "config": {
            "User": "nginx:www-data",
            "Env": ["A=1"],
            "Entrypoint": None,
            "Cmd": ["nginx"],
            "WorkingDir": "/srv",
            "StopSignal": "SIGQUIT",
            "Volumes": {"/var/cache": {}},
        },
    }
    view = ImageConfigView.from_image_config(document)
    assert view == ImageConfigView(
        user="nginx:www-data",
        env=["A=1"],
        cmd=["nginx"],
        working_dir="/srv",
        stop_signal="SIGQUIT",
        volumes=["/var/cache"],
    )
    assert ImageConfigView.from_image_config({}) == ImageConfigView()


def test_bundles_dir_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "base-spec.json").write_text("{}")
    monkeypatch.setenv("CRISHIM_BUNDLES_DIR", str(tmp_path))
    assert bundles_dir() == tmp_path
    monkeypatch.setenv("CRISHIM_BUNDLES_DIR", str(tmp_path / "missing"))
    assert (bundles_dir() / "seccomp-default.json").is_file()
