"""pytest fixtures for the registry rig (load with ``pytest_plugins = ["tests.rig.fixtures"]``).

* ``registry``: session-scoped anonymous :class:`Registry`
* ``auth_registry``: session-scoped :class:`Registry` with basic auth
  (``.auth`` gives the credentials)
* ``busybox_pushed``: session-scoped :class:`PushedImage` of :func:`busybox_image`
* ``busybox_ref``: ``"<host>/library/busybox:latest"`` of that push

Missing host tools make the fixtures skip with the Debian package to install;
they never skip silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.rig.oci_image import Image, busybox_image, push
from tests.rig.registry import DOCKER_REGISTRY_BIN, Registry, bcrypt_method

__all__ = [
    "AUTH_PASSWORD",
    "AUTH_USER",
    "BUSYBOX_REPO",
    "BUSYBOX_TAG",
    "PushedImage",
    "auth_registry",
    "busybox_pushed",
    "busybox_ref",
    "registry",
    "require_busybox",
    "require_docker_registry",
]

BUSYBOX_BIN = "/bin/busybox"
BUSYBOX_REPO = "library/busybox"
BUSYBOX_TAG = "latest"
AUTH_USER = "crishim"
AUTH_PASSWORD = "test-password"


@dataclass(frozen=True)
class PushedImage:
    """What was pushed where: ``ref`` is the full reference, ``digest`` the manifest digest."""

    ref: str
    repo: str
    tag: str
    digest: str
    image: Image

    @property
    def ref_by_digest(self) -> str:
        return f"{self.ref.rsplit(':', 1)[0]}@{self.digest}"


def require_docker_registry() -> None:
    if not os.access(DOCKER_REGISTRY_BIN, os.X_OK):
        pytest.skip(
            f"{DOCKER_REGISTRY_BIN} missing: install the Debian package 'docker-registry' "
            "(apt-get install docker-registry)"
        )


def require_busybox() -> None:
    if not os.access(BUSYBOX_BIN, os.R_OK):
        pytest.skip(
            f"{BUSYBOX_BIN} missing: install the Debian package 'busybox-static' "
            "(apt-get install busybox-static)"
        )


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    require_docker_registry()
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[Registry]:
    require_docker_registry()
    if bcrypt_method() is None:
        pytest.skip(
            "no bcrypt for the registry's htpasswd: install the Debian package 'apache2-utils' "
            "(or the Python package 'bcrypt')"
        )
    with Registry(htpasswd={AUTH_USER: AUTH_PASSWORD}) as reg:
        yield reg


@pytest.fixture(scope="session")
def busybox_pushed(registry: Registry) -> PushedImage:
    require_busybox()
    image = busybox_image()
    digest = push(registry.url, BUSYBOX_REPO, BUSYBOX_TAG, image)
    return PushedImage(
        f"{registry.host}/{BUSYBOX_REPO}:{BUSYBOX_TAG}",
        BUSYBOX_REPO,
        BUSYBOX_TAG,
        digest,
        image,
    )


@pytest.fixture(scope="session")
def busybox_ref(busybox_pushed: PushedImage) -> str:
    return busybox_pushed.ref
