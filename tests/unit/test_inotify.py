"""Files landing in a directory, seen through inotify on the event loop."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

from crishim.util.inotify import IN_IGNORED, IN_MOVED_TO, DirectoryWatch, parse_events


async def test_a_file_renamed_into_place_wakes_the_waiter_at_once(tmp_path: Path) -> None:
    watch = DirectoryWatch(tmp_path)
    assert watch.start()
    try:
        landed = watch.changed()

        async def write_later() -> None:
            await asyncio.sleep(0.05)
            # as conmon writes an exit file: a temporary file renamed into place
            (tmp_path / "c1.tmp").write_text("0")
            os.rename(tmp_path / "c1.tmp", tmp_path / "c1")

        writer = asyncio.ensure_future(write_later())
        start = time.monotonic()
        await watch.wait(landed, 5)
        assert time.monotonic() - start < 1
        assert landed.done()
        await writer
        assert watch.landed >= 1
    finally:
        watch.close()


async def test_without_a_file_the_wait_ends_at_its_timeout(tmp_path: Path) -> None:
    watch = DirectoryWatch(tmp_path)
    assert watch.start()
    try:
        landed = watch.changed()
        start = time.monotonic()
        await watch.wait(landed, 0.2)
        assert 0.15 < time.monotonic() - start < 2
        # the waiter is forgotten: a later file resolves nothing left behind
        (tmp_path / "late").write_text("1")
        await asyncio.sleep(0.05)
        assert watch.changed() is not landed
    finally:
        watch.close()


async def test_a_removed_directory_falls_back_to_polling(tmp_path: Path) -> None:
    watched = tmp_path / "exits"
    watched.mkdir()
    watch = DirectoryWatch(watched)
    assert watch.start()
    landed = watch.changed()
    watched.rmdir()
    await watch.wait(landed, 5)
    for _ in range(50):
        if not watch.active:
            break
        await asyncio.sleep(0.01)
    assert not watch.active


async def test_a_missing_directory_cannot_be_watched(tmp_path: Path) -> None:
    watch = DirectoryWatch(tmp_path / "nowhere")
    assert not watch.start()
    assert not watch.active
    landed = watch.changed()
    await watch.wait(landed, 0.05)  # resolves at its timeout
    assert landed.done()


def test_event_records_are_parsed_with_their_names() -> None:
    name = b"abc\0\0\0\0\0"
    data = struct.pack("iIII", 1, IN_MOVED_TO, 0, len(name)) + name
    data += struct.pack("iIII", 1, IN_IGNORED, 0, 0)
    names, masks = parse_events(data)
    assert names == ["abc"]
    assert masks & IN_MOVED_TO
    assert masks & IN_IGNORED
