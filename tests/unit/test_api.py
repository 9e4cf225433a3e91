"""The servicers through real stubs, in memory (grpclib ChannelFor)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from grpclib import GRPCError
from grpclib.const import Cardinality, Status

from crishim.api import v1
from crishim.api.codec import PreEncoded
from crishim.api.encoded import frame_field
from crishim.model import (
    Container,
    ContainerMetadata,
    ContainerState,
    PodMetadata,
    Sandbox,
    SandboxState,
)
from tests.rig.crishim_fixtures import InMemoryApi

IMPLEMENTED = {
    "Version",
    "Status",
    "RuntimeConfig",
    "ListPodSandbox",
    "ListContainers",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "GetContainerEvents",
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "StreamImages",
    "UpdateRuntimeConfig",
    "UpdatePodSandboxResources",
    "Exec",
    "Attach",
    "PortForward",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "PullImage",
    "ImageStatus",
    "ListImages",
    "RemoveImage",
    "ImageFsInfo",
}


def conditions(reply: v1.StatusResponse) -> dict[str, v1.RuntimeCondition]:
    assert reply.status is not None
    return {c.type: c for c in reply.status.conditions}


async def test_version_names_crishim_and_cri_v1(api: InMemoryApi) -> None:
    reply = await api.client.runtime.version(v1.VersionRequest(version="0.1.0"))
    assert reply.runtime_name == "crishim"
    assert reply.runtime_api_version == "v1"
    assert reply.version == "0.1.0"
    assert reply.runtime_version


async def test_network_not_ready_without_cni_config(api: InMemoryApi) -> None:
    assert not api.config.cni.default_network.enabled  # the fixture turns it off
    reply = await api.client.runtime.status(v1.StatusRequest())
    network = conditions(reply)["NetworkReady"]
    assert network.status is False
    assert network.reason == "NetworkPluginNotReady"
    assert api.config.cni.conf_dir in network.message


async def test_network_ready_on_the_default_network_while_the_conf_dir_is_empty(
    api: InMemoryApi, tmp_path: Path
) -> None:
    bindir = tmp_path / "cnibin"
    bindir.mkdir()
    for plugin in ("bridge", "host-local", "portmap"):
        (bindir / plugin).write_text("#!/bin/sh\n")
        os.chmod(bindir / plugin, 0o755)
    api.config.cni.bin_dirs = [str(bindir)]
    api.config.cni.default_network.enabled = True
    api.config.cni.default_network.subnet = "10.86.9.0/24"
    api.config.cni.default_network.bridge = "crishim-x9"
    network = conditions(await api.client.runtime.status(v1.StatusRequest()))["NetworkReady"]
    assert network.status is True
    assert network.reason == "DefaultNetworkInUse"
    assert "built-in default network 'crishim-default'" in network.message
    assert "crishim-x9" in network.message
    assert "10.86.9.0/24" in network.message
    assert api.config.cni.conf_dir in network.message
    verbose = await api.client.runtime.status(v1.StatusRequest(verbose=True))
    cni = json.loads(verbose.info["cni"])
    assert cni["config"] == "built-in default"
    assert cni["conflist"]["plugins"][0]["bridge"] == "crishim-x9"

    os.remove(bindir / "host-local")
    network = conditions(await api.client.runtime.status(v1.StatusRequest()))["NetworkReady"]
    assert (network.status, network.reason) == (False, "NetworkPluginNotReady")
    assert "host-local of built-in default not found" in network.message

    # A network plugin writes its config: it serves at once, with no word of the default.
    conf = {"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "bridge"}]}
    (Path(api.config.cni.conf_dir) / "10-t.conflist").write_text(json.dumps(conf))
    network = conditions(await api.client.runtime.status(v1.StatusRequest()))["NetworkReady"]
    assert (network.status, network.reason, network.message) == (True, "", "")


async def test_network_ready_with_config_and_plugins(api: InMemoryApi, tmp_path: Path) -> None:
    bindir = tmp_path / "cnibin"
    bindir.mkdir()
    for plugin in ("bridge", "portmap"):
        (bindir / plugin).write_text("#!/bin/sh\n")
        os.chmod(bindir / plugin, 0o755)
    api.config.cni.bin_dirs = [str(bindir)]
    conf = {
        "cniVersion": "1.0.0",
        "name": "t",
        "plugins": [{"type": "bridge"}, {"type": "portmap"}],
    }
    (Path(api.config.cni.conf_dir) / "10-t.conflist").write_text(json.dumps(conf))
    assert conditions(await api.client.runtime.status(v1.StatusRequest()))["NetworkReady"].status
    os.remove(bindir / "portmap")
    network = conditions(await api.client.runtime.status(v1.StatusRequest()))["NetworkReady"]
    assert not network.status
    assert "portmap" in network.message


async def test_runtime_not_ready_when_the_default_runtime_is_missing(api: InMemoryApi) -> None:
    api.config.runtimes["runc"].path = "/nonexistent/runc"
    runtime = conditions(await api.client.runtime.status(v1.StatusRequest()))["RuntimeReady"]
    assert runtime.status is False
    assert runtime.reason == "RuntimeBinaryNotFound"
    assert "/nonexistent/runc" in runtime.message


async def test_status_lists_handlers_and_verbose_info(api: InMemoryApi) -> None:
    reply = await api.client.runtime.status(v1.StatusRequest(verbose=True))
    assert [h.name for h in reply.runtime_handlers] == ["", "runc", "crun"]
    assert json.loads(reply.info["config"])["root"] == api.config.root
    assert set(json.loads(reply.info["binaries"])) == {"runc", "crun", "conmon"}
    quiet = await api.client.runtime.status(v1.StatusRequest(verbose=False))
    assert quiet.info == {}


@pytest.mark.parametrize(
    ("driver", "expected"),
    [("cgroupfs", v1.CgroupDriver.CGROUPFS), ("systemd", v1.CgroupDriver.SYSTEMD)],
)
async def test_runtime_config_reports_the_cgroup_driver(
    api: InMemoryApi, driver: str, expected: v1.CgroupDriver
) -> None:
    api.config.cgroup_driver = driver  # type: ignore[assignment]
    reply = await api.client.runtime.runtime_config(v1.RuntimeConfigRequest())
    assert reply.linux is not None
    assert reply.linux.cgroup_driver is expected


def all_rpcs() -> list[tuple[str, type, type, Cardinality]]:
    found = []
    bases: list[Any] = [v1.RuntimeServiceBase(), v1.ImageServiceBase()]
    for base in bases:
        for path, handler in base.__mapping__().items():
            found.append((path, handler.request_type, handler.reply_type, handler.cardinality))
    return found


def test_every_rpc_of_the_schema_is_served(api: InMemoryApi) -> None:
    schema = (Path(__file__).parents[2] / "protos" / "runtime" / "v1" / "api.proto").read_text()
    declared = set(re.findall(r"^\s+rpc (\w+)\(", schema, re.MULTILINE))
    served = {path.rsplit("/", 1)[1] for path, *_ in all_rpcs()}
    assert served == declared
    assert len(declared) == 41


@pytest.mark.parametrize(
    ("path", "request_type", "reply_type", "cardinality"),
    [r for r in all_rpcs() if r[0].rsplit("/", 1)[1] not in IMPLEMENTED],
    ids=lambda v: v.rsplit("/", 1)[1] if isinstance(v, str) else "",
)
async def test_unimplemented_rpcs_say_which(
    api: InMemoryApi, path: str, request_type: type, reply_type: type, cardinality: Cardinality
) -> None:
    stream: Any
    async with api.client.channel.request(path, cardinality, request_type, reply_type) as stream:
        await stream.send_message(request_type(), end=True)
        with pytest.raises(GRPCError) as info:
            await stream.recv_message()
    name = path.rsplit("/", 1)[1]
    assert info.value.status is Status.UNIMPLEMENTED
    assert info.value.message == f"{name} is not implemented by crishim yet"


async def seed(api: InMemoryApi) -> None:
    for i, state in enumerate([SandboxState.READY, SandboxState.NOTREADY]):
        await api.stores.sandboxes.add(
            Sandbox(
                id=f"sb{i}",
                metadata=PodMetadata(name=f"pod{i}", uid=f"u{i}", namespace="ns"),
                state=state,
                created_at=100 + i,
                labels={"app": f"a{i}"},
                annotations={"note": "x"},
                runtime_handler="crun" if i else "",
            )
        )
    container_states = [ContainerState.RUNNING, ContainerState.EXITED, ContainerState.CREATED]
    for i, container_state in enumerate(container_states):
        await api.stores.containers.add(
            Container(
                id=f"ct{i}",
                sandbox_id=f"sb{i % 2}",
                metadata=ContainerMetadata(name=f"c{i}", attempt=i),
                image="sha256:" + "1" * 64,
                user_specified_image="busybox",
                image_ref="ref",
                image_id="sha256:" + "1" * 64,
                state=container_state,
                created_at=200 - i,
                labels={"tier": str(i)},
            )
        )


async def test_list_pod_sandbox_with_filters(api: InMemoryApi) -> None:
    await seed(api)
    runtime = api.client.runtime
    every = await runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
    assert [s.id for s in every.items] == ["sb0", "sb1"]
    first = every.items[0]
    assert first.metadata == v1.PodSandboxMetadata(name="pod0", uid="u0", namespace="ns", attempt=0)
    assert first.state is v1.PodSandboxState.SANDBOX_READY
    assert first.labels == {"app": "a0"}
    assert first.annotations == {"note": "x"}
    assert every.items[1].runtime_handler == "crun"
    by_state = await runtime.list_pod_sandbox(
        v1.ListPodSandboxRequest(
            filter=v1.PodSandboxFilter(
                state=v1.PodSandboxStateValue(state=v1.PodSandboxState.SANDBOX_NOTREADY)
            )
        )
    )
    assert [s.id for s in by_state.items] == ["sb1"]
    by_label = await runtime.list_pod_sandbox(
        v1.ListPodSandboxRequest(filter=v1.PodSandboxFilter(label_selector={"app": "a0"}))
    )
    assert [s.id for s in by_label.items] == ["sb0"]


async def test_list_containers_with_filters_sees_updates(api: InMemoryApi) -> None:
    await seed(api)
    runtime = api.client.runtime
    every = await runtime.list_containers(v1.ListContainersRequest())
    assert [c.id for c in every.containers] == ["ct2", "ct1", "ct0"]  # oldest first
    ct0 = every.containers[-1]
    assert ct0.pod_sandbox_id == "sb0"
    assert ct0.image == v1.ImageSpec(image="sha256:" + "1" * 64, user_specified_image="busybox")
    assert ct0.state is v1.ContainerState.CONTAINER_RUNNING
    in_sb0 = await runtime.list_containers(
        v1.ListContainersRequest(filter=v1.ContainerFilter(pod_sandbox_id="sb0"))
    )
    assert [c.id for c in in_sb0.containers] == ["ct2", "ct0"]
    await api.stores.containers.update(
        "ct0", lambda c: c.model_copy(update={"state": ContainerState.EXITED})
    )
    exited = await runtime.list_containers(
        v1.ListContainersRequest(
            filter=v1.ContainerFilter(
                state=v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_EXITED)
            )
        )
    )
    assert sorted(c.id for c in exited.containers) == ["ct0", "ct1"]


async def test_unknown_filter_state_is_invalid_argument(api: InMemoryApi) -> None:
    # ListContainersRequest{filter{state{state: 99}}}, which betterproto2 cannot build.
    raw = frame_field(1, frame_field(2, bytes([0x08, 99])))
    with pytest.raises(GRPCError) as info:
        await api.client.runtime.list_containers(PreEncoded(raw))  # type: ignore[arg-type]
    assert info.value.status is Status.INVALID_ARGUMENT
    assert "filter.state" in (info.value.message or "")


async def test_a_failed_rpc_is_logged_once_with_status_and_message(
    api: InMemoryApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="crishim.rpc")
    with pytest.raises(GRPCError):
        await api.client.runtime.checkpoint_container(v1.CheckpointContainerRequest())
    await api.client.runtime.version(v1.VersionRequest())
    lines = [r.getMessage() for r in caplog.records if r.name == "crishim.rpc"]
    failed = [line for line in lines if "failed" in line]
    assert len(failed) == 1
    assert failed[0].startswith(
        "CheckpointContainer failed: UNIMPLEMENTED "
        "CheckpointContainer is not implemented by crishim yet"
    )
    assert any(line.startswith("Version OK ") and line.endswith(" ms") for line in lines)


async def test_draining_refuses_new_calls(api: InMemoryApi) -> None:
    assert await api.tracker.drain(1.0)
    with pytest.raises(GRPCError) as info:
        await api.client.runtime.version(v1.VersionRequest())
    assert info.value.status is Status.UNAVAILABLE
    assert info.value.message == "crishim is shutting down"


async def test_streamed_lists_match_their_unary_twins(api: InMemoryApi) -> None:
    await seed(api)
    runtime = api.client.runtime
    unary = await runtime.list_containers(v1.ListContainersRequest())
    streamed = [
        c.id
        async for reply in runtime.stream_containers(v1.StreamContainersRequest())
        for c in reply.containers
    ]
    assert streamed == [c.id for c in unary.containers]
    pods = [
        s.id
        async for reply in runtime.stream_pod_sandboxes(
            v1.StreamPodSandboxesRequest(filter=v1.PodSandboxFilter(label_selector={"app": "a1"}))
        )
        for s in reply.pod_sandboxes
    ]
    assert pods == ["sb1"]
    images = [r async for r in api.client.images.stream_images(v1.StreamImagesRequest())]
    assert images == []


async def test_update_runtime_config_checks_the_pod_cidr(api: InMemoryApi) -> None:
    runtime = api.client.runtime
    good = v1.RuntimeConfig(network_config=v1.NetworkConfig(pod_cidr="10.244.1.0/24"))
    await runtime.update_runtime_config(v1.UpdateRuntimeConfigRequest(runtime_config=good))
    bad = v1.RuntimeConfig(network_config=v1.NetworkConfig(pod_cidr="not-a-cidr"))
    with pytest.raises(GRPCError) as info:
        await runtime.update_runtime_config(v1.UpdateRuntimeConfigRequest(runtime_config=bad))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert "pod CIDR 'not-a-cidr' is not a network" in (info.value.message or "")


async def test_update_pod_sandbox_resources_needs_a_cgroup_parent(api: InMemoryApi) -> None:
    await seed(api)
    request = v1.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id="sb0", resources=v1.LinuxContainerResources(cpu_shares=512)
    )
    with pytest.raises(GRPCError) as info:
        await api.client.runtime.update_pod_sandbox_resources(request)
    assert info.value.status is Status.FAILED_PRECONDITION
    assert "no cgroup parent" in (info.value.message or "")
    missing = v1.UpdatePodSandboxResourcesRequest(pod_sandbox_id="nope")
    with pytest.raises(GRPCError) as info:
        await api.client.runtime.update_pod_sandbox_resources(missing)
    assert info.value.status is Status.NOT_FOUND


async def test_streaming_calls_need_the_streaming_server(api: InMemoryApi) -> None:
    with pytest.raises(GRPCError) as info:
        await api.client.runtime.exec(v1.ExecRequest(container_id="x", cmd=["true"]))
    assert info.value.status is Status.UNAVAILABLE
    assert info.value.message == "the streaming server is not running"


async def test_concurrent_removals_of_one_container_all_succeed(api: InMemoryApi) -> None:
    """kubelet's container garbage collector and its pod cleanup can remove the same
    container at once; RemoveContainer and StopContainer of a gone container are no-ops."""
    await seed(api)
    runtime = api.client.runtime
    remove = v1.RemoveContainerRequest(container_id="ct1")
    stop = v1.StopContainerRequest(container_id="ct1", timeout=0)
    await asyncio.gather(
        runtime.remove_container(remove),
        runtime.remove_container(remove),
        runtime.stop_container(stop),
    )
    listed = await runtime.list_containers(v1.ListContainersRequest())
    assert [c.id for c in listed.containers] == ["ct2", "ct0"]


async def test_image_status_and_list_answer_from_encoded_images_and_follow_changes(
    api: InMemoryApi,
) -> None:
    """ImageStatus and ListImages reply with each image's kept encoding: the same bytes as
    encoding the reply whole, and a changed image (a new tag) is encoded anew."""
    from crishim.api import convert
    from crishim.model import Image

    images = []
    for n in range(3):
        image = Image(
            id="sha256:" + f"{n}" * 64,
            repo_tags=[f"example.org/app{n}:1"],
            repo_digests=[f"example.org/app{n}@sha256:" + "f" * 64],
            size=1000 + n,
            manifest_digest="sha256:" + "e" * 64,
            user="1000" if n else "nobody",
            pulled_at=n,
        )
        images.append(await api.stores.images.add(image))
    client = api.client.images
    for _ in range(2):  # the second time from the kept encodings
        listed = await client.list_images(v1.ListImagesRequest())
        assert listed == v1.ListImagesResponse(images=[convert.image(i) for i in images])
        status = await client.image_status(
            v1.ImageStatusRequest(image=v1.ImageSpec(image="example.org/app1:1"))
        )
        assert status == v1.ImageStatusResponse(image=convert.image(images[1]))
    missing = await client.image_status(v1.ImageStatusRequest(image=v1.ImageSpec(image="nope")))
    assert missing.image is None
    retagged = await api.stores.images.update(
        images[1].id,
        lambda i: i.model_copy(update={"repo_tags": [*i.repo_tags, "example.org/b:2"]}),
    )
    status = await client.image_status(
        v1.ImageStatusRequest(image=v1.ImageSpec(image="example.org/b:2"))
    )
    assert status.image is not None
    assert status.image.repo_tags == ["example.org/app1:1", "example.org/b:2"] == retagged.repo_tags
    listed = await client.list_images(
        v1.ListImagesRequest(filter=v1.ImageFilter(image=v1.ImageSpec(image="example.org/b:2")))
    )
    assert [i.repo_tags for i in listed.images] == [retagged.repo_tags]
    # removed, then back (pulled again under another name): same id, revision 0 again
    await api.stores.images.delete(images[0].id)
    back = images[0].model_copy(update={"repo_tags": ["example.org/again:3"]})
    await api.stores.images.add(back)
    status = await client.image_status(
        v1.ImageStatusRequest(image=v1.ImageSpec(image="example.org/again:3"))
    )
    assert status.image is not None
    assert status.image.repo_tags == ["example.org/again:3"]
    listed = await client.list_images(v1.ListImagesRequest())
    assert ["example.org/again:3"] in [i.repo_tags for i in listed.images]


async def test_status_replies_from_kept_encodings_equal_encoding_them_whole(
    api: InMemoryApi,
) -> None:
    """ContainerStatus and PodSandboxStatus answer from each record's kept encoding: the
    reply is what encoding it whole gives (PodSandboxStatus' timestamp aside), the pod's
    containers newest first, and a changed record is encoded anew."""
    from crishim.api import convert

    await seed(api)
    runtime = api.client.runtime
    for _ in range(2):  # the second time from the kept encodings
        for container in api.stores.containers.list():
            reply = await runtime.container_status(
                v1.ContainerStatusRequest(container_id=container.id)
            )
            assert reply == v1.ContainerStatusResponse(status=convert.container_status(container))
        sandbox = api.stores.sandboxes.get("sb0")
        before = time.time_ns()
        pod = await runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id="sb0"))
        members = [c for c in api.stores.containers.list() if c.sandbox_id == "sb0"]
        assert len(members) == 2
        assert before <= pod.timestamp <= time.time_ns()
        assert pod == v1.PodSandboxStatusResponse(
            status=convert.pod_sandbox_status(sandbox),
            containers_statuses=convert.container_statuses(members),
            timestamp=pod.timestamp,
        )
        assert [s.id for s in pod.containers_statuses] == ["ct0", "ct2"]  # newest first
    await api.stores.containers.update(
        "ct0",
        lambda c: c.model_copy(update={"state": ContainerState.EXITED, "exit_code": 7}),
    )
    reply = await runtime.container_status(v1.ContainerStatusRequest(container_id="ct0"))
    assert reply.status is not None
    assert (reply.status.state, reply.status.exit_code) == (
        v1.ContainerState.CONTAINER_EXITED,
        7,
    )
    pod = await runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id="sb0"))
    assert pod.containers_statuses[0].exit_code == 7
    verbose = await runtime.container_status(
        v1.ContainerStatusRequest(container_id="ct0", verbose=True)
    )
    assert "sandboxID" in verbose.info["info"]
    with pytest.raises(GRPCError) as info:
        await runtime.container_status(v1.ContainerStatusRequest(container_id="nope"))
    assert info.value.status is Status.NOT_FOUND
