"""The image under test: built by docker/build.sh from a local base, unpacked, and its
crishim run from the unpacked root file system.

``built_image`` (session scope) pushes the cached Debian base (:mod:`tests.image.base`) to
the rig's registry, runs ``docker/build.sh`` against it into an OCI archive and a push to the
same registry, and unpacks the archive with umoci: a :class:`BuiltImage`.

:class:`ImageCrishim` runs ``crishim serve`` of that root file system the way the node
installer runs it on a host (the image's root copied to ``/opt/crishim``, systemd's
``RootDirectory=`` with host paths bound in): in a private mount namespace, the root bound
onto itself, the host's ``/proc``, ``/sys`` (cgroups included), ``/dev`` and ``/run`` bound
in recursively, the host's ``/etc/resolv.conf`` and ``/etc/hosts`` read-only, and the test's
directory (state, root, socket, CNI config, pod logs) bound at its own path, then moved over
``/`` and chrooted into, as systemd sets up ``RootDirectory=``. Every
program crishim starts (runc, crun, conmon, catatonit, the CNI plugins, iptables) is the
image's.

``CRISHIM_IMAGE_TESTS=0`` skips the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.image.base import (
    apt_sources,
    buildah_env,
    ensure_base_archive,
    locked,
    pip_settings,
)
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.registry import Registry
from tests.systemd.rootfs import REPO, cache_dir

__all__ = ["CRISHIM", "BuiltImage", "ImageCrishim", "built_image_fixture"]

CRISHIM = "/opt/crishim/venv/bin/crishim"
BASE_REPO = "library/debian:bookworm-slim"
# Kept in buildah's storage between runs (removing it would take the layer cache with it).
TEST_TAG = "localhost/crishim-test:latest"
TOOLS = {
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "unshare": "util-linux",
    "chroot": "coreutils",
}
# Run as `sh -c LAUNCH launch ROOTFS BIND CONFIG` inside `unshare --mount`. As systemd does for
# RootDirectory=: the root is made a mount point, the host paths bound in, then it is moved
# over / and chrooted into (runc cannot set up a container under a root that is no mount).
LAUNCH = """set -e
root=$1 bind=$2 config=$3
mount --bind "$root" "$root"
for dir in /proc /sys /dev /run; do mount --rbind "$dir" "$root$dir"; done
for file in /etc/resolv.conf /etc/hosts; do
  [ -e "$root$file" ] || touch "$root$file"
  mount --bind "$file" "$root$file" && mount -o remount,bind,ro "$root$file"
done
mkdir -p "$root$bind"
mount --bind "$bind" "$root$bind"
cd "$root"
mount --move . /
exec chroot . /opt/crishim/venv/bin/crishim serve --config "$config"
"""


@dataclass
class BuiltImage:
    """The image docker/build.sh made, where it went and how long that took."""

    archive: Path
    pushed: str
    rootfs: Path
    config: dict[str, Any]
    seconds: dict[str, float]
    build_log: str

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.config["config"].get("Labels", {})
        return labels


class ImageCrishim(CrishimProcess):
    """``crishim serve`` of the image's root file system, chrooted with host paths bound in.

    ``bind`` (an ancestor of ``base``) is bound into the root at its own path, so the paths
    in the config, the socket and the pods' log directories mean the same inside and out.
    """

    def __init__(self, rootfs: Path, bind: Path, base: Path, config: str = "") -> None:
        super().__init__(base, config)
        self.rootfs = rootfs
        self.bind = bind

    def command(self) -> list[str]:
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            LAUNCH,
            "launch",
            str(self.rootfs),
            str(self.bind),
            str(self.config_file),
        ]

    def mounts(self) -> list[str]:
        """Mount points inside crishim's mount namespace (empty once it has exited)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/mounts").read_text()
        except OSError:
            return []
        return [line.split()[1].replace("\\040", " ") for line in text.splitlines()]

    def in_root(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a program of the image (chrooted, with /proc, /sys and /dev bound)."""
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'set -e; r=$1; shift; for d in /proc /sys /dev; do mount --rbind "$d" "$r$d"; '
             'done; exec chroot "$r" "$@"', "in-root", str(self.rootfs), *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


def _run(argv: list[str], env: dict[str, str], log: Path, timeout: float = 1200) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        result = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
        )
    if result.returncode != 0:
        pytest.fail(f"{argv[0]} exited {result.returncode}:\n{log.read_text()[-4000:]}")


def _image_id(name: str, env: dict[str, str]) -> str:
    """The id of an image in buildah's storage ("" when there is none of that name)."""
    out = subprocess.run(
        ["buildah", "images", "--noheading", "--no-trunc", "--format", "{{.ID}}", name],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    return out.stdout.strip().removeprefix("sha256:") if out.returncode == 0 else ""


def _require_tools() -> None:
    if os.environ.get("CRISHIM_IMAGE_TESTS", "1") == "0":
        pytest.skip("the image suite is off (CRISHIM_IMAGE_TESTS=0)")
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: install the Debian package '{package}'")


@pytest.fixture(name="built_image", scope="session")
def built_image_fixture(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[BuiltImage]:
    """The image built from a local Debian base with docker/build.sh, and unpacked."""
    _require_tools()
    work = tmp_path_factory.mktemp("image")
    log = work / "build.log"
    env = buildah_env()
    seconds: dict[str, float] = {}

    started = time.monotonic()
    base_archive = ensure_base_archive(env)
    base_ref = f"{registry.host}/{BASE_REPO}"
    _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
          f"oci-archive:{base_archive}", f"docker://{base_ref}"], env, log)  # fmt: skip
    seconds["base"] = time.monotonic() - started

    archive = work / "crishim.oci.tar"
    pushed = f"{registry.host}/crishim/crishim:test"
    pip = [word for option in pip_settings().items() for word in option]
    with locked(cache_dir() / "buildah.lock"):
        before = _image_id(TEST_TAG, env)
        started = time.monotonic()
        _run(
            [str(REPO / "docker" / "build.sh"), "--base", base_ref, "--tls-verify=false",
             "--apt-sources", str(apt_sources(work)), *pip, "--tag", TEST_TAG,
             "--oci-archive", str(archive), "--push", pushed],
            env, log,
        )  # fmt: skip
        seconds["build"] = time.monotonic() - started
        if before and before != _image_id(TEST_TAG, env):
            # The previous run's image and the layers only it used; the layers it shares
            # with this build have children now and stay: they are the cache.
            subprocess.run(["buildah", "rmi", before], capture_output=True, env=env, check=False)
        # The base's name in this run's registry (the image stays while layers use it).
        subprocess.run(["buildah", "rmi", base_ref], capture_output=True, env=env, check=False)
    try:
        started = time.monotonic()
        layout = work / "layout"
        rootfs = work / "rootfs"
        _run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"oci:{layout}:crishim"],
             env, log)  # fmt: skip
        _run(["umoci", "raw", "unpack", "--image", f"{layout}:crishim", str(rootfs)], env, log)
        config = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--config", f"oci:{layout}:crishim"],
                capture_output=True, text=True, env=env, check=True,
            ).stdout
        )  # fmt: skip
        seconds["unpack"] = time.monotonic() - started
        yield BuiltImage(archive, pushed, rootfs, config, seconds, log.read_text())
    finally:
        shutil.rmtree(work / "layout", ignore_errors=True)
