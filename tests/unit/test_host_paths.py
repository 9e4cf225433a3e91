"""Node paths resolved for a crishim that does not run on the node's root
(crishim.runtime.host_paths), on real directories: a temporary "node" root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crishim.errors import InvalidArgument
from crishim.runtime.host_paths import HostPaths, resolve_in_root


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    (root / "usr/share/ca").mkdir(parents=True)
    (root / "usr/share/ca/cert.pem").write_text("node's\n")
    (root / "etc/ssl").mkdir(parents=True)
    (root / "etc/ssl/certs").symlink_to("/usr/share/ca")  # absolute: the node's /usr
    (root / "etc/relative").symlink_to("../usr/share")
    (root / "etc/escape").symlink_to("../../../../../../usr")  # .. stops at the node's /
    (root / "etc/loop-a").symlink_to("/etc/loop-b")
    (root / "etc/loop-b").symlink_to("/etc/loop-a")
    return root


def test_on_the_nodes_own_root_every_path_is_its_own() -> None:
    paths = HostPaths("/")
    assert paths.identity
    assert paths.resolve("/etc/ssl/certs") == "/etc/ssl/certs"


def test_symlinks_resolve_inside_the_node_root(node: Path) -> None:
    assert resolve_in_root(str(node), "/etc/ssl/certs") == "/usr/share/ca"
    assert resolve_in_root(str(node), "/etc/ssl/certs/cert.pem") == "/usr/share/ca/cert.pem"
    assert resolve_in_root(str(node), "/etc/relative/ca") == "/usr/share/ca"
    assert resolve_in_root(str(node), "/etc/escape/share") == "/usr/share"
    assert resolve_in_root(str(node), "/../../etc/./ssl//certs/") == "/usr/share/ca"


def test_missing_components_are_kept_as_written(node: Path) -> None:
    assert resolve_in_root(str(node), "/etc/ssl/certs/new/dir") == "/usr/share/ca/new/dir"
    assert resolve_in_root(str(node), "/nothing/../etc/ssl") == "/etc/ssl"
    assert resolve_in_root(str(node), "/usr/share/ca/cert.pem/below") == (
        "/usr/share/ca/cert.pem/below"
    )


def test_a_symlink_loop_is_invalid_argument(node: Path) -> None:
    with pytest.raises(InvalidArgument, match="host path /etc/loop-a/x: too many levels"):
        resolve_in_root(str(node), "/etc/loop-a/x")


def test_a_path_not_seen_here_as_on_the_node_is_taken_under_the_node_root(
    node: Path, tmp_path: Path
) -> None:
    paths = HostPaths(str(node))
    assert paths.resolve("/etc/ssl/certs") == f"{node}/usr/share/ca"
    # a path crishim has too, but another file there than the node
    mine = tmp_path / "mine.txt"
    mine.write_text("crishim's\n")
    (node / str(mine).lstrip("/")).parent.mkdir(parents=True)
    (node / str(mine).lstrip("/")).write_text("node's\n")
    assert paths.resolve(str(mine)) == f"{node}{mine}"
    # missing on the node: under the node root, so the runtime's error names the node's path
    assert paths.resolve("/no/such/dir") == f"{node}/no/such/dir"


def test_a_path_seen_here_as_on_the_node_is_its_own(node: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared.txt"
    shared.write_text("both\n")
    (node / str(shared).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    os.link(shared, node / str(shared).lstrip("/"))  # the same file (a bind, for the node)
    assert HostPaths(str(node)).resolve(str(shared)) == str(shared)


def test_a_relative_path_is_invalid_argument(node: Path) -> None:
    with pytest.raises(InvalidArgument, match="not absolute"):
        HostPaths(str(node)).resolve("etc/ssl")
