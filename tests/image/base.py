"""What the image tests build with: a Debian 12 base image, buildah's storage, the host's
package sources.

No registry here serves Debian's images, so the base is made like Debian's own
``debian:bookworm-slim``: ``debootstrap --variant=minbase bookworm`` (about 30 s), trimmed of
documentation, manual pages and translations, with its sources in
``/etc/apt/sources.list.d/debian.sources``, committed by buildah to an OCI archive. The
archive is cached in ``$CRISHIM_TEST_CACHE`` (default ``/var/cache/crishim-tests``, shared
with the systemd test bed) as ``debian-base-<key>.oci.tar``, the key hashing the recipe;
pushing the same archive gives the same digest every run, so buildah's layer cache (kept
in the same folder, ``buildah/``) serves later builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.systemd.rootfs import MIRROR, SUITE, cache_dir

__all__ = [
    "HOST_SOURCES",
    "apt_sources",
    "buildah_env",
    "ensure_base_archive",
    "locked",
    "pip_settings",
]

RECIPE_VERSION = "1"
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# What Debian's slim images leave out (their /etc/dpkg/dpkg.cfg.d/docker).
_DPKG_NODOC = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TRIM = ("usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")


def _sources(mirror: str) -> str:
    """A deb822 sources file naming ``mirror`` for bookworm and its updates."""
    return (
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def apt_sources(directory: Path) -> Path:
    """The sources the build's apt uses: the host's own Debian sources (same mirror as the
    host) unless ``CRISHIM_DEBIAN_MIRROR`` names another mirror."""
    if "CRISHIM_DEBIAN_MIRROR" not in os.environ and HOST_SOURCES.is_file():
        return HOST_SOURCES
    path = directory / "debian.sources"
    path.write_text(_sources(MIRROR))
    return path


def pip_settings() -> dict[str, str]:
    """The host pip's index and CA bundle (environment first, then pip's config files), as
    docker/build.sh's options."""
    found: dict[str, str] = {}
    for option, env, key in (
        ("--pip-index-url", "PIP_INDEX_URL", "global.index-url"),
        ("--pip-cert", "PIP_CERT", "global.cert"),
    ):
        value = os.environ.get(env, "")
        if not value:
            out = subprocess.run(
                [sys.executable, "-m", "pip", "config", "get", key],
                capture_output=True,
                text=True,
                check=False,
            )
            value = out.stdout.strip() if out.returncode == 0 else ""
        if value:
            found[option] = value
    return found


def buildah_env() -> dict[str, str]:
    """The environment for buildah and build.sh: storage in the test cache, not the host's
    ``/var/lib/containers`` (its run root in ``/run``, one per cache folder)."""
    storage = cache_dir() / "buildah"
    conf = storage / "storage.conf"
    if not conf.exists():
        storage.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(str(storage.resolve()).encode()).hexdigest()[:12]
        conf.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{storage / "storage"}"\n'
            f'runroot = "/run/crishim-tests-buildah-{tag}"\n'
        )
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


def base_key() -> str:
    """A short hash of everything the base image is made of."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "nodoc": _DPKG_NODOC,
        "trim": _TRIM,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _run(*argv: str, log: Path, env: dict[str, str] | None = None) -> str:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    with log.open("a") as out:
        out.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited {result.returncode}:\n{tail}")
    return result.stdout.strip()


def _slim(root: Path) -> None:
    """Trim a debootstrapped tree the way Debian's slim images are."""
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(_DPKG_NODOC)
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(_sources(MIRROR))
    for relative in _TRIM:
        shutil.rmtree(root / relative, ignore_errors=True)
    for doc in (root / "usr/share/doc").iterdir():
        if doc.is_dir() and not doc.is_symlink():
            for entry in doc.iterdir():
                if entry.name != "copyright":
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
    for directory in ("var/lib/apt/lists", "var/cache/apt", "dev", "proc", "sys", "tmp", "run"):
        target = root / directory
        for entry in list(target.iterdir()) if target.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _build(archive: Path, work: Path, log: Path, env: dict[str, str]) -> None:
    tree = work / "rootfs"
    _run("debootstrap", "--variant=minbase", SUITE, str(tree), MIRROR, log=log)
    _slim(tree)
    tarball = work / "rootfs.tar"
    _run("tar", "-C", str(tree), "--numeric-owner", "-cf", str(tarball), ".", log=log)
    container = _run("buildah", "from", "scratch", log=log, env=env)
    try:
        _run("buildah", "add", "--quiet", container, str(tarball), "/", log=log, env=env)
        config = ["--cmd", "bash", "--env", f"PATH={_PATH}"]
        _run("buildah", "config", *config, container, log=log, env=env)
        _run(
            "buildah",
            "commit",
            "--quiet",
            container,
            f"oci-archive:{archive}:debian:{SUITE}-slim",
            log=log,
            env=env,
        )
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, env=env, check=False)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_base_archive(env: dict[str, str]) -> Path:
    """The cached base image's OCI archive, built first if missing (one builder at a time)."""
    base = cache_dir()
    archive = base / f"debian-base-{base_key()}.oci.tar"
    if archive.exists():
        return archive
    with locked(base / "debian-base.lock"):
        if archive.exists():
            return archive
        work = base / f"debian-base-{base_key()}.building"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log = base / f"debian-base-{base_key()}.log"
        log.write_text("")
        try:
            partial = work / "base.oci.tar"
            _build(partial, work, log, env)
            partial.rename(archive)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return archive
