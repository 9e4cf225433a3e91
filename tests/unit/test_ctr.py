"""The ``ctr`` stand-in of the kind node image: kind's invocations, and nothing else."""

from __future__ import annotations

import pytest

from crishim import ctr
from crishim.cli import build_parser
from crishim.ctr import UsageError, translate

NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # kind load docker-image / image-archive (pkg/cluster/nodeutils LoadImageArchive)
        (
            "--namespace=k8s.io images import --all-platforms --digests --snapshotter=overlayfs -",
            "images import -",
        ),
        # kind load docker-image, re-tagging an image the node has (ReTagImage)
        (
            "--namespace=k8s.io images tag --force sha256:abc docker.io/library/app:1",
            "images tag sha256:abc docker.io/library/app:1",
        ),
        ("-n k8s.io images import /tmp/app.tar", "images import /tmp/app.tar"),
        ("-n k8s.io image import --snapshotter native -", "images import -"),
        ("-n k8s.io i tag a:1 b:1", "images tag a:1 b:1"),
        ("-n k8s.io images ls", "images list"),
        ("--namespace k8s.io images list -q", "images list --quiet"),
        (
            "-a /run/x.sock -n k8s.io images import -",
            "images import --socket /run/x.sock -",
        ),
        (
            "--address=/run/x.sock -n=k8s.io images ls -q",
            "images list --socket /run/x.sock --quiet",
        ),
    ],
)
def test_kinds_invocations_become_crishim_images(argv: str, expected: str) -> None:
    translated = translate(argv.split(), NO_ENV)
    assert translated == expected.split()
    build_parser().parse_args(translated)  # crishim accepts what comes out


def test_namespace_and_address_from_the_environment_as_ctr_reads_them() -> None:
    env = {"CONTAINERD_NAMESPACE": "k8s.io", "CONTAINERD_ADDRESS": "/run/c.sock"}
    assert translate(["images", "import", "-"], env) == [
        "images",
        "import",
        "--socket",
        "/run/c.sock",
        "-",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("images import -", 'namespace "default"'),
        ("-n default images import -", 'namespace "default": this node runs crishim'),
        ("-n k8s.io images import", "give one archive"),
        ("-n k8s.io images import a.tar b.tar", "give one archive"),
        ("-n k8s.io images import --no-unpack -", 'option "--no-unpack" is not supported'),
        (
            "-n k8s.io images import --label=io.cri-containerd.pinned=pinned -",
            'option "--label=io.cri-containerd.pinned=pinned" is not supported',
        ),
        ("-n k8s.io images import --snapshotter", "option --snapshotter needs a value"),
        ("-n k8s.io images tag --force only-one", "usage: images tag"),
        ("-n k8s.io images tag -x a b", "usage: images tag"),
        ("-n k8s.io images rm busybox", '"ctr images rm" is not supported'),
        ("-n k8s.io images ls --format json", "only -q is supported"),
        ("-n k8s.io containers list", '"ctr -n k8s.io containers list" is not supported'),
        ("version", '"ctr version" is not supported'),
        ("--debug -n k8s.io images ls", 'option "--debug" is not supported'),
        ("-n", "option -n needs a value"),
    ],
)
def test_anything_else_is_refused(argv: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        translate(argv.split(), NO_ENV)


def test_refusal_exits_1_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctr.main(["-n", "k8s.io", "snapshots", "ls"]) == 1
    err = capsys.readouterr().err
    assert err.startswith('ctr (crishim): "ctr -n k8s.io snapshots ls" is not supported')


def test_crishim_failure_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status = ctr.main(["-a", "/nonexistent/crishim.sock", "-n", "k8s.io", "images", "ls"])
    assert status == 1
    assert "cannot reach crishim on /nonexistent/crishim.sock" in capsys.readouterr().err
