"""Edits of kubelet's config file and kubeadm's flags file: the endpoint changes, nothing else."""

from __future__ import annotations

import json

import pytest
import yaml

from crishim.errors import FailedPrecondition
from crishim.node.kubelet import config_value, edit_config, edit_flags, flag_value, flags_of

CRISHIM = "unix:///run/crishim/crishim.sock"
CONTAINERD = "unix:///run/containerd/containerd.sock"

KUBEADM_CONFIG = """\
apiVersion: kubelet.config.k8s.io/v1beta1
# written by kubeadm
authentication:
  anonymous:
    enabled: false
  webhook:
    cacheTTL: 0s
cgroupDriver: systemd   # as containerd
containerRuntimeEndpoint: "unix:///run/containerd/containerd.sock"
kind: KubeletConfiguration
staticPodPath: /etc/kubernetes/manifests
"""


def test_the_endpoint_is_replaced_and_every_other_line_kept() -> None:
    edited = edit_config(KUBEADM_CONFIG, {"containerRuntimeEndpoint": CRISHIM})
    before, after = KUBEADM_CONFIG.splitlines(), edited.splitlines()
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert changed == [
        ('containerRuntimeEndpoint: "unix:///run/containerd/containerd.sock"',
         f"containerRuntimeEndpoint: {CRISHIM}")
    ]  # fmt: skip
    parsed = yaml.safe_load(edited)
    assert parsed["containerRuntimeEndpoint"] == CRISHIM
    assert parsed["authentication"] == yaml.safe_load(KUBEADM_CONFIG)["authentication"]


def test_values_are_read_quoted_or_with_a_comment() -> None:
    assert config_value(KUBEADM_CONFIG, "containerRuntimeEndpoint") == CONTAINERD
    assert config_value(KUBEADM_CONFIG, "cgroupDriver") == "systemd"
    assert config_value(KUBEADM_CONFIG, "imageServiceEndpoint") is None
    # a nested key of the same name is not the top-level one
    assert config_value("a:\n  cgroupDriver: x\n", "cgroupDriver") is None


def test_a_missing_key_is_added_and_removed_again_byte_for_byte() -> None:
    text = "kind: KubeletConfiguration\nstaticPodPath: /etc/kubernetes/manifests"  # no newline
    edited = edit_config(text, {"containerRuntimeEndpoint": CRISHIM})
    assert yaml.safe_load(edited)["containerRuntimeEndpoint"] == CRISHIM
    assert yaml.safe_load(edited)["staticPodPath"] == "/etc/kubernetes/manifests"
    restored = edit_config(edited, {"containerRuntimeEndpoint": None})
    assert restored == text + "\n"


def test_crlf_line_endings_stay() -> None:
    text = "kind: KubeletConfiguration\r\ncontainerRuntimeEndpoint: x\r\n"
    assert edit_config(text, {"containerRuntimeEndpoint": CRISHIM}) == (
        f"kind: KubeletConfiguration\r\ncontainerRuntimeEndpoint: {CRISHIM}\r\n"
    )


def test_a_json_config_is_edited_as_json() -> None:
    text = json.dumps({"kind": "KubeletConfiguration", "cgroupDriver": "cgroupfs"})
    assert config_value(text, "cgroupDriver") == "cgroupfs"
    edited = edit_config(text, {"containerRuntimeEndpoint": CRISHIM})
    assert json.loads(edited) == {
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": CRISHIM,
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\n---\nb: 2\n---\nc: 3\n", "more than one YAML document"),
        ("containerRuntimeEndpoint: a\ncontainerRuntimeEndpoint: b\n", "more than once"),
        ("{not json", "not valid JSON"),
    ],
)
def test_files_it_cannot_edit_safely_are_refused(text: str, problem: str) -> None:
    with pytest.raises(FailedPrecondition, match=problem):
        edit_config(text, {"containerRuntimeEndpoint": CRISHIM})


KUBEADM_FLAGS = (
    f'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint={CONTAINERD} '
    '--pod-infra-container-image=registry.k8s.io/pause:3.9"\n'
)


def test_the_flag_is_replaced_in_kubeadms_flags_file() -> None:
    edited = edit_flags(KUBEADM_FLAGS, {"--container-runtime-endpoint": CRISHIM})
    assert edited == KUBEADM_FLAGS.replace(CONTAINERD, CRISHIM)
    assert flag_value(flags_of(edited), "--container-runtime-endpoint") == CRISHIM
    assert edit_flags(edited, {"--container-runtime-endpoint": CONTAINERD}) == KUBEADM_FLAGS


def test_a_flag_with_a_space_and_other_lines_are_kept() -> None:
    text = f"# kubeadm\nKUBELET_KUBEADM_ARGS='--container-runtime-endpoint {CONTAINERD} --v=2'\n"
    edited = edit_flags(text, {"--container-runtime-endpoint": CRISHIM})
    assert edited == text.replace(CONTAINERD, CRISHIM)
    assert flag_value(flags_of(edited), "--container-runtime-endpoint") == CRISHIM


def test_an_added_flag_goes_inside_the_quotes_and_comes_out_again() -> None:
    text = 'KUBELET_KUBEADM_ARGS="--v=2"\n'
    edited = edit_flags(text, {"--image-service-endpoint": CRISHIM})
    assert edited == f'KUBELET_KUBEADM_ARGS="--v=2 --image-service-endpoint={CRISHIM}"\n'
    assert edit_flags(edited, {"--image-service-endpoint": None}) == text


def test_a_flag_named_like_another_is_not_touched() -> None:
    text = 'KUBELET_KUBEADM_ARGS="--x-container-runtime-endpoint=a"\n'
    edited = edit_flags(text, {"--container-runtime-endpoint": CRISHIM})
    assert flags_of(edited) == [
        "--x-container-runtime-endpoint=a",
        f"--container-runtime-endpoint={CRISHIM}",
    ]


def test_flag_values_the_last_one_wins() -> None:
    assert flag_value(["--config=/a", "--config", "/b"], "--config") == "/b"
    assert flag_value(["--configx=/a"], "--config") is None
    assert flag_value(["--config"], "--config") is None


def test_config_value_of_a_json_file_gives_numbers_and_booleans_as_yaml_would() -> None:
    text = '{"healthzPort": 0, "failSwapOn": false, "cgroupDriver": "systemd", "a": {}}'
    assert config_value(text, "healthzPort") == "0"
    assert config_value(text, "failSwapOn") == "false"
    assert config_value(text, "cgroupDriver") == "systemd"
    assert config_value(text, "a") is None
    assert config_value(text, "missing") is None
