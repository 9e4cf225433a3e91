"""CNI execution without root: result parsing, CNI_ARGS, runtimeConfig and the plugin chain.

The chain tests run fake plugins: a Python script that appends what it was given (stdin and
the CNI_* environment) to a log file and prints the canned result named in its config, or
passes its prevResult through, the way chained plugins like portmap do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from crishim.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from crishim.network.cni import CniManager, format_cni_args, plugin_exec_config
from crishim.network.cni_result import IpConfig, parse_result, pod_ips

RESULT_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [{"version": "4", "address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 2}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
    "dns": {"nameservers": ["10.1.0.10"], "search": ["svc.local"]},
}

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1},
        {"address": "10.9.0.1/16", "interface": 0},
        {"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 1},
    ],
    "routes": [{"dst": "::/0"}],
    "dns": {},
}

FAKE_PLUGIN = f"""#!{sys.executable}
import json, os, sys, time
conf = json.load(sys.stdin)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open(conf["log"], "a") as log:
    log.write(json.dumps({{"type": conf["type"], "env": env, "stdin": conf}}) + "\\n")
if conf.get("sleep"):
    time.sleep(conf["sleep"])
if env["CNI_COMMAND"] == "ADD" and conf.get("fail"):
    print(json.dumps(conf["fail"]))
    sys.exit(1)
