"""The CNI cache after a crash: half-written files are discarded, entries are kept."""

from __future__ import annotations

from pathlib import Path

from crishim.network.cni import CniManager


def test_unfinished_writes_are_discarded_and_entries_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cni-cache"
    cache.mkdir()
    (cache / "abc123.json").write_text('{"network": {}}')
    (cache / ".abc123.json.tmp").write_text('{"netw')  # a kill -9 before the rename
    (cache / ".def456.json.tmp").write_text("")
    manager = CniManager(str(tmp_path / "conf"), [], cache)
    assert manager.discard_unfinished_writes() == [".abc123.json.tmp", ".def456.json.tmp"]
    assert sorted(p.name for p in cache.iterdir()) == ["abc123.json"]
    assert manager.cached_sandboxes() == ["abc123"]
    assert manager.discard_unfinished_writes() == []


def test_no_cache_directory_yet(tmp_path: Path) -> None:
    manager = CniManager(str(tmp_path / "conf"), [], tmp_path / "absent")
    assert manager.discard_unfinished_writes() == []
