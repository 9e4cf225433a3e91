"""``crishim node install|uninstall`` against a fake host root in a temporary directory.

The files are real; the host's systemd and kubelet are a recording fake (:class:`FakeHost`),
the one stand-in here: a real systemd is not what these tests are about (tests/e2e runs
the installer on a booted one).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from crishim.cli import main
from crishim.errors import FailedPrecondition
from crishim.node.files import remove_tree, sync_tree
from crishim.node.install import InstallFailed, install, uninstall
from crishim.node.layout import BINDS, ROOTFS_DIR
from crishim.node.record import InstallRecord
from crishim.node.steps import STEPS
from crishim.node.unit import unit_path
from tests.unit.node_fakes import (
    CONTAINERD,
    CRISHIM,
    EXECUTABLE,
    KUBEADM_FLAGS,
    KUBELET_CONFIG,
    FakeHost,
    Rig,
    make_host,
    make_image,
    make_rig,
    service_of,
    snapshot,
)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def test_install_puts_crishim_on_the_host_and_switches_kubelet(rig: Rig) -> None:
    install(rig.node())
    rootfs = rig.host_root / ROOTFS_DIR.lstrip("/")
    # the image's files, links and modes
    assert (rootfs / "usr/lib/cni/bridge").read_bytes() == b"\x7fELF" + bytes(range(256))
    assert os.readlink(rootfs / "lib") == "usr/lib"
    assert os.readlink(rootfs / "opt/venv/bin/python") == "/usr/bin/python3"
    assert (rootfs / "opt/venv/bin/crishim").stat().st_mode & 0o777 == 0o755
    # kernel file systems and mounted-in paths are not copied; mount points are made
    assert not (rootfs / "proc/1").exists()
    assert not (rootfs / "run/secrets").exists()
    assert not (rootfs / "tmp/junk").exists()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    for bind in BINDS:
        target = rootfs / bind.path.lstrip("/")
        assert target.is_dir() if bind.directory else target.is_file(), bind.path
        assert not target.is_symlink()
    # the host directories the binds need
    assert rig.exists("/var/lib/crishim")
    assert rig.exists("/var/log/pods")
    # the config: kubelet's cgroup driver
    assert 'cgroup_driver = "systemd"' in rig.read("/etc/crishim/crishim.toml")
    # the units
    service = service_of(rig.read("/etc/systemd/system/crishim.service"))
    assert service["Service"]["ExecStart"] == (
        f"/usr/sbin/chroot {ROOTFS_DIR} {EXECUTABLE} node enter --rootfs {ROOTFS_DIR}"
        f" --pin /run/crishim-rootfs/mnt -- {EXECUTABLE} serve --host-root /host"
    )
    assert service["Unit"]["BindsTo"] == "crishim-rootfs.service"
    binds = rig.read("/etc/systemd/system/crishim-rootfs.service").splitlines()
    assert f"ExecStart=/usr/bin/mount --rbind /proc {ROOTFS_DIR}/proc" in binds
    # kubelet
    assert rig.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG.replace(CONTAINERD, CRISHIM)
    assert rig.host.calls == [
        "systemctl daemon-reload",
        "systemctl enable crishim.service",
        "systemctl restart crishim-rootfs.service",
        "systemctl restart crishim.service",
        "wait_cri crishim.sock",
        # the pods of the runtime kubelet leaves are removed while kubelet is stopped
        "systemctl stop kubelet.service",
        "remove_pods containerd.sock",
        "systemctl restart kubelet.service",
        "wait_kubelet 10248",
    ]
    assert rig.read("/opt/crishim/installed") == "0.1.0\n"
    record = InstallRecord.load(rig.host_root / "opt/crishim/install.json")
    assert record is not None
    assert record.complete
    assert [s.name for s in record.steps] == [s.name for s in STEPS]
    assert rig.lines[-1] == "crishim installed"


def test_the_service_unit_adds_no_setting_that_makes_a_mount_namespace(rig: Rig) -> None:
    install(rig.node())
    text = rig.read("/etc/systemd/system/crishim.service")
    shipped = service_of(unit_path().read_text())["Service"]
    service = service_of(text)["Service"]
    added = {k: v for k, v in service.items() if k not in shipped}
    assert added == {}


def test_the_binds_are_made_on_a_private_rootfs_and_undone_as_slaves(rig: Rig) -> None:
    install(rig.node())
    lines = rig.read("/etc/systemd/system/crishim-rootfs.service").splitlines()
    starts = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")]
    assert starts[:7] == [
        f"/usr/bin/mount --bind {ROOTFS_DIR} {ROOTFS_DIR}",
        f"/usr/bin/mount --make-private {ROOTFS_DIR}",
        f"/usr/bin/mount --bind {ROOTFS_DIR} {ROOTFS_DIR}",
        f"/usr/bin/mount --make-private {ROOTFS_DIR}",
        # the node's root, a slave, before the binds (which it must not hold)
        f"/usr/bin/mount --rbind / {ROOTFS_DIR}/host",
        f"/usr/bin/mount --make-rslave {ROOTFS_DIR}/host",
        f"/usr/bin/mount --rbind /proc {ROOTFS_DIR}/proc",
    ]
    assert len(starts) == 6 + len(BINDS)
    stops = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStopPost=")]
    assert stops == [
        # crishim's mount namespace, kept across its restarts (crishim.node.enter)
        "-/usr/bin/umount /run/crishim-rootfs/mnt",
        "-/usr/bin/umount --lazy /run/crishim-rootfs",
        "-/usr/bin/rm -f /run/crishim-rootfs/mnt",
        "-/usr/bin/rm -d /run/crishim-rootfs",
        f"-/usr/bin/mount --make-rslave {ROOTFS_DIR}",
        f"-/usr/bin/umount --recursive --lazy {ROOTFS_DIR}",
        f"-/usr/bin/umount --lazy {ROOTFS_DIR}",
    ]


def test_kubeadms_flags_file_is_edited_when_it_sets_the_endpoint(tmp_path: Path) -> None:
    make_host(tmp_path / "host", flags=True)
    make_image(tmp_path / "image")
    rig = Rig(tmp_path / "host", tmp_path / "image", FakeHost(), [])
    config = rig.read("/var/lib/kubelet/config.yaml")
    install(rig.node())
    assert rig.read("/var/lib/kubelet/kubeadm-flags.env") == KUBEADM_FLAGS.replace(
        CONTAINERD, CRISHIM
    )
    assert rig.read("/var/lib/kubelet/config.yaml") == config
    uninstall(rig.node())
    assert rig.read("/var/lib/kubelet/kubeadm-flags.env") == KUBEADM_FLAGS


def test_the_config_file_named_by_the_running_kubelet_is_the_one_edited(rig: Rig) -> None:
    (rig.host_root / "etc/kubelet").mkdir()
    (rig.host_root / "etc/kubelet/kubelet.yaml").write_text(
        "kind: KubeletConfiguration\ncgroupDriver: cgroupfs\nimageServiceEndpoint: x\n"
    )
    rig.host.kubelet = ["/usr/bin/kubelet", "--config", "/etc/kubelet/kubelet.yaml", "--v=2"]
    install(rig.node())
    assert rig.read("/etc/kubelet/kubelet.yaml") == (
        f"kind: KubeletConfiguration\ncgroupDriver: cgroupfs\nimageServiceEndpoint: {CRISHIM}\n"
        f"containerRuntimeEndpoint: {CRISHIM}\n"
    )
    assert rig.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG
    assert 'cgroup_driver = "cgroupfs"' in rig.read("/etc/crishim/crishim.toml")


def test_an_endpoint_on_kubelets_command_line_is_refused_and_nothing_left(rig: Rig) -> None:
    before = snapshot(rig.host_root)
    rig.host.kubelet = ["/usr/bin/kubelet", f"--container-runtime-endpoint={CONTAINERD}"]
    with pytest.raises(InstallFailed, match="on its command line"):
        install(rig.node())
    assert snapshot(rig.host_root) == before


def test_a_node_without_kubelet_config_is_refused_before_any_change(rig: Rig) -> None:
    (rig.host_root / "var/lib/kubelet/config.yaml").unlink()
    before = snapshot(rig.host_root)
    with pytest.raises(InstallFailed, match="install not started: kubelet's config not found"):
        install(rig.node())
    assert snapshot(rig.host_root) == before
    assert rig.host.calls == []


def test_a_second_install_changes_nothing(rig: Rig) -> None:
    install(rig.node())
    after_first = snapshot(rig.host_root)
    rig.host.calls.clear()
    install(rig.node())
    assert snapshot(rig.host_root) == after_first
    assert rig.host.calls == ["systemctl enable crishim.service", "wait_cri crishim.sock"]
    assert any("kubelet already uses" in line for line in rig.lines)


def test_a_changed_image_is_synced_and_crishim_restarted(rig: Rig) -> None:
    install(rig.node())
    (rig.image_root / "usr/bin/conmon").write_bytes(b"\x7fELF conmon 2")
    (rig.image_root / "etc/os-release").unlink()
    rig.host.calls.clear()
    install(rig.node())
    rootfs = rig.host_root / ROOTFS_DIR.lstrip("/")
    assert (rootfs / "usr/bin/conmon").read_bytes() == b"\x7fELF conmon 2"
    assert not (rootfs / "etc/os-release").exists()
    assert "systemctl restart crishim.service" in rig.host.calls
    assert "systemctl restart kubelet.service" not in rig.host.calls


@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_a_failure_after_each_step_rolls_the_node_back(rig: Rig, step: str) -> None:
    before = snapshot(rig.host_root)

    def fail(name: str) -> None:
        if name == step:
            raise RuntimeError(f"injected after {name}")

    with pytest.raises(InstallFailed, match=f"injected after {step}"):
        install(rig.node(), after_step=fail)
    assert snapshot(rig.host_root) == before
    assert rig.host.active <= {"kubelet.service"}
    assert rig.host.enabled == set()
    if step == "kubelet":  # switched, then back
        assert rig.host.calls.count("systemctl restart kubelet.service") == 2


@pytest.mark.parametrize(
    "call",
    [
        "systemctl daemon-reload",
        "systemctl enable",
        "systemctl restart crishim.service",
        "wait_cri",
        "systemctl stop kubelet.service",
        "systemctl restart kubelet.service",
        "wait_kubelet",
    ],
)
def test_a_failing_host_call_rolls_the_node_back(rig: Rig, call: str) -> None:
    before = snapshot(rig.host_root)
    rig.host.fail = call
    with pytest.raises(InstallFailed, match="injected failure"):
        install(rig.node())
    rig.host.fail = None
    assert snapshot(rig.host_root) == before
    assert "crishim.service" not in rig.host.active


def test_a_failed_reinstall_keeps_the_earlier_install(rig: Rig) -> None:
    install(rig.node())
    installed = snapshot(rig.host_root)
    (rig.image_root / "usr/bin/conmon").write_bytes(b"\x7fELF conmon 2")
    rig.host.fail = "wait_cri"
    with pytest.raises(InstallFailed):
        install(rig.node())
    rig.host.fail = None
    after = snapshot(rig.host_root)
    changed = {k for k in installed.keys() | after.keys() if installed.get(k) != after.get(k)}
    assert changed == {"opt/crishim/rootfs/usr/bin/conmon"}  # the upgrade, kept: not a step
    assert rig.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG.replace(CONTAINERD, CRISHIM)


def test_uninstall_restores_the_node_keeping_crishims_state(rig: Rig) -> None:
    before = snapshot(rig.host_root)
    install(rig.node())
    (rig.host_root / "var/lib/crishim/images").mkdir()
    rig.host.calls.clear()
    uninstall(rig.node())
    after = snapshot(rig.host_root)
    assert {k for k in after if k not in before} == {"var/lib/crishim", "var/lib/crishim/images"}
    assert {k: v for k, v in after.items() if k in before} == before
    assert rig.host.calls == [
        "systemctl stop kubelet.service",
        "remove_pods crishim.sock",
        "systemctl restart kubelet.service",
        "wait_kubelet 10248",
        "systemctl disable --now crishim.service",
        "systemctl stop crishim-rootfs.service",
        "systemctl daemon-reload",
    ]
    assert rig.lines[-1] == "crishim uninstalled"


def test_uninstall_by_hand_from_the_host_undoes_the_rootfs_install(rig: Rig) -> None:
    install(rig.node())
    rig.host.calls.clear()
    by_hand = rig.node()
    by_hand.image_root = by_hand.host_root  # `crishim node uninstall --host-root /`
    uninstall(by_hand)
    assert "systemctl stop crishim-rootfs.service" in rig.host.calls
    assert not rig.exists(ROOTFS_DIR)


def test_uninstall_with_purge_leaves_the_node_as_it_was(rig: Rig) -> None:
    before = snapshot(rig.host_root)
    install(rig.node())
    (rig.host_root / "var/lib/crishim/images").mkdir()
    uninstall(rig.node(), purge=True)
    assert snapshot(rig.host_root) == before


def test_uninstall_twice_and_without_an_install_does_nothing(rig: Rig) -> None:
    install(rig.node())
    uninstall(rig.node())
    rig.host.calls.clear()
    uninstall(rig.node())
    assert rig.host.calls == []
    assert "not installed" in rig.lines[-1]


def test_an_interrupted_uninstall_goes_on_where_it_stopped(rig: Rig) -> None:
    before = snapshot(rig.host_root)
    install(rig.node())
    rig.host.fail = "systemctl daemon-reload"
    with pytest.raises(FailedPrecondition):
        uninstall(rig.node(), purge=True)
    record = InstallRecord.load(rig.host_root / "opt/crishim/install.json")
    assert record is not None
    assert [s.name for s in record.steps] == ["rootfs", "directories", "config", "units"]
    rig.host.fail = None
    uninstall(rig.node(), purge=True)
    assert snapshot(rig.host_root) == before


def test_a_kubelet_config_changed_since_gets_only_its_endpoint_back(rig: Rig) -> None:
    install(rig.node())
    config = rig.host_root / "var/lib/kubelet/config.yaml"
    config.write_text(config.read_text() + "maxPods: 50\n")
    uninstall(rig.node())
    assert config.read_text() == KUBELET_CONFIG + "maxPods: 50\n"
    assert any("only its endpoints put back" in line for line in rig.lines)


def test_an_existing_crishim_config_is_kept_and_a_driver_mismatch_said(rig: Rig) -> None:
    (rig.host_root / "etc/crishim").mkdir()
    (rig.host_root / "etc/crishim/crishim.toml").write_text('log_level = "debug"\n')
    install(rig.node())
    assert rig.read("/etc/crishim/crishim.toml") == 'log_level = "debug"\n'
    assert any("WARNING: its cgroup_driver 'cgroupfs'" in line for line in rig.lines)
    uninstall(rig.node())
    assert rig.read("/etc/crishim/crishim.toml") == 'log_level = "debug"\n'


def test_a_unit_file_there_before_is_saved_and_put_back(rig: Rig) -> None:
    mine = "[Service]\nExecStart=/usr/local/bin/crishim serve\n"
    (rig.host_root / "etc/systemd/system/crishim.service").write_text(mine)
    install(rig.node())
    assert rig.read("/etc/systemd/system/crishim.service") != mine
    uninstall(rig.node())
    assert rig.read("/etc/systemd/system/crishim.service") == mine


def test_an_image_mount_point_that_is_a_symlink_is_refused(rig: Rig) -> None:
    (rig.image_root / "var/log").symlink_to("/elsewhere")
    before = snapshot(rig.host_root)
    with pytest.raises(InstallFailed, match="a symlink where a mount point must be"):
        install(rig.node())
    assert snapshot(rig.host_root) == before


def test_a_host_without_mount_is_refused(rig: Rig) -> None:
    (rig.host_root / "usr/bin/mount").unlink()
    with pytest.raises(InstallFailed, match="the host has no mount program"):
        install(rig.node())


def test_installed_from_the_host_itself_there_is_no_rootfs(tmp_path: Path) -> None:
    make_host(tmp_path)
    rig = Rig(tmp_path, tmp_path, FakeHost(), [])
    install(rig.node())
    assert not rig.exists(ROOTFS_DIR)
    assert not rig.exists("/etc/systemd/system/crishim-rootfs.service")
    service = service_of(rig.read("/etc/systemd/system/crishim.service"))["Service"]
    assert "RootDirectory" not in service
    assert service["ExecStart"] == f"{EXECUTABLE} serve"
    uninstall(rig.node())
    assert not rig.exists("/etc/systemd/system/crishim.service")


def test_the_command_says_when_there_is_nothing_to_uninstall(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "uninstall", "--host-root", str(tmp_path), "--purge"]) == 0
    assert "crishim is not installed" in capsys.readouterr().out


def test_the_installers_own_files_in_the_image_are_not_copied(rig: Rig) -> None:
    # An image root that is a view of the host's own root holds the rootfs being written.
    (rig.image_root / "opt/crishim/rootfs/usr").mkdir(parents=True)
    (rig.image_root / "opt/crishim/install.json").write_text("{}")
    install(rig.node())
    rootfs = rig.host_root / ROOTFS_DIR.lstrip("/")
    assert (rootfs / "opt/crishim").is_dir()
    assert not (rootfs / "opt/crishim/rootfs").exists()
    assert not (rootfs / "opt/crishim/install.json").exists()


def test_a_kubelet_without_healthz_is_not_waited_for(rig: Rig) -> None:
    config = rig.host_root / "var/lib/kubelet/config.yaml"
    config.write_text(config.read_text() + "healthzPort: 0\n")
    install(rig.node())
    assert "systemctl restart kubelet.service" in rig.host.calls
    assert not any(c.startswith("wait_kubelet") for c in rig.host.calls)


def test_a_crishim_service_running_before_is_stopped_on_uninstall(rig: Rig) -> None:
    mine = "[Service]\nExecStart=/usr/local/bin/crishim serve\n"
    (rig.host_root / "etc/systemd/system/crishim.service").write_text(mine)
    rig.host.active.add("crishim.service")
    install(rig.node())
    uninstall(rig.node())
    assert "crishim.service" not in rig.host.active
    assert any("start it again" in line for line in rig.lines)
    assert rig.read("/etc/systemd/system/crishim.service") == mine


@pytest.fixture
def mounted_tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A tree with a host directory bind-mounted into it, as the rootfs has."""
    if os.geteuid() != 0:
        pytest.skip("bind-mounting a directory needs root")
    tree, data = tmp_path / "rootfs", tmp_path / "kubelet"
    (tree / "var/lib/kubelet").mkdir(parents=True)
    data.mkdir()
    (data / "pod").write_text("volume\n")
    subprocess.run(["mount", "--bind", str(data), str(tree / "var/lib/kubelet")], check=True)
    try:
        yield tree, data
    finally:
        subprocess.run(["umount", str(tree / "var/lib/kubelet")], check=True)
    assert (data / "pod").read_text() == "volume\n"


@pytest.mark.root
def test_a_tree_with_a_mount_in_it_is_never_removed(mounted_tree: tuple[Path, Path]) -> None:
    tree, _ = mounted_tree
    with pytest.raises(FailedPrecondition, match=r"mounted in it: .*/var/lib/kubelet"):
        remove_tree(tree)


@pytest.mark.root
def test_a_sync_never_removes_through_a_mount(
    mounted_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    tree, _ = mounted_tree
    (tmp_path / "image/var/lib").mkdir(parents=True)
    with pytest.raises(FailedPrecondition, match="mounted in it"):
        sync_tree(tmp_path / "image", tree, skip=[])
    assert sync_tree(tmp_path / "image", tree, skip=["var/lib/kubelet"]) == 0
