"""A minimal OCI bundle made from the host's static busybox, for runtime tests.

The rootfs holds ``/bin/busybox`` (a copy of the host's ``busybox-static``) and symlinks for
the applets the tests use. ``config.json`` is written by hand here, on purpose independent of
``crishim.oci``, so runtime tests do not depend on the spec builder they will later verify.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["APPLETS", "BUSYBOX", "DEFAULT_CAPS", "make_bundle"]

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "echo", "cat", "id", "ls", "true", "false", "env")
# The capability set runc and CRI-O give a container unless told otherwise.
DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
PATH_ENV = "PATH=/bin:/usr/bin:/sbin:/usr/sbin"


def _rootfs(root: Path) -> None:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    for applet in APPLETS:
        (bin_dir / applet).symlink_to("busybox")
    for name in ("proc", "dev", "sys", "tmp", "etc"):
        (root / name).mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")


def _config(
    args: Sequence[str],
    *,
    env: Sequence[str],
    cgroups_path: str | None,
    terminal: bool,
    resources: Mapping[str, object] | None,
    hostname: str,
) -> dict[str, object]:
    caps = list(DEFAULT_CAPS)
    linux: dict[str, object] = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        "resources": {"devices": [{"allow": False, "access": "rwm"}], **(resources or {})},
    }
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [PATH_ENV, *env],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
        ],
        "linux": linux,
    }


def make_bundle(
    bundle: Path,
    args: Sequence[str],
    *,
    env: Sequence[str] = (),
    cgroups_path: str | None = None,
    terminal: bool = False,
    resources: Mapping[str, object] | None = None,
    hostname: str = "busybox",
) -> Path:
    """Write ``bundle/rootfs`` and ``bundle/config.json``; return ``bundle``.

    ``cgroups_path`` is the OCI ``linux.cgroupsPath`` (cgroupfs form, ``/a/b``); ``resources``
    is merged into ``linux.resources`` (for example ``{"memory": {"limit": 64 << 20}}``).
    """
    bundle.mkdir(parents=True, exist_ok=True)
    _rootfs(bundle / "rootfs")
    config = _config(
        args,
        env=env,
        cgroups_path=cgroups_path,
        terminal=terminal,
        resources=resources,
        hostname=hostname,
    )
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle
