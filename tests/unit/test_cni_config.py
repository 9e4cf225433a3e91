"""Finding the CNI network configuration the way CNI's conventions say."""

from __future__ import annotations

import json
import os
from pathlib import Path

from crishim.network.cni import find_network_config, find_plugin

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "crishim-test",
    "plugins": [{"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": True}}],
}


def test_empty_or_missing_dir_has_no_config(tmp_path: Path) -> None:
    assert find_network_config(str(tmp_path)).config is None
    missing = find_network_config(str(tmp_path / "absent"))
    assert missing.config is None
    assert missing.reason("/x") == "no CNI network config found in /x"


def test_first_valid_file_by_name_wins(tmp_path: Path) -> None:
    (tmp_path / "20-b.conflist").write_text(json.dumps(CONFLIST))
    (tmp_path / "10-a.conflist").write_text(json.dumps(CONFLIST | {"name": "first"}))
    (tmp_path / "05-readme.txt").write_text("not a config")
    found = find_network_config(str(tmp_path)).config
    assert found is not None
    assert found.name == "first"
    assert found.plugin_types == ("bridge", "portmap")


def test_single_plugin_conf_is_a_list_of_one(tmp_path: Path) -> None:
    (tmp_path / "10-net.conf").write_text(json.dumps({"name": "n", "type": "bridge"}))
    found = find_network_config(str(tmp_path)).config
    assert found is not None
    assert found.plugin_types == ("bridge",)


def test_invalid_files_are_skipped_and_reported(tmp_path: Path) -> None:
    (tmp_path / "01-broken.conflist").write_text("{")
    (tmp_path / "02-noplugins.conflist").write_text(json.dumps({"name": "x", "plugins": []}))
    (tmp_path / "03-notype.conf").write_text(json.dumps({"name": "x"}))
    search = find_network_config(str(tmp_path))
    assert search.config is None
    assert len(search.problems) == 3
    reason = search.reason(str(tmp_path))
    assert "01-broken.conflist: not valid JSON" in reason
    assert "02-noplugins.conflist: 'plugins' must be a non-empty list" in reason
    assert "03-notype.conf: plugin 0 has no 'type'" in reason


def test_plugins_are_found_in_bin_dirs_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
        (d / "bridge").write_text("#!/bin/sh\n")
        os.chmod(d / "bridge", 0o755)
    (first / "noexec").write_text("")
    assert find_plugin([str(first), str(second)], "bridge") == str(first / "bridge")
    assert find_plugin([str(first)], "noexec") is None
    assert find_plugin([str(first)], "../a/bridge") is None
