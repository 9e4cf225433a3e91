"""A full disk is RESOURCE_EXHAUSTED naming what was written where, and leaves nothing.

The ENOSPC here is real: writes go to /dev/full (through a symlink where crishim's own
temporary file would be). The whole path, from a pull or a create on a full file system,
is tested in tests/integration/test_faults.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api.instrument import CallTracker, instrument, status_for
from crishim.errors import ResourceExhausted
from crishim.model import Image
from crishim.store import ObjectStore
from crishim.store.records import write_record
from crishim.util.disk import disk_full_as, is_disk_full

DEV_FULL = Path("/dev/full")

needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")


def test_enospc_and_edquot_become_resource_exhausted_naming_the_path() -> None:
    with pytest.raises(ResourceExhausted) as caught, disk_full_as("writing x to", "/a/b"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == "writing x to /a/b: the disk is full (No space left on device)"
    with (
        pytest.raises(ResourceExhausted, match="the disk quota is used up"),
        disk_full_as("w", "/q"),
    ):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(OSError, match="Input/output error"), disk_full_as("w", "/a"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert not is_disk_full(ValueError("ENOSPC"))


@needs_dev_full
def test_a_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "c1" / "container.json"
    path.parent.mkdir()
    (path.parent / f".container.json.tmp-{os.getpid()}").symlink_to(DEV_FULL)
    with pytest.raises(ResourceExhausted) as caught:
        write_record(path, "container", {"id": "c1"})
    assert str(caught.value) == (
        f"writing the container record {path}: the disk is full (No space left on device)"
    )
    assert os.listdir(path.parent) == []


@needs_dev_full
async def test_a_record_that_cannot_be_added_leaves_no_directory(tmp_path: Path) -> None:
    store: ObjectStore[Image] = ObjectStore(tmp_path, "image", Image)
    directory = tmp_path / "sha256:1"
    directory.mkdir()
    (directory / f".image.json.tmp-{os.getpid()}").symlink_to(DEV_FULL)
    with pytest.raises(ResourceExhausted, match="writing the image record"):
        await store.add(Image(id="sha256:1", size=1, manifest_digest="sha256:2"))
    assert store.find("sha256:1") is None
    assert os.listdir(tmp_path) == []


def test_resource_exhausted_is_the_grpc_status() -> None:
    assert status_for(ResourceExhausted("full")) is Status.RESOURCE_EXHAUSTED


async def test_a_full_disk_no_place_reported_is_still_resource_exhausted() -> None:
    async def writes(stream: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/lib/crishim/x")

    handler = instrument("/runtime.v1.RuntimeService/CreateContainer", writes, CallTracker())
    with pytest.raises(GRPCError) as caught:
        await handler(None)
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert caught.value.message == (
        "the disk is full writing /var/lib/crishim/x (No space left on device)"
    )
