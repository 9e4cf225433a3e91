"""Spec options, one concern at a time, and the spec models' round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest

from crishim.errors import InvalidArgument
from crishim.model import (
    Capability,
    ContainerConfig,
    ContainerMetadata,
    DeviceSpec,
    HugepageLimit,
    ImageConfigView,
    KeyValue,
    LinuxContainerConfig,
    LinuxResources,
    LinuxSandboxConfig,
    MountPropagation,
    MountSpec,
    NamespaceMode,
    NamespaceOptions,
    PodMetadata,
    ProfileType,
    SandboxConfig,
    SandboxSecurityContext,
    SecurityContext,
    SecurityProfile,
    SELinuxOption,
    SupplementalGroupsPolicy,
)
from crishim.oci import context, opts, security
from crishim.oci.context import BuildContext, DeviceNode, PasswdDb, SpecOpt
from crishim.oci.spec import Spec, base_spec, default_seccomp, dump_spec

NS_PATHS: dict[str, str | None] = {
    "network": "/run/crishim/ns/net/s1",
    "ipc": "/run/crishim/ns/ipc/s1",
    "uts": "/run/crishim/ns/uts/s1",
    "pid": None,
}

PASSWD = PasswdDb.parse(
    "root:x:0:0:root:/root:/bin/sh\n"
    "# a comment\n"
    "www:x:33:33:www:/var/www:/bin/false\n"
    "app:x:1000:1000::/home/app:/bin/sh\n",
    "root:x:0:\nwww:x:33:\napp:x:1000:\nvideo:x:44:app,www\naudio:x:29:app\nstaff:x:50:\n",
)


def sandbox(
    *,
    network: NamespaceMode = NamespaceMode.POD,
    privileged: bool = False,
    sysctls: dict[str, str] | None = None,
    cgroup_parent: str = "/kubepods/podu1",
) -> SandboxConfig:
    return SandboxConfig(
        metadata=PodMetadata(name="web", uid="u1", namespace="default"),
        hostname="web-0",
        linux=LinuxSandboxConfig(
            cgroup_parent=cgroup_parent,
            sysctls=sysctls or {},
            security_context=SandboxSecurityContext(
                namespace_options=NamespaceOptions(network=network, pid=NamespaceMode.CONTAINER),
                privileged=privileged,
            ),
        ),
    )


def ctx(**kw: Any) -> BuildContext:
    kw.setdefault("sandbox", sandbox())
    kw.setdefault("namespace_paths", dict(NS_PATHS))
    kw.setdefault("passwd", PASSWD)
    return BuildContext(container_id="c1", sandbox_id="s1", **kw)


def config(sc: SecurityContext | None = None, res: LinuxResources | None = None, **kw: Any) -> Any:
    linux = LinuxContainerConfig(security_context=sc, resources=res)
    kw.setdefault("command", ["/bin/true"])
    return ContainerConfig(metadata=ContainerMetadata(name="app"), linux=linux, **kw)


def apply(option: SpecOpt, cfg: ContainerConfig, context: BuildContext) -> Spec:
    spec = base_spec()
    option(spec, cfg, context)
    return spec


def process(spec: Spec) -> Any:
    assert spec.process is not None
    return spec.process


def linux(spec: Spec) -> Any:
    assert spec.linux is not None
    return spec.linux


# -- models ---------------------------------------------------------------------------------

SAMPLE = {
    "ociVersion": "1.1.0",
    "process": {
        "terminal": True,
        "user": {"uid": 1, "gid": 1, "umask": 18, "additionalGids": [5, 6]},
        "args": ["sh"],
        "env": ["A=1"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"], "ambient": []},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
        "apparmorProfile": "p",
        "oomScoreAdj": 100,
        "selinuxLabel": "system_u:system_r:container_t:s0",
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "h",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "annotations": {"a": "b"},
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}],
        "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 65536}],
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}],
        "cgroupsPath": "/kubepods/x",
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": 1, "swap": 2, "reservation": 1, "disableOOMKiller": False},
            "cpu": {"shares": 2, "quota": 3, "period": 4, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 10},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4}],
            "unified": {"memory.high": "1"},
        },
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {
                    "names": ["clone"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
                },
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            ],
        },
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
        "mountLabel": "system_u:object_r:container_file_t:s0",
        "rootfsPropagation": "rslave",
    },
}


def test_spec_round_trips_sample_json() -> None:
    assert dump_spec(Spec.model_validate(SAMPLE)) == SAMPLE
    assert dump_spec(Spec.model_validate_json(json.dumps(SAMPLE))) == SAMPLE


def test_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        Spec.model_validate({"ociVersion": "1.1.0", "procces": {}})


def test_bundled_files_round_trip_and_match_the_defaults() -> None:
    spec = base_spec()
    assert process(spec).capabilities.bounding == list(security.DEFAULT_CAPABILITIES)
    assert linux(spec).masked_paths == list(security.DEFAULT_MASKED_PATHS)
    assert linux(spec).readonly_paths == list(security.DEFAULT_READONLY_PATHS)
    assert [m.destination for m in spec.mounts or []] == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ]
    assert Spec.model_validate(dump_spec(spec)) == spec


def test_default_seccomp_denies_dangerous_syscalls() -> None:
    profile = default_seccomp()
    assert profile.default_action == "SCMP_ACT_ERRNO"
    assert profile.default_errno_ret == 1
    assert "SCMP_ARCH_AARCH64" in (profile.architectures or [])
    allowed = {n for rule in profile.syscalls or [] for n in rule.names if not rule.args}
    assert {"read", "write", "execve", "futex", "epoll_wait"} <= allowed
    forbidden = {"mount", "kexec_load", "init_module", "reboot", "bpf", "unshare", "setns"}
    assert not forbidden & {n for rule in profile.syscalls or [] for n in rule.names}


# -- process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        ([], [], ["/ep"], ["c1"], ["/ep", "c1"]),
        (["/bin/sh"], [], ["/ep"], ["c1"], ["/bin/sh"]),
        (["/bin/sh"], ["-c", "x"], ["/ep"], ["c1"], ["/bin/sh", "-c", "x"]),
        ([], ["a1"], ["/ep"], ["c1"], ["/ep", "a1"]),
        ([], [], [], ["/cmd"], ["/cmd"]),
    ],
)
def test_process_args_merge_like_kubelet(
    command: list[str], args: list[str], entrypoint: list[str], cmd: list[str], expected: list[str]
) -> None:
    image = ImageConfigView(entrypoint=entrypoint, cmd=cmd)
    spec = apply(opts.with_process_args, config(command=command, args=args), ctx(image=image))
    assert process(spec).args == expected


def test_process_args_required() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        apply(opts.with_process_args, config(command=[]), ctx())


def test_env_image_then_config_later_wins() -> None:
    image = ImageConfigView(env=["PATH=/img", "A=1", "B=2"])
    cfg = config(envs=[KeyValue(key="A", value="9"), KeyValue(key="C", value="x=y")])
    env = process(apply(opts.with_env, cfg, ctx(image=image))).env
    assert env == ["PATH=/img", "A=9", "B=2", "C=x=y"]


@pytest.mark.parametrize(
    ("working_dir", "image_dir", "expected"),
    [("/w", "/i", "/w"), ("", "/i", "/i"), ("", "", "/")],
)
def test_cwd(working_dir: str, image_dir: str, expected: str) -> None:
    image = ImageConfigView(working_dir=image_dir)
    spec = apply(opts.with_cwd, config(working_dir=working_dir), ctx(image=image))
    assert process(spec).cwd == expected


def test_terminal_sets_term_unless_given() -> None:
    spec = apply(opts.with_terminal, config(tty=True), ctx())
    assert process(spec).terminal is True
    assert "TERM=xterm" in process(spec).env
    spec = base_spec()
    process(spec).env = ["TERM=vt100"]
    opts.with_terminal(spec, config(tty=True), ctx())
    assert process(spec).env == ["TERM=vt100"]
    assert process(apply(opts.with_terminal, config(), ctx())).terminal is False


def test_hostname_own_uts_and_host_network() -> None:
    spec = apply(opts.with_hostname, config(), ctx())
    assert spec.hostname == "web-0"
    assert "HOSTNAME=web-0" in process(spec).env
    host = ctx(sandbox=sandbox(network=NamespaceMode.NODE), node_hostname="node1")
    spec = apply(opts.with_hostname, config(), host)
    assert spec.hostname is None
    assert "HOSTNAME=node1" in process(spec).env


def test_root_path_from_context() -> None:
    root = apply(opts.with_root, config(), ctx(rootfs="/run/crishim/c1/rootfs")).root
    assert root is not None
    assert root.path == "/run/crishim/c1/rootfs"


# -- user ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sc", "image_user", "expected"),
    [
        (SecurityContext(), "", (0, 0, [0])),
        (SecurityContext(), "app", (1000, 1000, [1000, 44, 29])),
        (SecurityContext(), "app:staff", (1000, 50, [50, 44, 29])),
        (SecurityContext(), "1000:44", (1000, 44, [44, 29])),
        (SecurityContext(), "4242", (4242, 0, [0])),
        (SecurityContext(run_as_user=33), "app", (33, 33, [33, 44])),
        (SecurityContext(run_as_user=33, run_as_group=7), "app", (33, 7, [7, 44])),
        (SecurityContext(run_as_username="www"), "app:staff", (33, 33, [33, 44])),
        (
            SecurityContext(run_as_user=1000, supplemental_groups=[9, 44]),
            "",
            (1000, 1000, [1000, 44, 29, 9]),
        ),
        (
            SecurityContext(
                run_as_user=1000,
                supplemental_groups=[9],
                supplemental_groups_policy=SupplementalGroupsPolicy.Strict,
            ),
            "",
            (1000, 1000, [1000, 9]),
        ),
    ],
)
def test_user_resolution_and_groups(
    sc: SecurityContext, image_user: str, expected: tuple[int, int, list[int]]
) -> None:
    spec = apply(opts.with_user, config(sc), ctx(image=ImageConfigView(user=image_user)))
    user = process(spec).user
    assert (user.uid, user.gid, user.additional_gids) == expected


@pytest.mark.parametrize("image_user", ["nobody", "app:nogroup"])
def test_user_unknown_name_is_an_error(image_user: str) -> None:
    with pytest.raises(InvalidArgument, match="not found"):
        apply(opts.with_user, config(), ctx(image=ImageConfigView(user=image_user)))


def test_passwd_parse_skips_malformed_lines() -> None:
    db = PasswdDb.parse("bad\nx:x:y:0::/:/bin/sh\nok:x:1:2::/:/bin/sh\n", "g:x:3\nh::z:\n")
    assert [u.name for u in db.users] == ["ok"]
    assert [(g.name, g.gid, g.members) for g in db.groups] == [("g", 3, ())]


# -- mounts and devices ----------------------------------------------------------------------


def test_mounts_bind_options_sorting_and_overrides() -> None:
    cfg = config(
        mounts=[
            MountSpec(container_path="/data/sub", host_path="/h/sub", readonly=True),
            MountSpec(
                container_path="/data",
                host_path="/h/data",
                propagation=MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
            MountSpec(
                container_path="/etc/hosts",
                host_path="/user/hosts",
                readonly=True,
                recursive_read_only=True,
            ),
        ]
    )
    extra = [
        MountSpec(container_path="/etc/hosts", host_path="/sandbox/hosts"),
        MountSpec(container_path="/dev/shm", host_path="/sandbox/shm"),
    ]
    spec = apply(opts.with_mounts, cfg, ctx(extra_mounts=extra))
    mounts = {m.destination: m for m in spec.mounts or []}
    assert mounts["/data/sub"].options == ["rbind", "rprivate", "ro"]
    assert mounts["/data"].options == ["rbind", "rslave", "rw"]
    assert mounts["/etc/hosts"].source == "/user/hosts"
    assert mounts["/etc/hosts"].options == ["rbind", "rprivate", "ro", "rro"]
    assert mounts["/dev/shm"].source == "/sandbox/shm"
    assert mounts["/dev/shm"].type == "bind"
    order = [m.destination for m in spec.mounts or []]
    assert order.index("/data") < order.index("/data/sub")
    assert order.count("/dev/shm") == 1
    assert linux(spec).rootfs_propagation == "rslave"


def test_mounts_bidirectional_makes_root_shared() -> None:
    mount = MountSpec(
        container_path="/m", host_path="/m", propagation=MountPropagation.PROPAGATION_BIDIRECTIONAL
    )
    spec = apply(opts.with_mounts, config(mounts=[mount]), ctx())
    assert linux(spec).rootfs_propagation == "rshared"
    assert (spec.mounts or [])[-1].options == ["rbind", "rshared", "rw"]


@pytest.mark.parametrize(
    "mount",
    [
        MountSpec(container_path="/m", host_path="/m", recursive_read_only=True),
        MountSpec(container_path="/m"),
    ],
)
def test_mounts_invalid(mount: MountSpec) -> None:
    with pytest.raises(InvalidArgument):
        apply(opts.with_mounts, config(mounts=[mount]), ctx())


def test_devices_node_and_cgroup_rule() -> None:
    def stat(path: str) -> DeviceNode:
        assert path == "/dev/fuse"
        return DeviceNode(type="c", major=10, minor=229, file_mode=0o666)

    cfg = config(
        devices=[DeviceSpec(container_path="/dev/f", host_path="/dev/fuse", permissions="rw")]
    )
    spec = apply(opts.with_devices, cfg, ctx(stat_device=stat))
    dev = linux(spec).devices[-1]
    assert (dev.path, dev.type, dev.major, dev.minor, dev.file_mode) == (
        "/dev/f",
        "c",
        10,
        229,
        438,
    )
    rule = linux(spec).resources.devices[-1]
    assert (rule.allow, rule.type, rule.major, rule.minor, rule.access) == (
        True,
        "c",
        10,
        229,
        "rw",
    )


def test_devices_bad_permissions() -> None:
    cfg = config(devices=[DeviceSpec(container_path="/d", host_path="/d", permissions="rx")])
    with pytest.raises(InvalidArgument, match="permissions"):
        apply(opts.with_devices, cfg, ctx())


def test_privileged_allows_all_devices_and_writable_sys() -> None:
    host = [DeviceNode(type="b", major=8, minor=0, path="/dev/sda")]
    context = ctx(sandbox=sandbox(privileged=True), host_devices=lambda: host)
    spec = apply(opts.with_privileged, config(SecurityContext(privileged=True)), context)
    assert [r.model_dump(exclude_none=True) for r in linux(spec).resources.devices] == [
        {"allow": True, "access": "rwm"}
    ]
    assert [d.path for d in linux(spec).devices] == ["/dev/sda"]
    sys_mounts = [m for m in spec.mounts or [] if m.destination.startswith("/sys")]
    assert all("ro" not in (m.options or []) for m in sys_mounts)


def test_privileged_needs_privileged_pod() -> None:
    with pytest.raises(InvalidArgument, match="unprivileged pod"):
        apply(opts.with_privileged, config(SecurityContext(privileged=True)), ctx())


def test_unprivileged_is_untouched_by_privileged_option() -> None:
    assert apply(opts.with_privileged, config(), ctx()) == base_spec()


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("add", "drop", "expected"),
    [
        ([], [], list(security.DEFAULT_CAPABILITIES)),
        (["net_admin"], ["CAP_KILL", "mknod"], None),
        ([], ["ALL"], []),
        (["CAP_NET_BIND_SERVICE"], ["ALL"], ["CAP_NET_BIND_SERVICE"]),
        (["ALL"], [], list(context.ALL_CAPABILITIES)),
        (["ALL"], ["SYS_ADMIN"], [c for c in context.ALL_CAPABILITIES if c != "CAP_SYS_ADMIN"]),
    ],
)
def test_capabilities_add_drop(add: list[str], drop: list[str], expected: list[str] | None) -> None:
    sc = SecurityContext(capabilities=Capability(add_capabilities=add, drop_capabilities=drop))
    caps = process(apply(security.with_capabilities, config(sc), ctx())).capabilities
    if expected is None:
        expected = [
            c for c in security.DEFAULT_CAPABILITIES if c not in ("CAP_KILL", "CAP_MKNOD")
        ] + ["CAP_NET_ADMIN"]
    assert caps.bounding == caps.effective == caps.permitted == expected
    assert caps.inheritable is None
    assert caps.ambient is None


def test_capabilities_ambient_and_privileged() -> None:
    sc = SecurityContext(
        capabilities=Capability(drop_capabilities=["ALL"], add_ambient_capabilities=["NET_RAW"])
    )
    caps = process(apply(security.with_capabilities, config(sc), ctx())).capabilities
    assert caps.bounding == caps.inheritable == caps.ambient == ["CAP_NET_RAW"]
    caps = process(
        apply(security.with_capabilities, config(SecurityContext(privileged=True)), ctx())
    ).capabilities
    assert caps.bounding == list(context.ALL_CAPABILITIES)


def test_capabilities_unknown_name() -> None:
    sc = SecurityContext(capabilities=Capability(add_capabilities=["CAP_BOGUS"]))
    with pytest.raises(InvalidArgument, match="unknown capability"):
        apply(security.with_capabilities, config(sc), ctx())


def test_no_new_privs_and_readonly_rootfs() -> None:
    sc = SecurityContext(no_new_privs=True, readonly_rootfs=True)
    assert process(apply(security.with_no_new_privs, config(sc), ctx())).no_new_privileges is True
    assert process(apply(security.with_no_new_privs, config(), ctx())).no_new_privileges is None
    root = apply(security.with_readonly_rootfs, config(sc), ctx()).root
    assert root is not None
    assert root.readonly is True


@pytest.mark.parametrize(
    ("sc", "masked", "readonly"),
    [
        (
            SecurityContext(),
            list(security.DEFAULT_MASKED_PATHS),
            list(security.DEFAULT_READONLY_PATHS),
        ),
        (
            SecurityContext(masked_paths=["/proc/x"], readonly_paths=["/proc/y"]),
            ["/proc/x"],
            ["/proc/y"],
        ),
        (SecurityContext(privileged=True, masked_paths=["/proc/x"]), None, None),
    ],
)
def test_masked_and_readonly_paths(
    sc: SecurityContext, masked: list[str] | None, readonly: list[str] | None
) -> None:
    spec = apply(security.with_masked_and_readonly_paths, config(sc), ctx())
    assert linux(spec).masked_paths == masked
    assert linux(spec).readonly_paths == readonly


LOCAL_PROFILE = {
    "defaultAction": "SCMP_ACT_LOG",
    "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
}


@pytest.mark.parametrize(
    ("sc", "expected_action"),
    [
        (SecurityContext(), None),
        (SecurityContext(seccomp=SecurityProfile(profile_type=ProfileType.Unconfined)), None),
        (SecurityContext(seccomp=SecurityProfile()), "SCMP_ACT_ERRNO"),
        (SecurityContext(seccomp_profile_path="runtime/default"), "SCMP_ACT_ERRNO"),
        (SecurityContext(privileged=True, seccomp=SecurityProfile()), None),
        (
            SecurityContext(
                seccomp=SecurityProfile(
                    profile_type=ProfileType.Localhost, localhost_ref="/var/lib/k/p.json"
                )
            ),
            "SCMP_ACT_LOG",
        ),
        (SecurityContext(seccomp_profile_path="localhost//var/lib/k/p.json"), "SCMP_ACT_LOG"),
    ],
)
def test_seccomp_profiles(sc: SecurityContext, expected_action: str | None) -> None:
    files = {"/var/lib/k/p.json": json.dumps(LOCAL_PROFILE).encode()}
    seccomp = linux(
        apply(security.with_seccomp, config(sc), ctx(load_file=files.__getitem__))
    ).seccomp
    assert (seccomp.default_action if seccomp else None) == expected_action


def test_seccomp_docker_format_and_bad_profiles() -> None:
    docker = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
        "syscalls": [{"name": "read", "action": "SCMP_ACT_ALLOW", "comment": ""}],
    }
    profile = security.load_seccomp_profile(json.dumps(docker).encode(), "p")
    assert profile.architectures == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert (profile.syscalls or [])[0].names == ["read"]
    conditional = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {
                "names": ["mount"],
                "action": "SCMP_ACT_ALLOW",
                "includes": {"caps": ["CAP_SYS_ADMIN"]},
            }
        ],
    }
    for bad in (b"[]", b"{", json.dumps(conditional).encode(), b'{"defaultAction": 1}'):
        with pytest.raises(InvalidArgument, match="seccomp profile"):
            security.load_seccomp_profile(bad, "p")


@pytest.mark.parametrize(
    ("lsms", "profile", "expected", "warns"),
    [
        (frozenset({"apparmor"}), SecurityProfile(), "crishim-default", False),
        (
            frozenset({"apparmor"}),
            SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="localhost/k8s-x"),
            "k8s-x",
            False,
        ),
        (
            frozenset({"apparmor"}),
            SecurityProfile(profile_type=ProfileType.Unconfined),
            None,
            False,
        ),
        (
            frozenset(),
            SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="k8s-x"),
            None,
            True,
        ),
        (frozenset(), SecurityProfile(), None, False),
    ],
)
def test_apparmor(
    lsms: frozenset[str], profile: SecurityProfile, expected: str | None, warns: bool
) -> None:
    context = ctx(host_lsms=lsms, apparmor_default_profile="crishim-default")
    spec = apply(security.with_apparmor, config(SecurityContext(apparmor=profile)), context)
    assert process(spec).apparmor_profile == expected
    assert bool(context.warnings) is warns


def test_selinux_labels_only_with_selinux() -> None:
    sc = SecurityContext(selinux_options=SELinuxOption(type="spc_t", level="s0:c1,c2"))
    context = ctx(host_lsms=frozenset({"selinux"}))
    spec = apply(security.with_selinux, config(sc), context)
    assert process(spec).selinux_label == "system_u:system_r:spc_t:s0:c1,c2"
    assert linux(spec).mount_label == "system_u:object_r:container_file_t:s0:c1,c2"
    context = ctx()
    spec = apply(security.with_selinux, config(sc), context)
    assert process(spec).selinux_label is None
    assert context.warnings


# -- namespaces, resources, sysctls, cgroups, annotations -----------------------------------


def _namespaces(spec: Spec) -> dict[str, str | None]:
    return {ns.type: ns.path for ns in linux(spec).namespaces}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            NamespaceOptions(pid=NamespaceMode.CONTAINER),
            {
                "pid": None,
                "network": NS_PATHS["network"],
                "ipc": NS_PATHS["ipc"],
                "uts": NS_PATHS["uts"],
                "mount": None,
                "cgroup": None,
            },
        ),
        (
            NamespaceOptions(
                network=NamespaceMode.NODE, pid=NamespaceMode.NODE, ipc=NamespaceMode.NODE
            ),
            {"mount": None, "cgroup": None},
        ),
        (
            NamespaceOptions(pid=NamespaceMode.POD),
            {
                "pid": "/run/crishim/ns/pid/s1",
                "network": NS_PATHS["network"],
                "ipc": NS_PATHS["ipc"],
                "uts": NS_PATHS["uts"],
                "mount": None,
                "cgroup": None,
            },
        ),
        (
            NamespaceOptions(pid=NamespaceMode.TARGET, target_id="c0"),
            {
                "pid": "/proc/4242/ns/pid",
                "network": NS_PATHS["network"],
                "ipc": NS_PATHS["ipc"],
                "uts": NS_PATHS["uts"],
                "mount": None,
                "cgroup": None,
            },
        ),
    ],
)
def test_namespaces(options: NamespaceOptions, expected: dict[str, str | None]) -> None:
    paths = {**NS_PATHS, "pid": "/run/crishim/ns/pid/s1"}
    context = ctx(namespace_paths=paths, target_pid=4242)
    spec = apply(opts.with_namespaces, config(SecurityContext(namespace_options=options)), context)
    assert _namespaces(spec) == expected


def test_namespaces_pod_pid_needs_a_pinned_namespace() -> None:
    sc = SecurityContext(namespace_options=NamespaceOptions(pid=NamespaceMode.POD))
    with pytest.raises(InvalidArgument, match="no pid namespace"):
        apply(opts.with_namespaces, config(sc), ctx())


def test_namespaces_default_to_the_pods() -> None:
    spec = apply(opts.with_namespaces, config(), ctx(sandbox=sandbox(network=NamespaceMode.NODE)))
    assert "network" not in _namespaces(spec)
    assert "uts" not in _namespaces(spec)


def test_resources_zero_means_unset_and_hugepages_dropped() -> None:
    res = LinuxResources(
        cpu_shares=512,
        cpu_quota=50000,
        cpu_period=100000,
        cpuset_cpus="0-1",
        memory_limit_in_bytes=1 << 30,
        hugepage_limits=[
            HugepageLimit(page_size="2MB", limit=0),
            HugepageLimit(page_size="1GB", limit=1 << 30),
        ],
        unified={"memory.high": "max"},
    )
    resources = linux(apply(opts.with_resources, config(res=res), ctx())).resources
    assert resources.cpu.model_dump(exclude_none=True) == {
        "shares": 512,
        "quota": 50000,
        "period": 100000,
        "cpus": "0-1",
    }
    assert (resources.memory.limit, resources.memory.swap) == (1 << 30, 1 << 30)
    assert [(h.page_size, h.limit) for h in resources.hugepage_limits] == [("1GB", 1 << 30)]
    assert resources.unified == {"memory.high": "max"}


def test_resources_swap_limit_and_no_swap_controller() -> None:
    res = LinuxResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=300)
    memory = linux(apply(opts.with_resources, config(res=res), ctx())).resources.memory
    assert (memory.limit, memory.swap) == (100, 300)
    spec = apply(opts.with_resources, config(res=res), ctx(swap_available=False))
    assert linux(spec).resources.memory.swap is None
    empty = linux(apply(opts.with_resources, config(res=LinuxResources()), ctx())).resources
    assert (empty.cpu, empty.memory, empty.hugepage_limits, empty.unified) == (None,) * 4


@pytest.mark.parametrize(
    ("requested", "expected"), [(-999, -500), (-500, -500), (1000, 1000), (5000, 1000), (0, 0)]
)
def test_oom_score_adj_clamped(requested: int, expected: int) -> None:
    res = LinuxResources(oom_score_adj=requested)
    spec = apply(opts.with_oom_score_adj, config(res=res), ctx(min_oom_score_adj=-500))
    assert process(spec).oom_score_adj == expected


def test_sysctls_namespaced_only() -> None:
    sysctls = {
        "net.ipv4.ip_forward": "1",
        "kernel.shmmax": "1",
        "net/ipv4/conf/eth0.1/rp_filter": "0",
    }
    spec = apply(opts.with_sysctls, config(), ctx(sandbox=sandbox(sysctls=sysctls)))
    assert linux(spec).sysctl == {
        "net.ipv4.ip_forward": "1",
        "kernel.shmmax": "1",
        "net.ipv4.conf.eth0/1.rp_filter": "0",
    }


@pytest.mark.parametrize(
    ("sysctls", "network"),
    [
        ({"vm.swappiness": "1"}, NamespaceMode.POD),
        ({"kernel.pid_max": "1"}, NamespaceMode.POD),
        ({"net.core.somaxconn": "1"}, NamespaceMode.NODE),
    ],
)
def test_sysctls_rejected(sysctls: dict[str, str], network: NamespaceMode) -> None:
    context = ctx(sandbox=sandbox(sysctls=sysctls, network=network))
    with pytest.raises(InvalidArgument, match="sysctl"):
        apply(opts.with_sysctls, config(), context)


@pytest.mark.parametrize("path", ["/kubepods/podu1/crishim-c1", "kubepods-podu1.slice:crishim:c1"])
def test_cgroups_path_is_the_drivers(path: str) -> None:
    context = ctx(sandbox=sandbox(cgroup_parent="/kubepods/podu1"), cgroups_path=path)
    assert linux(apply(opts.with_cgroups_path, config(), context)).cgroups_path == path


def test_no_cgroups_path_leaves_the_base_specs() -> None:
    assert linux(apply(opts.with_cgroups_path, config(), ctx())).cgroups_path is None


def test_annotations_name_container_pod_and_image() -> None:
    spec = apply(opts.with_annotations, config(), ctx(image_name="docker.io/library/busybox:1"))
    assert spec.annotations == {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-id": "s1",
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "u1",
        "io.kubernetes.cri.image-name": "docker.io/library/busybox:1",
    }


def test_run_as_group_alone_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="run_as_group is set without run_as_user"):
        apply(opts.with_user, config(SecurityContext(run_as_group=5)), ctx())


_NO_SYS_RESOURCE = ~(1 << 24) & ((1 << 41) - 1)


@pytest.mark.parametrize(
    ("mask", "sc", "missing"),
    [
        (None, SecurityContext(privileged=True), set()),
        (_NO_SYS_RESOURCE, SecurityContext(privileged=True), {"CAP_SYS_RESOURCE"}),
        (
            _NO_SYS_RESOURCE,
            SecurityContext(capabilities=Capability(add_capabilities=["ALL"])),
            {"CAP_SYS_RESOURCE"},
        ),
    ],
)
def test_all_capabilities_are_those_crishim_holds(
    mask: int | None, sc: SecurityContext, missing: set[str]
) -> None:
    spec = apply(security.with_capabilities, config(sc), ctx(host_capability_mask=mask))
    held = set(process(spec).capabilities.bounding)
    assert set(context.ALL_CAPABILITIES) - held == missing


@pytest.mark.parametrize(
    ("mount", "problem"),
    [
        (
            MountSpec(container_path="/m", host_path="/h", recursive_read_only=True),
            "recursive read-only needs readonly",
        ),
        (
            MountSpec(
                container_path="/m",
                host_path="/h",
                readonly=True,
                recursive_read_only=True,
                propagation=MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "recursive read-only needs private propagation",
        ),
    ],
)
def test_recursive_read_only_mounts_are_checked(mount: MountSpec, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        apply(opts.with_mounts, config(mounts=[mount]), ctx())


def test_recursive_read_only_mount_gets_rro() -> None:
    mount = MountSpec(container_path="/m", host_path="/h", readonly=True, recursive_read_only=True)
    spec = apply(opts.with_mounts, config(mounts=[mount]), ctx())
    (made,) = [m for m in spec.mounts or [] if m.destination == "/m"]
    assert made.options == ["rbind", "rprivate", "ro", "rro"]
