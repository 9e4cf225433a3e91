"""Reading image files without following links out, and host facts parsed from /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crishim.images.rootfs import MAX_USER_DB_BYTES, read_confined
from crishim.runtime.host import capability_bounding_mask
from crishim.services.containers import _signal_number


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "host-secret").write_text("host data\n")
    return root


def test_reads_a_file_of_the_rootfs(rootfs: Path) -> None:
    assert read_confined(rootfs, "etc/passwd") == "root:x:0:0::/root:/bin/sh\n"
    assert read_confined(rootfs, "/etc/passwd") == "root:x:0:0::/root:/bin/sh\n"


def test_missing_files_are_none(rootfs: Path) -> None:
    assert read_confined(rootfs, "etc/group") is None
    assert read_confined(rootfs, "nope/group") is None


def test_a_file_linking_out_is_not_followed(rootfs: Path) -> None:
    os.symlink(rootfs.parent / "host-secret", rootfs / "etc" / "group")
    assert read_confined(rootfs, "etc/group") is None


def test_a_parent_linking_out_is_not_followed(rootfs: Path) -> None:
    os.rename(rootfs / "etc", rootfs / "etc.real")
    os.symlink(rootfs.parent, rootfs / "etc")
    assert (rootfs / "etc" / "host-secret").exists()  # a plain open would reach the host
    assert read_confined(rootfs, "etc/host-secret") is None


def test_dotdot_and_huge_files_are_refused(rootfs: Path) -> None:
    assert read_confined(rootfs, "../host-secret") is None
    (rootfs / "etc" / "big").write_bytes(b"x" * (MAX_USER_DB_BYTES + 1))
    assert read_confined(rootfs, "etc/big") is None


def test_capability_mask_from_proc_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapBnd:\t000001fffeffffff\n")
    mask = capability_bounding_mask(status)
    assert mask == 0x1FFFEFFFFFF
    assert not mask >> 24 & 1  # CAP_SYS_RESOURCE missing, as on this machine kind
    status.write_text("Name:\tx\n")
    assert capability_bounding_mask(status) is None
    assert capability_bounding_mask(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("name", "number"),
    [("", 15), ("SIGTERM", 15), ("TERM", 15), ("sigint", 2), ("9", 9), ("SIGNOPE", 15)],
)
def test_stop_signal_names(name: str, number: int) -> None:
    assert _signal_number(name) == number
