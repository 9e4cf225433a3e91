"""Reading a blob while its download arrives: what the reader sees, and when."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio.to_thread
import pytest

from crishim.errors import DataLoss
from crishim.images.content import BlobAborted, BlobReader, ContentStore

BLOB = bytes(range(256)) * 20_000  # 5 MB: several write batches
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def store(tmp_path: Path) -> ContentStore:
    content = ContentStore(tmp_path / "content")
    content.recover()
    return content


def read_all(reader: BlobReader) -> bytes:
    with closing(reader):
        return reader.read()


class Gate:
    """A download that sends its first half, then waits for ``open`` to send the rest."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.half_sent = asyncio.Event()
        self.opened = asyncio.Event()

    async def source(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2
        for start in range(0, half, 65536):
            yield self.data[start : min(start + 65536, half)]
        self.half_sent.set()
        await self.opened.wait()
        for start in range(half, len(self.data), 65536):
            yield self.data[start : start + 65536]


async def test_a_reader_gets_the_bytes_as_they_arrive_and_the_end_once_verified(
    tmp_path: Path,
) -> None:
    content = store(tmp_path)
    gate = Gate(BLOB)
    download = asyncio.create_task(content.ensure(DIGEST, len(BLOB), gate.source))
    reader = await content.open_stream(DIGEST, download)
    assert reader is not None
    await gate.half_sent.wait()
    # Readable before the download is over: a read gives what is there, at least a byte.
    first = await anyio.to_thread.run_sync(reader.read, 1 << 20)
    assert 0 < len(first) <= 1 << 20
    assert first == BLOB[: len(first)]
    rest = asyncio.ensure_future(anyio.to_thread.run_sync(read_all, reader))
    await asyncio.sleep(0.2)
    assert not rest.done()  # no end before the rest arrived and matched the digest
    gate.opened.set()
    assert first + await rest == BLOB
    assert (await download).read_bytes() == BLOB


async def test_a_reader_of_a_download_that_fails_its_digest_gets_an_error_not_an_end(
    tmp_path: Path,
) -> None:
    content = store(tmp_path)
    corrupt = BLOB[:-1] + b"x"
    gate = Gate(corrupt)
    download = asyncio.create_task(content.ensure(DIGEST, len(BLOB), gate.source))
    reader = await content.open_stream(DIGEST, download)
    assert reader is not None
    rest = asyncio.ensure_future(anyio.to_thread.run_sync(read_all, reader))
    gate.opened.set()
    with pytest.raises(BlobAborted):
        await rest
    with pytest.raises(DataLoss, match="content has digest"):
        await download
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


async def test_a_reader_waits_for_the_download_to_begin(tmp_path: Path) -> None:
    content = store(tmp_path)
    start = asyncio.Event()

    async def later() -> None:
        await start.wait()
        await content.ensure(DIGEST, len(BLOB), Gate(BLOB).source)

    starter = asyncio.create_task(later())
    opening = asyncio.create_task(content.open_stream(DIGEST, starter))
    await asyncio.sleep(0.05)
    assert not opening.done()
    start.set()
    reader = await opening
    assert reader is not None
    reader.close()
    starter.cancel()


async def test_no_reader_when_nothing_will_download_the_blob(tmp_path: Path) -> None:
    content = store(tmp_path)
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    assert await content.open_stream(DIGEST, finished) is None


async def test_a_stored_blob_is_read_from_the_store(tmp_path: Path) -> None:
    content = store(tmp_path)
    await content.put(DIGEST, BLOB)
    never = asyncio.get_running_loop().create_future()
    reader = await content.open_stream(DIGEST, never)
    assert reader is not None
    assert await anyio.to_thread.run_sync(read_all, reader) == BLOB
