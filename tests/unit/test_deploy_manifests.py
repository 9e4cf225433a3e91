"""docker/deploy/: the DaemonSets that install and uninstall crishim, checked for the shape
the installer relies on (kubectl's client-side dry run needs an API server for discovery)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "docker" / "deploy"
MANIFESTS = {"crishim-install.yaml": "install", "crishim-uninstall.yaml": "uninstall"}


def _objects(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize(("name", "action"), MANIFESTS.items())
def test_the_daemonset_runs_the_installer_privileged_on_the_hosts_root(
    name: str, action: str
) -> None:
    objects = _objects(name)
    assert set(objects) == {"Namespace", "DaemonSet"}
    namespace = objects["Namespace"]["metadata"]["name"]
    daemonset = objects["DaemonSet"]
    assert daemonset["apiVersion"] == "apps/v1"
    assert daemonset["metadata"]["namespace"] == namespace
    spec = daemonset["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"crishim.io/runtime": "crishim"}
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["hostPID"] is True  # nsenter into PID 1, the host's kubelet in /proc
    assert pod["hostNetwork"] is True  # kubelet's healthz on 127.0.0.1
    assert pod["automountServiceAccountToken"] is False  # it changes nothing in the cluster
    (container,) = pod["containers"]
    assert container["securityContext"] == {"privileged": True}
    command = " ".join(container["command"])
    assert f"crishim node {action} --host-root /host && exec sleep infinity" in command
    (mount,) = container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/"
    assert mount["mountPath"] == "/host"
    assert mount["mountPropagation"] == "HostToContainer"
    assert "exec" in container["readinessProbe"]


def test_install_is_ready_on_the_marker_and_uninstall_once_the_record_is_gone() -> None:
    install = _objects("crishim-install.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    probe = install["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe == ["test", "-f", "/host/opt/crishim/installed"]
    uninstall = _objects("crishim-uninstall.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    probe = uninstall["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[-1] == "! test -e /host/opt/crishim/install.json"


def test_both_use_the_same_image_and_namespace() -> None:
    install, uninstall = _objects("crishim-install.yaml"), _objects("crishim-uninstall.yaml")
    assert install["Namespace"] == uninstall["Namespace"]
    images = {
        o["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["image"]
        for o in (install, uninstall)
    }
    assert len(images) == 1
