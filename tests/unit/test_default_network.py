"""The built-in default network: its conflist, and when it serves instead of the conf dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

from crishim.config import Config
from crishim.network.cni import (
    BUILTIN_SOURCE,
    choose_network,
    missing_plugins,
    plugin_exec_config,
)
from crishim.network.default_network import DEFAULT_NETWORK_NAME, DefaultNetwork, default_network

CONFLIST = {"cniVersion": "1.0.0", "name": "cluster", "plugins": [{"type": "flannel"}]}


def network(tmp_path: Path, subnet: str = "10.86.0.0/24") -> DefaultNetwork:
    return DefaultNetwork(subnet=subnet, bridge="crishim-u0", ipam_dir=tmp_path / "ipam")


def test_conflist_is_a_bridge_with_host_local_and_portmap(tmp_path: Path) -> None:
    conflist = network(tmp_path).conflist()
    assert conflist["name"] == DEFAULT_NETWORK_NAME
    assert conflist["cniVersion"] == "1.0.0"
    bridge, portmap = conflist["plugins"]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == "crishim-u0"
    assert bridge["isGateway"] is True
    assert bridge["ipMasq"] is True
    assert bridge["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.86.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(tmp_path / "ipam"),
    }
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    # What portmap gets on stdin carries the pod's port mappings (it declared the capability).
    ports = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]
    stdin = plugin_exec_config(conflist, portmap, {"portMappings": ports}, None)
    assert stdin["runtimeConfig"] == {"portMappings": ports}
    assert stdin["name"] == DEFAULT_NETWORK_NAME


def test_an_ipv6_subnet_gets_an_ipv6_default_route(tmp_path: Path) -> None:
    bridge = network(tmp_path, "fd00:86::/64").conflist()["plugins"][0]
    assert bridge["ipam"]["routes"] == [{"dst": "::/0"}]


def test_leases_live_in_crishims_root_not_in_the_conf_dir() -> None:
    config = Config(root="/srv/crishim")
    config.cni.default_network.subnet = "10.86.7.0/24"
    config.cni.default_network.bridge = "br-test"
    default = default_network(config)
    assert default == DefaultNetwork("10.86.7.0/24", "br-test", Path("/srv/crishim/cni-ipam"))
    assert default.lease_dir == Path("/srv/crishim/cni-ipam") / DEFAULT_NETWORK_NAME
    assert "br-test" in default.describe()
    assert "10.86.7.0/24" in default.describe()
    config.cni.default_network.enabled = False
    assert default_network(config) is None


def test_serves_while_the_conf_dir_is_empty_or_missing(tmp_path: Path) -> None:
    default = network(tmp_path)
    for conf_dir in (tmp_path, tmp_path / "absent"):
        chosen = choose_network(str(conf_dir), default).config
        assert chosen is not None
        assert chosen.path is None
        assert chosen.source == BUILTIN_SOURCE
        assert chosen.name == DEFAULT_NETWORK_NAME
        assert chosen.builtin == default.conflist()
        assert chosen.required_plugins == ("bridge", "portmap", "host-local")
    # Files that are not CNI configs do not count.
    (tmp_path / "README").write_text("hello")
    assert choose_network(str(tmp_path), default).config == chosen


def test_a_config_in_the_conf_dir_takes_over(tmp_path: Path) -> None:
    (tmp_path / "10-cluster.conflist").write_text(json.dumps(CONFLIST))
    chosen = choose_network(str(tmp_path), network(tmp_path)).config
    assert chosen is not None
    assert chosen.path == tmp_path / "10-cluster.conflist"
    assert chosen.name == "cluster"
    assert chosen.builtin is None


def test_a_config_being_written_does_not_bring_the_default_back(tmp_path: Path) -> None:
    (tmp_path / "10-cluster.conflist").write_text('{"cniVersion": "1.0.0", "na')
    search = choose_network(str(tmp_path), network(tmp_path))
    assert search.config is None
    assert "10-cluster.conflist: not valid JSON" in search.reason(str(tmp_path))


def test_an_unreadable_conf_dir_is_not_an_empty_one(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    search = choose_network(str(not_a_dir), network(tmp_path))
    assert search.config is None
    assert f"cannot read {not_a_dir}: Not a directory" in search.reason(str(not_a_dir))


def test_disabled_means_no_network_without_a_config(tmp_path: Path) -> None:
    search = choose_network(str(tmp_path), None)
    assert search.config is None
    assert search.reason(str(tmp_path)) == f"no CNI network config found in {tmp_path}"


def test_missing_plugins_include_the_ipam_plugin(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for plugin in ("bridge", "portmap"):
        (bindir / plugin).write_text("#!/bin/sh\n")
        os.chmod(bindir / plugin, 0o755)
    chosen = choose_network(str(tmp_path / "empty"), network(tmp_path)).config
    assert chosen is not None
    assert missing_plugins(chosen, [str(bindir)]) == ["host-local"]
