"""The cluster rig's pure parts: its certificates and how it finds its binaries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.rig.cluster import BIN_DIR_ENV, BINARY_ENV, deployment, kube_binaries
from tests.rig.pki import Pki


def text_of(cert: Path) -> str:
    argv = ["openssl", "x509", "-in", str(cert), "-noout", "-text"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_leaf_certificates_verify_against_the_ca_with_subject_usage_and_sans(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    ca = pki.make_ca()
    node = pki.issue("node", "system:node:localhost", "system:nodes")
    server = pki.issue("api", "kube-apiserver", server=True, client=False, sans=("IP:127.0.0.1",))
    for pair in (node, server):
        argv = ["openssl", "verify", "-CAfile", str(ca.cert), str(pair.cert)]
        assert subprocess.run(argv, capture_output=True, check=False).returncode == 0
    node_text, server_text = text_of(node.cert), text_of(server.cert)
    assert "O = system:nodes, CN = system:node:localhost" in node_text
    assert "TLS Web Client Authentication" in node_text
    assert "TLS Web Server Authentication" not in node_text
    assert "IP Address:127.0.0.1" in server_text
    assert "CA:FALSE" in server_text
    assert "CA:TRUE" in text_of(ca.cert)


def test_service_account_keys_are_a_matching_rsa_pair(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    private, public = pki.service_account_keys()
    derived = subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-pubout"], capture_output=True, check=True
    ).stdout
    assert derived == public.read_bytes()


def test_binaries_come_from_the_directory_and_single_variables_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in BINARY_ENV:
        binary = tmp_path / name
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    own_kubectl = tmp_path / "other-kubectl"
    own_kubectl.write_text("#!/bin/sh\n")
    own_kubectl.chmod(0o755)
    for variable in BINARY_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(BIN_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CRISHIM_TEST_KUBECTL", str(own_kubectl))
    found, why = kube_binaries()
    assert why == ""
    assert found["kubectl"] == str(own_kubectl)
    assert found["etcd"] == str(tmp_path / "etcd")


def test_missing_binaries_name_the_variables_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in BINARY_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv(BIN_DIR_ENV, raising=False)
    found, why = kube_binaries()
    assert found == {}
    assert "CRISHIM_TEST_KUBE_APISERVER" in why
    assert BIN_DIR_ENV in why
    monkeypatch.setenv(BIN_DIR_ENV, str(tmp_path))
    assert "not an executable file" in kube_binaries()[1]


def test_the_idle_deployment_needs_no_kubelet_made_volume() -> None:
    spec = deployment("idle", 3, "registry/busybox:1")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["containers"][0]["command"][:2] == ["sh", "-c"]