if env["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf.get("canned") or conf["prevResult"]))
"""


def make_plugins(bin_dir: Path, *names: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(FAKE_PLUGIN)
        path.chmod(0o755)


def read_log(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "conf": tmp_path / "conf",
        "bin": tmp_path / "bin",
        "cache": tmp_path / "cache",
        "log": tmp_path / "calls.log",
    }
    paths["conf"].mkdir()
    make_plugins(paths["bin"], "fakebridge", "fakeportmap", "fakelo")
    return paths


def write_conflist(env: dict[str, Path], **extra: Any) -> dict[str, Any]:
    log = str(env["log"])
    conflist = {
        "cniVersion": "1.0.0",
        "name": "fakenet",
        "plugins": [
            {"type": "fakebridge", "log": log, "canned": RESULT_100, **extra},
            {"type": "fakeportmap", "log": log, "capabilities": {"portMappings": True}},
            {"type": "fakelo", "log": log},
        ],
    }
    (env["conf"] / "10-fake.conflist").write_text(json.dumps(conflist))
    return conflist


def manager(env: dict[str, Path], **kwargs: Any) -> CniManager:
    return CniManager(str(env["conf"]), [str(env["bin"]), "/nonexistent"], env["cache"], **kwargs)


def test_parse_040_result() -> None:
    result = parse_result(RESULT_040)
    assert result.cni_version == "0.4.0"
    assert result.ips == [IpConfig("10.1.2.3/24", "10.1.2.1", 2)]
    assert result.interfaces[2].sandbox == "/run/netns/x"
    assert result.interfaces[0].sandbox is None
    assert [(r.dst, r.gw) for r in result.routes] == [("0.0.0.0/0", "10.1.2.1")]
    assert result.dns.nameservers == ["10.1.0.10"]
    assert result.dns.search == ["svc.local"]
    assert result.raw is RESULT_040


def test_parse_100_result_and_families() -> None:
    result = parse_result(RESULT_100)
    assert [ip.family for ip in result.ips] == [6, 4, 4]
    assert result.ips[0].gateway == "fd00::1"
    assert result.ips[1].gateway is None
    assert result.ips[2].ip == "10.1.2.3"
    assert result.routes[0].gw is None
    assert result.dns.nameservers == []


def test_parse_legacy_ip4_ip6_result() -> None:
    result = parse_result(
        {
            "cniVersion": "0.2.0",
            "ip4": {"ip": "10.0.0.7/8", "gateway": "10.0.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "ip6": {"ip": "fd00::7/64"},
        }
    )
    assert [(ip.address, ip.gateway, ip.interface) for ip in result.ips] == [
        ("10.0.0.7/8", "10.0.0.1", None),
        ("fd00::7/64", None, None),
    ]
    assert result.routes[0].dst == "0.0.0.0/0"
    assert pod_ips(result) == ["10.0.0.7", "fd00::7"]


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"cniVersion": "1.0.0", "ips": {"address": "10.0.0.1/8"}},
        {"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]},
        {"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]},
        {"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]},
        {"cniVersion": "1.0.0", "interfaces": [{"mac": "aa:bb:cc:dd:ee:ff"}]},
    ],
)
def test_malformed_results_are_refused(raw: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_result(raw)


def test_pod_ips_primary_is_ipv4_and_host_side_addresses_are_skipped() -> None:
    # The 10.9.0.1 address sits on the host-side bridge (interface 0, no sandbox).
    assert pod_ips(parse_result(RESULT_100)) == ["10.1.2.3", "fd00::5"]


def test_pod_ips_deduplicates() -> None:
    result = parse_result(
        {"cniVersion": "1.0.0", "ips": [{"address": "fd00::9/64"}, {"address": "fd00::9/128"}]}
    )
    assert pod_ips(result) == ["fd00::9"]


def test_cni_args_keep_order_and_refuse_separators() -> None:
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web-0"}
    assert format_cni_args(args) == "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0"
    assert format_cni_args({}) == ""
    for bad in ({"A;B": "1"}, {"A=B": "1"}, {"A": "1;B=2"}, {"": "x"}):
        with pytest.raises(InvalidArgument):
            format_cni_args(bad)


def test_runtime_config_holds_only_declared_capabilities() -> None:
    network = {"cniVersion": "0.4.0", "name": "net"}
    capabilities = {"portMappings": [{"hostPort": 8080}], "bandwidth": {"ingressRate": 1}}
    portmap = {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}}
    config = plugin_exec_config(network, portmap, capabilities, {"cniVersion": "0.4.0"})
    assert config["runtimeConfig"] == {"portMappings": [{"hostPort": 8080}]}
    assert config["name"] == "net"
    assert config["cniVersion"] == "0.4.0"
    assert config["prevResult"] == {"cniVersion": "0.4.0"}
    bridge = {"type": "bridge", "prevResult": {"stale": True}, "runtimeConfig": {"x": 1}}
    plain = plugin_exec_config(network, bridge, capabilities, None)
    assert "runtimeConfig" not in plain
    assert "prevResult" not in plain
    assert bridge["prevResult"] == {"stale": True}, "the input must not be modified"


async def test_add_chains_prev_results_and_caches(env: dict[str, Path]) -> None:
    write_conflist(env)
    cni = manager(env)
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "p"}
    caps = {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]}
    attachment = await cni.add("sb1", "/proc/1/ns/net", args=args, capabilities=caps)
    assert (attachment.network, attachment.source) == (
        "fakenet",
        str(env["conf"] / "10-fake.conflist"),
    )
    result = attachment.result
    assert pod_ips(result) == ["10.1.2.3", "fd00::5"]
    assert result.raw == RESULT_100

    calls = read_log(env["log"])
    assert [c["type"] for c in calls] == ["fakebridge", "fakeportmap", "fakelo"]
    assert "prevResult" not in calls[0]["stdin"]
    assert calls[1]["stdin"]["prevResult"] == RESULT_100
    assert calls[2]["stdin"]["prevResult"] == RESULT_100
    assert calls[1]["stdin"]["runtimeConfig"] == caps
    assert "runtimeConfig" not in calls[0]["stdin"]
    assert all(c["stdin"]["name"] == "fakenet" for c in calls)
    assert calls[0]["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "sb1",
        "CNI_NETNS": "/proc/1/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
        "CNI_PATH": f"{env['bin']}:/nonexistent",
    }
    cached = json.loads((env["cache"] / "sb1.json").read_text())
    assert cached["result"] == RESULT_100
    assert cached["source"] == str(env["conf"] / "10-fake.conflist")
    assert cached["args"] == args
    assert cached["capabilities"] == caps
    assert cached["network"]["name"] == "fakenet"
    assert not list(env["cache"].glob(".*")), "no temp file left behind"


async def test_check_gets_the_cached_result(env: dict[str, Path]) -> None:
    write_conflist(env)
    cni = manager(env)
    with pytest.raises(NotFound):
        await cni.check("sb1", "/proc/1/ns/net")
    await cni.add("sb1", "/proc/1/ns/net")
    env["log"].unlink()
    await cni.check("sb1", "/proc/1/ns/net")
    calls = read_log(env["log"])
    assert [c["env"]["CNI_COMMAND"] for c in calls] == ["CHECK"] * 3
    assert all(c["stdin"]["prevResult"] == RESULT_100 for c in calls)


async def test_delete_uses_cache_after_restart_and_conf_dir_change(env: dict[str, Path]) -> None:
    write_conflist(env)
    await manager(env).add("sb1", "/proc/1/ns/net", args={"K8S_POD_NAME": "p"})
    env["log"].unlink()
    (env["conf"] / "10-fake.conflist").unlink()

    restarted = manager(env)
    # Not a namespace file: plugins must get an empty CNI_NETNS.
    await restarted.delete("sb1", "/etc/hostname")
    calls = read_log(env["log"])
    assert [c["type"] for c in calls] == ["fakelo", "fakeportmap", "fakebridge"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in calls)
    assert all(c["env"]["CNI_NETNS"] == "" for c in calls)
    assert all(c["env"]["CNI_ARGS"] == "K8S_POD_NAME=p" for c in calls)
    assert all(c["stdin"]["prevResult"] == RESULT_100 for c in calls)
    assert not (env["cache"] / "sb1.json").exists()

    await restarted.delete("sb1", None)
    assert len(read_log(env["log"])) == 3, "a second DEL has nothing to do"


async def test_delete_of_a_pre_040_network_sends_no_prev_result(env: dict[str, Path]) -> None:
    log = str(env["log"])
    single = {
        "cniVersion": "0.3.1",
        "name": "old",
        "type": "fakebridge",
        "log": log,
        "canned": RESULT_040 | {"cniVersion": "0.3.1"},
    }
    (env["conf"] / "10-old.conf").write_text(json.dumps(single))
    cni = manager(env)
    result = (await cni.add("sb2", "/proc/1/ns/net")).result
    assert pod_ips(result) == ["10.1.2.3"]
    await cni.check("sb2", "/proc/1/ns/net")  # CHECK does not exist before 0.4.0
    await cni.delete("sb2", None)
    calls = read_log(env["log"])
    assert [c["env"]["CNI_COMMAND"] for c in calls] == ["ADD", "DEL"]
    assert "prevResult" not in calls[1]["stdin"]


async def test_plugin_error_names_plugin_network_and_message(env: dict[str, Path]) -> None:
    error = {"cniVersion": "1.0.0", "code": 11, "msg": "no free address", "details": "pool"}
    write_conflist(env, fail=error)
    cni = manager(env)
    with pytest.raises(Unavailable) as caught:
        await cni.add("sb3", "/proc/1/ns/net")
    message = str(caught.value)
    assert "fakebridge" in message
    assert "fakenet" in message
    assert "no free address" in message
    # The failed ADD was rolled back: DEL ran for the whole chain and the cache is gone.
    calls = read_log(env["log"])
    assert [c["env"]["CNI_COMMAND"] for c in calls] == ["ADD", "DEL", "DEL", "DEL"]
    assert not (env["cache"] / "sb3.json").exists()


async def test_config_error_code_is_invalid_argument(env: dict[str, Path]) -> None:
    write_conflist(env, fail={"code": 7, "msg": "bad subnet"})
    with pytest.raises(InvalidArgument, match="bad subnet"):
        await manager(env).add("sb4", "/proc/1/ns/net")


async def test_hanging_plugin_is_killed(env: dict[str, Path]) -> None:
    write_conflist(env, sleep=30)
    with pytest.raises(DeadlineExceeded, match="fakebridge"):
        await manager(env, plugin_timeout=0.5).add("sb5", "/proc/1/ns/net")


async def test_missing_plugin_and_missing_config(env: dict[str, Path]) -> None:
    cni = manager(env)
    with pytest.raises(Unavailable, match="not ready"):
        await cni.add("sb6", "/proc/1/ns/net")
    write_conflist(env)
    assert cni.status().config is not None
    os.unlink(env["bin"] / "fakeportmap")
    status = cni.status()
    assert status.config is None
    assert "plugin fakeportmap not found" in status.reason(str(env["conf"]))
    with pytest.raises(FailedPrecondition, match="fakeportmap") as caught:
        await cni.add("sb6", "/proc/1/ns/net")
    assert "not found in" in str(caught.value)
    # The rollback DELs the plugins that ran and skips the missing one: nothing is cached.
    commands = [(c["stdin"]["type"], c["env"]["CNI_COMMAND"]) for c in read_log(env["log"])]
    assert commands == [("fakebridge", "ADD"), ("fakelo", "DEL"), ("fakebridge", "DEL")]
    assert not (env["cache"] / "sb6.json").exists()


async def test_corrupt_cache_falls_back_to_current_config(env: dict[str, Path]) -> None:
    write_conflist(env)
    env["cache"].mkdir()
    (env["cache"] / "sb7.json").write_text("{truncated")
    cni = manager(env)
    await cni.delete("sb7", None)
    assert [c["env"]["CNI_COMMAND"] for c in read_log(env["log"])] == ["DEL"] * 3
    assert not (env["cache"] / "sb7.json").exists()


async def test_bad_sandbox_id_is_refused(env: dict[str, Path]) -> None:
    write_conflist(env)
    with pytest.raises(InvalidArgument):
        await manager(env).add("../escape", "/proc/1/ns/net")
