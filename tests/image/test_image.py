"""The crishim image (docker/Containerfile, docker/build.sh): built with buildah from a
local Debian 12 base, complete and small, and its crishim, run from the image's root file
system as the node installer runs it on a host, serves the CRI and runs pods on runc and crun
with the image's own runtimes, conmon and CNI plugins.

The build takes about three minutes the first time on a machine (debootstrap, apt and pip)
and well under a minute later, from buildah's layer cache in ``$CRISHIM_TEST_CACHE``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from crishim.api import v1
from tests.image.rig import (
    CRISHIM,
    BuiltImage,
    ImageCrishim,
    built_image_fixture,  # noqa: F401 - the session fixture ``built_image``
)
from tests.rig.cni import bridge_conflist
from tests.rig.fixtures import PushedImage
from tests.rig.host import conmons_of, drop_chain, iptables_chains, iptables_rules, run
from tests.rig.pods import PodRig
from tests.systemd.rootfs import REPO

pytestmark = pytest.mark.root
in_module_loop = pytest.mark.asyncio(loop_scope="module")

BRIDGE = "crishim-im0"
SUBNET = "10.88.225.0/24"
SUBNET_PREFIX = "10.88.225."
NETWORK = "crishim-im0-net"
# What Debian's packages put where, in the image.
PROGRAMS = (
    "usr/sbin/runc",
    "usr/bin/crun",
    "usr/bin/conmon",
    "usr/bin/catatonit",
    "usr/sbin/iptables",
    "usr/bin/ip",
    "usr/lib/cni/bridge",
    "usr/lib/cni/host-local",
    "usr/lib/cni/portmap",
    "usr/lib/cni/loopback",
    CRISHIM.lstrip("/"),
)
# Generous: the image is about 260 MB; this catches a compiler or a cache let in.
MAX_IMAGE_BYTES = 350 * 10**6


def _du(root: Path) -> int:
    """Bytes in regular files under ``root`` (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen and not os.path.islink(
                os.path.join(directory, name)
            ):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# ---- the image itself ----------------------------------------------------------------------


def test_the_image_is_labelled_and_runs_crishim_serve(built_image: BuiltImage) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    labels = built_image.labels
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.title"] == "crishim"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if head:
        assert labels["org.opencontainers.image.revision"].startswith(head)
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert "org.opencontainers.image.source" in labels
    config = built_image.config["config"]
    assert config["Entrypoint"] == ["crishim"]
    assert config["Cmd"] == ["serve"]
    path = next(e for e in config["Env"] if e.startswith("PATH="))
    assert path.startswith("PATH=/opt/crishim/venv/bin:")


def test_the_image_holds_crishim_and_the_host_programs_and_nothing_of_the_build(
    built_image: BuiltImage,
) -> None:
    root = built_image.rootfs
    missing = [p for p in PROGRAMS if not os.access(root / p, os.X_OK)]
    assert missing == [], f"not in the image: {missing}"
    leftovers = [
        p
        for p in (
            "usr/bin/gcc",
            "usr/bin/cc",
            "opt/crishim/venv/bin/pip",
            "root/.cache/pip",
            "src",
            "run/secrets",
        )
        if (root / p).exists() or (root / p).is_symlink()
    ]
    assert leftovers == [], f"build leftovers in the image: {leftovers}"
    assert not list((root / "var/lib/apt/lists").glob("*_Packages")), "apt lists left"
    docs = [p for p in (root / "usr/share/doc").rglob("*") if p.is_file() and p.name != "copyright"]
    assert docs == [], f"documentation in the image: {docs[:5]}"
    # The build's apt sources went in as a secret: the base's own file is what stays.
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "debian-archive-keyring" in sources
    size = _du(root)
    print(f"\nimage: {size / 1e6:.0f} MB unpacked; times {built_image.seconds}")
    assert size < MAX_IMAGE_BYTES, f"the image is {size / 1e6:.0f} MB"


def test_the_images_crishim_finds_its_host_programs(
    built_image: BuiltImage, tmp_path: Path
) -> None:
    proc = ImageCrishim(built_image.rootfs, tmp_path, tmp_path / "crishim")
    version = proc.in_root(CRISHIM, "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("crishim 0."), version.stdout
    doctor = proc.in_root(CRISHIM, "doctor", "--root", "/tmp/doctor-root", "--state", "/tmp/ds")
    findings = {
        line.split(":", 1)[0].split(None, 1)[1]: line.split(None, 1)[0]
        for line in doctor.stdout.splitlines()
        if ":" in line and len(line.split(None, 1)) == 2
    }
    wanted = ("runtime runc", "runtime crun", "catatonit", "conmon", "cni plugins")
    assert {s: findings.get(s) for s in wanted} == dict.fromkeys(wanted, "OK"), doctor.stdout


# ---- its crishim serving pods --------------------------------------------------------------


def _write_conflist(proc: ImageCrishim, ipam_dir: Path) -> None:
    proc.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = bridge_conflist(NETWORK, BRIDGE, SUBNET, ipam_dir)
    (proc.cni_conf_dir / "10-image.conflist").write_text(conflist)


def _subnet_rules() -> list[str]:
    return [
        f"{table}: {rule}"
        for table in ("nat", "filter")
        for rule in iptables_rules(table)
        if SUBNET_PREFIX in rule
    ]


def _cleanup_iptables(chains_before: dict[str, set[str]]) -> None:
    for table, before in chains_before.items():
        for line in iptables_rules(table):
            if line.startswith("-A CNI-") and SUBNET_PREFIX in line:
                chain = line.split()[1]
                if chain not in before and not chain.startswith("CNI-HOSTPORT-"):
                    drop_chain(table, chain)
        for line in iptables_rules(table):
            if line.startswith("-A ") and SUBNET_PREFIX in line:
                run("iptables", "-t", table, "-D", *shlex.split(line)[1:], check=False)


@pytest_asyncio.fixture(name="image_rig", scope="module", loop_scope="module")
async def image_rig_fixture(
    built_image: BuiltImage,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_pushed: PushedImage,
) -> AsyncIterator[PodRig]:
    """The image's crishim serving pods on the test's bridge, busybox pulled."""
    if run("ip", "route", "show", SUBNET).strip() or run("ip", "link", "show", BRIDGE, check=False):
        pytest.skip(f"{SUBNET} or bridge {BRIDGE} is already in use on this host")
    base = tmp_path_factory.mktemp("image-pods")
    proc = ImageCrishim(
        built_image.rootfs,
        base,
        base / "crishim",
        # The image's plugins (crishim's default bin_dirs end with /usr/lib/cni too).
        config='[cni]\nbin_dirs = ["/usr/lib/cni"]\n',
    )
    chains_before = {table: iptables_chains(table) for table in ("nat", "filter")}
    rig: PodRig | None = None
    try:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "link", "set", BRIDGE, "up")
        _write_conflist(proc, base / "ipam")
        await asyncio.to_thread(proc.start)
        rig = PodRig(
            runtime_name="runc",
            proc=proc,
            base=base,
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
        yield rig
    finally:
        try:
            if rig is not None and proc.proc is not None and proc.proc.poll() is None:
                await asyncio.wait_for(rig.remove_all_pods(), 60)
        finally:
            if rig is not None:
                rig.close()
            proc.kill()
            for pid in conmons_of(proc):
                os.kill(pid, 9)
            run("ip", "link", "del", BRIDGE, check=False)
            _cleanup_iptables(chains_before)
    assert _subnet_rules() == [], _subnet_rules()


@in_module_loop
async def test_the_images_crishim_answers_the_cri(image_rig: PodRig) -> None:
    version = await image_rig.runtime.version(v1.VersionRequest())
    assert version.runtime_name == "crishim"
    status = await image_rig.runtime.status(v1.StatusRequest())
    assert status.status is not None
    ready = {c.type: c.status for c in status.status.conditions}
    assert ready == {"RuntimeReady": True, "NetworkReady": True}, image_rig.log_tail()


@in_module_loop
@pytest.mark.parametrize("handler", ["runc", "crun"])
async def test_the_images_crishim_runs_a_pod(image_rig: PodRig, handler: str) -> None:
    config = image_rig.sandbox_config(f"image-{handler}")
    reply = await image_rig.runtime.run_pod_sandbox(
        v1.RunPodSandboxRequest(config=config, runtime_handler=handler)
    )
    pod = reply.pod_sandbox_id
    status = await image_rig.pod_status(pod)
    assert status.network is not None
    assert status.network.ip.startswith(SUBNET_PREFIX), status.network
    cid = await image_rig.start_container(
        pod, "web", ["sh", "-c", "echo hello from the image; exec sleep 1000"]
    )
    await image_rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)
    assert (image_rig.proc.state / "runtimes" / handler / cid).is_dir(), f"not on {handler}"
    assert (await image_rig.exec_out(cid, "cat", "/etc/hostname")).strip() == f"image-{handler}"
    assert status.network.ip in await image_rig.exec_out(cid, "cat", "/proc/net/fib_trie")
    (log,) = image_rig.log_dir.glob(f"*_image-{handler}_*/web/0.log")
    assert "hello from the image" in log.read_text()
    # The container runs under the image's conmon, not the host's.
    conmons = conmons_of(image_rig.proc)
    assert conmons, image_rig.log_tail()
    proc = image_rig.proc
    assert isinstance(proc, ImageCrishim)
    image_conmon = os.stat(proc.rootfs / "usr/bin/conmon")
    for pid in conmons:
        exe = os.stat(f"/proc/{pid}/exe")
        assert (exe.st_dev, exe.st_ino) == (image_conmon.st_dev, image_conmon.st_ino)
    await image_rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await image_rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert (await image_rig.runtime.list_containers(v1.ListContainersRequest())).containers == []
    await image_rig.until(
        lambda: asyncio.to_thread(lambda: not conmons_of(image_rig.proc)), "conmons to exit"
    )
    # The pod's namespace pins and the container's root, in crishim's mount namespace
    # (containers are released in the background).
    ours = tuple(f"{proc.state}/{d}/" for d in ("containers", "sandboxes", "ns"))

    async def released() -> bool:
        return not [m for m in proc.mounts() if m.startswith(ours)]

    await image_rig.until(released, "the pod's mounts to go")
