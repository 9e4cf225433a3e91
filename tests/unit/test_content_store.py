"""The content store: verified, atomic, deduplicated blobs."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crishim.errors import DataLoss, InvalidArgument
from crishim.images.content import ContentStore


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store(tmp_path: Path) -> ContentStore:
    content = ContentStore(tmp_path / "content")
    content.recover()
    return content


async def test_put_and_read(tmp_path: Path) -> None:
    content = store(tmp_path)
    path = await content.put(digest(b"hello"), b"hello")
    assert path.read_bytes() == b"hello"
    assert content.has(digest(b"hello"))
    assert content.digests() == {digest(b"hello")}


@pytest.mark.parametrize(
    ("declared", "chunks", "problem"),
    [
        (5, [b"hel", b"lo!"], "more than the 5 bytes"),
        (6, [b"hello"], "got 5 bytes, its descriptor says 6"),
        (5, [b"jello"], "content has digest"),
    ],
)
async def test_bad_content_never_lands_under_its_name(
    tmp_path: Path, declared: int, chunks: list[bytes], problem: str
) -> None:
    content = store(tmp_path)

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    with pytest.raises(DataLoss, match=problem):
        await content.ensure(digest(b"hello"), declared, source)
    assert not content.has(digest(b"hello"))
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


async def test_concurrent_requests_share_one_download(tmp_path: Path) -> None:
    content = store(tmp_path)
    calls = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        yield b"shared"

    paths = await asyncio.gather(*(content.ensure(digest(b"shared"), 6, source) for _ in range(5)))
    assert calls == 1
    assert len(set(paths)) == 1
    await content.ensure(digest(b"shared"), 6, source)
    assert calls == 1  # present: not fetched again


async def test_a_crash_leftover_is_cleared_by_recover(tmp_path: Path) -> None:
    content = store(tmp_path)
    (tmp_path / "content" / "ingest" / "half-written").write_bytes(b"partial")
    content.recover()
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def test_malformed_digests_are_refused(tmp_path: Path) -> None:
    content = store(tmp_path)
    for bad in ("sha256:xyz", "md5:" + "a" * 32, "sha256:../../etc/passwd", "sha256:" + "A" * 64):
        with pytest.raises(InvalidArgument, match="digest"):
            content.path(bad)


def test_staging_keeps_only_what_it_adopts(tmp_path: Path) -> None:
    content = store(tmp_path)
    with content.staging() as staging:
        kept, dropped = staging.create(), staging.create()
        kept.write(b"keep me")
        dropped.write(b"drop me")
        blob = kept.finish()
        dropped.finish()
        assert staging.adopt(blob) == content.path(digest(b"keep me"))
        assert staging.existing(digest(b"keep me")) == content.path(digest(b"keep me"))
        assert staging.existing(digest(b"drop me")) is None
    assert content.digests() == {digest(b"keep me")}
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def test_staging_refuses_a_document_that_does_not_match_its_digest(tmp_path: Path) -> None:
    content = store(tmp_path)
    with content.staging() as staging, pytest.raises(DataLoss, match="content has digest"):
        staging.add(digest(b"one"), b"two")
    assert content.digests() == set()
    assert list((tmp_path / "content" / "ingest").iterdir()) == []
