"""The kind node image's files (docker/kind/) agree with crishim and with each other.

Building the image and booting it needs a kind node base image; what can be checked without
one is checked here: the config crishim reads there, the socket every client is pointed at,
the files the Containerfile copies, the ``ctr`` it installs, the default base image.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from crishim.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
KIND = REPO / "docker" / "kind"
SOCKET = f"unix://{Config().socket}"


def test_node_config_is_valid_and_uses_the_systemd_driver_and_kinds_cni() -> None:
    config = load_config(KIND / "crishim.toml", {})
    assert config.cgroup_driver == "systemd"
    assert config.cni.conf_dir == "/etc/cni/net.d"
    assert config.cni.bin_dirs == ["/opt/cni/bin"]
    assert config.registry.config_path == "/etc/containerd/certs.d"
    assert set(config.runtimes) == {"runc", "crun", "test-handler"}
    assert config.socket == Config().socket


def test_kubeadm_and_kubelet_are_pointed_at_crishims_socket() -> None:
    text = (KIND / "kind-config.yaml").read_text()
    assert text.count(f"criSocket: {SOCKET}\n") == 2
    for kind in ("InitConfiguration", "JoinConfiguration", "KubeletConfiguration"):
        assert f"kind: {kind}\n" in text
    assert f"containerRuntimeEndpoint: {SOCKET}\n" in text
    assert "cgroupDriver: systemd\n" in text


def test_crictl_is_pointed_at_crishims_socket() -> None:
    text = (KIND / "crictl.yaml").read_text()
    assert text == f"runtime-endpoint: {SOCKET}\nimage-endpoint: {SOCKET}\n"


def test_containerfile_copies_files_that_exist_and_installs_the_ctr_stand_in() -> None:
    text = (KIND / "Containerfile").read_text()
    sources = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert "docker/kind/crishim.toml" in sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert missing == []
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["crishim-ctr"] == "crishim.ctr:main"
    assert "ln -s /opt/crishim/bin/crishim-ctr /usr/local/bin/ctr" in text
    assert "ln -sf /dev/null /etc/systemd/system/containerd.service" in text
    assert "crishim unit > /etc/systemd/system/crishim.service" in text


def test_default_base_is_the_kind_node_of_the_cri_schemas_kubernetes_minor() -> None:
    text = (KIND / "Containerfile").read_text()
    match = re.search(r"^ARG BASE=kindest/node:v(\d+)\.(\d+)\.\d+@sha256:[0-9a-f]{64}$", text, re.M)
    assert match, "the default BASE is a kindest/node tag pinned by digest"
    readme = (REPO / "README.md").read_text()
    schema = re.search(r"cri-api v0\.(\d+)\.\d+", readme)
    assert schema
    assert (match[1], match[2]) == ("1", schema[1])


def test_preload_script_parses() -> None:
    subprocess.run(["bash", "-n", str(KIND / "crishim-kind-preload")], check=True)
