"""Records and the object store: atomic writes, reload, update rollback, corrupt files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from crishim.errors import AlreadyExists, InvalidArgument, NotFound
from crishim.model import PodMetadata, Sandbox, SandboxState
from crishim.store import ObjectStore, RecordError, read_record, write_record


def make(sid: str) -> Sandbox:
    return Sandbox(id=sid, metadata=PodMetadata(name=sid, uid="u", namespace="n"), created_at=5)


def test_record_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "x" / "sandbox.json"
    write_record(path, "sandbox", {"a": 1})
    write_record(path, "sandbox", {"a": 2})
    assert read_record(path, "sandbox") == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["sandbox.json"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"version": 99, "kind": "sandbox", "object": {}}', "record version 99 is not supported"),
        ('{"version": 1, "kind": "container", "object": {}}', "holds a 'container' record"),
        ("[]", "not a crishim record"),
    ],
)
def test_bad_records_name_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "sandbox.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=problem) as info:
        read_record(path, "sandbox")
    assert str(path) in str(info.value)


async def test_store_persists_and_reloads(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    await store.add(make("a"))
    await store.add(make("b"))
    again = ObjectStore(tmp_path, "sandbox", Sandbox)
    assert again.load() == []
    assert sorted(s.id for s in again.list()) == ["a", "b"]
    assert again.get("a") == make("a")


async def test_add_refuses_a_taken_id(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    await store.add(make("a"))
    with pytest.raises(AlreadyExists, match="sandbox 'a' already exists"):
        await store.add(make("a"))


async def test_update_bumps_revision_and_persists(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    await store.add(make("a"))
    updated = await store.update(
        "a", lambda s: s.model_copy(update={"state": SandboxState.NOTREADY})
    )
    assert updated.revision == 1
    again = ObjectStore(tmp_path, "sandbox", Sandbox)
    again.load()
    assert again.get("a").state is SandboxState.NOTREADY
    assert again.get("a").revision == 1


async def test_failed_update_leaves_the_record_unchanged(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    original = await store.add(make("a"))

    def boom(_: Sandbox) -> Sandbox:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await store.update("a", boom)
    assert store.get("a") == original
    again = ObjectStore(tmp_path, "sandbox", Sandbox)
    again.load()
    assert again.get("a") == original


async def test_delete_is_idempotent_and_removes_the_directory(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    await store.add(make("a"))
    (tmp_path / "a" / "other-file").write_text("owned by another layer")
    await store.delete("a")
    await store.delete("a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(NotFound, match="sandbox 'a' not found"):
        store.get("a")


async def test_ids_that_could_escape_the_directory_are_refused(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", "sandbox", Sandbox)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(InvalidArgument, match="not a valid id"):
            await store.add(make(bad))
    assert not (tmp_path / "x").exists()


def test_a_corrupt_record_is_set_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    write_record(
        tmp_path / "good" / "sandbox.json", "sandbox", make("good").model_dump(mode="json")
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sandbox.json").write_text(json.dumps({"version": 1}))
    store = ObjectStore(tmp_path, "sandbox", Sandbox)
    problems = store.load()
    assert len(problems) == 1
    assert "bad/sandbox.json" in problems[0]
    assert [s.id for s in store.list()] == ["good"]
    assert (tmp_path / "bad" / "sandbox.json.corrupt").exists()


@pytest.mark.parametrize("durable", [True, False])
async def test_concurrent_updates_of_one_object_lose_nothing(tmp_path: Path, durable: bool) -> None:
    store = ObjectStore(tmp_path, "sandbox", Sandbox, durable=durable)
    await store.add(make("a"))
    await store.add(make("b"))

    def relabel(name: str) -> Callable[[Sandbox], Sandbox]:
        return lambda s: s.model_copy(update={"labels": {**s.labels, name: "x"}})

    updates = [store.update(sid, relabel(f"l{i}")) for i in range(20) for sid in ("a", "b")]
    await asyncio.gather(*updates)
    again = ObjectStore(tmp_path, "sandbox", Sandbox)
    assert again.load() == []
    for sid in ("a", "b"):
        assert again.get(sid).revision == 20
        assert sorted(again.get(sid).labels) == sorted(f"l{i}" for i in range(20))
