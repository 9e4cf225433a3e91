"""What kubelet's evented PLEG reads, through the real servicers in memory (ChannelFor).

With the EventedPLEG gate kubelet takes a pod's containers from PodSandboxStatus'
``containers_statuses`` whenever ``timestamp`` is set, and caches them under that time in
nanoseconds (kuberuntime_manager.go GetPodStatus); each GetContainerEvents reply replaces
the cached pod with its ``pod_sandbox_status`` and ``containers_statuses`` under
``created_at`` (pleg/evented.go), and a CONTAINER_DELETED_EVENT whose container id is the
sandbox's drops the pod from the cache, but only when ``pod_sandbox_status`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import Queue
from collections.abc import AsyncIterator

import pytest

from crishim.api import convert, v1
from crishim.model import (
    Container,
    ContainerMetadata,
    ContainerState,
    PodMetadata,
    Sandbox,
    SandboxState,
)
from crishim.model.events import EventType
from tests.rig.crishim_fixtures import InMemoryApi

IMAGE_ID = "sha256:" + "1" * 64
MOUNTS = [
    {
        "container_path": "/dev/termination-log",
        "host_path": "/var/lib/kubelet/pods/u0/containers/app/1234",
        "propagation": 0,
    },
    {
        "container_path": "/data",
        "host_path": "/srv/data",
        "readonly": True,
        "selinux_relabel": True,
        "propagation": 2,
        "recursive_read_only": True,
    },
    {
        "container_path": "/models",
        "image": {"image": IMAGE_ID, "user_specified_image": "models:v1"},
        "image_sub_path": "weights",
    },
]


def sandbox(sandbox_id: str, uid: str) -> Sandbox:
    return Sandbox(
        id=sandbox_id,
        metadata=PodMetadata(name=f"pod-{uid}", uid=uid, namespace="ns", attempt=1),
        state=SandboxState.READY,
        created_at=100,
        ips=["10.88.0.7"],
        labels={"io.kubernetes.pod.uid": uid},
    )


def container(container_id: str, sandbox_id: str, created_at: int, **extra: object) -> Container:
    values: dict[str, object] = {
        "id": container_id,
        "sandbox_id": sandbox_id,
        "metadata": ContainerMetadata(name=container_id, attempt=2),
        "image": IMAGE_ID,
        "user_specified_image": "busybox",
        "image_ref": "registry/busybox@sha256:" + "2" * 64,
        "image_id": IMAGE_ID,
        "state": ContainerState.RUNNING,
        "created_at": created_at,
        "started_at": created_at + 1,
        "labels": {"io.kubernetes.container.name": container_id},
        "annotations": {"io.kubernetes.container.restartCount": "2"},
        "log_path": f"/logs/{container_id}.log",
        "config": {"mounts": MOUNTS},
        **extra,
    }
    return Container.model_validate(values)


async def seed(api: InMemoryApi) -> None:
    """Pod sb0 with an exited init container and two running ones; pod sb1 with one."""
    await api.stores.sandboxes.add(sandbox("sb0", "u0"))
    await api.stores.sandboxes.add(sandbox("sb1", "u1"))
    init = {"state": ContainerState.EXITED, "exit_code": 0, "reason": "Completed"}
    await api.stores.containers.add(container("init", "sb0", 200, finished_at=260, **init))
    await api.stores.containers.add(container("app", "sb0", 300, stop_signal="SIGRTMIN+3"))
    await api.stores.containers.add(container("side", "sb0", 250, stop_signal="SIGQUIT"))
    await api.stores.containers.add(container("other", "sb1", 220))


async def status_of(api: InMemoryApi, container_id: str) -> v1.ContainerStatus:
    reply = await api.client.runtime.container_status(
        v1.ContainerStatusRequest(container_id=container_id)
    )
    assert reply.status is not None
    return reply.status


async def test_pod_sandbox_status_lists_every_container_as_container_status_does(
    api: InMemoryApi,
) -> None:
    await seed(api)
    reply = await api.client.runtime.pod_sandbox_status(
        v1.PodSandboxStatusRequest(pod_sandbox_id="sb0")
    )
    # Only this sandbox's containers, newest first: kubelet does not sort this list and
    # takes the first container of a name for the current one (its restart count too).
    assert [s.id for s in reply.containers_statuses] == ["app", "side", "init"]
    for listed in reply.containers_statuses:
        assert listed == await status_of(api, listed.id)


async def test_pod_sandbox_status_timestamp_is_when_it_was_read_in_nanoseconds(
    api: InMemoryApi,
) -> None:
    await seed(api)
    before = time.time_ns()
    reply = await api.client.runtime.pod_sandbox_status(
        v1.PodSandboxStatusRequest(pod_sandbox_id="sb1")
    )
    after = time.time_ns()
    assert before <= reply.timestamp <= after
    assert [s.id for s in reply.containers_statuses] == ["other"]


async def test_container_status_reports_its_mounts(api: InMemoryApi) -> None:
    """kubelet reads the termination message from the host file of the mount at
    terminationMessagePath (kuberuntime_container.go getTerminationMessage)."""
    await seed(api)
    status = await status_of(api, "init")
    assert status.mounts == [
        v1.Mount(
            container_path="/dev/termination-log",
            host_path="/var/lib/kubelet/pods/u0/containers/app/1234",
            propagation=v1.MountPropagation.PROPAGATION_PRIVATE,
        ),
        v1.Mount(
            container_path="/data",
            host_path="/srv/data",
            readonly=True,
            selinux_relabel=True,
            propagation=v1.MountPropagation.PROPAGATION_BIDIRECTIONAL,
            recursive_read_only=True,
        ),
        v1.Mount(
            container_path="/models",
            image=v1.ImageSpec(image=IMAGE_ID, user_specified_image="models:v1"),
            image_sub_path="weights",
        ),
    ]


async def test_container_status_reports_the_effective_stop_signal(api: InMemoryApi) -> None:
    await seed(api)
    assert (await status_of(api, "app")).stop_signal is v1.Signal.SIGRTMINPLUS3
    assert (await status_of(api, "side")).stop_signal is v1.Signal.SIGQUIT
    assert (await status_of(api, "init")).stop_signal is v1.Signal.SIGTERM  # none named


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", v1.Signal.SIGTERM),
        ("SIGKILL", v1.Signal.SIGKILL),
        ("TERM", v1.Signal.SIGTERM),
        ("sigusr1", v1.Signal.SIGUSR1),
        ("15", v1.Signal.SIGTERM),
        ("SIGRTMIN+3", v1.Signal.SIGRTMINPLUS3),
        ("SIGRTMAX-2", v1.Signal.SIGRTMAXMINUS2),
        ("SIGBOGUS", v1.Signal.RUNTIME_DEFAULT),
        ("99", v1.Signal.RUNTIME_DEFAULT),
    ],
)
def test_stop_signal_names_map_to_the_cri_enum(name: str, expected: v1.Signal) -> None:
    assert convert.status_stop_signal(name) is expected


@contextlib.asynccontextmanager
async def container_events(api: InMemoryApi) -> AsyncIterator[Queue[v1.ContainerEventResponse]]:
    """GetContainerEvents' replies, from once the stream is open."""
    received: Queue[v1.ContainerEventResponse] = Queue()

    async def listen() -> None:
        async for event in api.client.runtime.get_container_events(v1.GetEventsRequest()):
            received.put_nowait(event)

    listener = asyncio.create_task(listen())
    for _ in range(200):
        if api.services.containers.events.subscribers:
            break
        await asyncio.sleep(0.01)
    try:
        yield received
    finally:
        listener.cancel()


async def next_event(stream: Queue[v1.ContainerEventResponse]) -> v1.ContainerEventResponse:
    return await asyncio.wait_for(stream.get(), 2)


async def test_events_carry_the_pod_as_it_was_when_they_happened(api: InMemoryApi) -> None:
    await seed(api)
    bus = api.services.containers.events
    async with container_events(api) as received:
        before = time.time_ns()
        bus.publish("app", "sb0", EventType.STARTED)
        after = time.time_ns()
        running = [await status_of(api, c) for c in ("app", "side", "init")]
        await api.stores.containers.update(
            "app",
            lambda c: c.model_copy(
                update={"state": ContainerState.EXITED, "exit_code": 2, "reason": "Error"}
            ),
        )
        bus.publish("app", "sb0", EventType.STOPPED)
        exited = [await status_of(api, c) for c in ("app", "side", "init")]

        started = await next_event(received)
        assert started.container_id == "app"
        assert started.container_event_type is v1.ContainerEventType.CONTAINER_STARTED_EVENT
        assert before <= started.created_at <= after
        assert started.pod_sandbox_status is not None
        assert started.pod_sandbox_status.metadata == v1.PodSandboxMetadata(
            name="pod-u0", uid="u0", namespace="ns", attempt=1
        )
        # The state at the event, with every field ContainerStatus has (mounts too),
        # though the container exited before the reply was sent.
        assert started.containers_statuses == running
        stopped = await next_event(received)
        assert stopped.containers_statuses == exited
        assert stopped.created_at > started.created_at


async def test_removing_a_sandbox_is_an_event_with_its_last_status(api: InMemoryApi) -> None:
    """Without ``pod_sandbox_status`` kubelet ignores the event and keeps the pod cached."""
    await api.stores.sandboxes.add(sandbox("lonely", "u9"))
    async with container_events(api) as received:
        runtime = api.client.runtime
        await runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id="lonely"))
        await runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id="lonely"))
        stopped = await next_event(received)
        deleted = await next_event(received)
    kinds = v1.ContainerEventType
    assert (stopped.container_id, stopped.container_event_type) == (
        "lonely",
        kinds.CONTAINER_STOPPED_EVENT,
    )
    assert stopped.pod_sandbox_status is not None
    assert stopped.pod_sandbox_status.state is v1.PodSandboxState.SANDBOX_NOTREADY
    assert (deleted.container_id, deleted.container_event_type) == (
        "lonely",
        kinds.CONTAINER_DELETED_EVENT,
    )
    assert deleted.pod_sandbox_status is not None
    assert deleted.pod_sandbox_status.id == "lonely"
    assert deleted.pod_sandbox_status.metadata is not None
    assert deleted.pod_sandbox_status.metadata.uid == "u9"
    assert deleted.containers_statuses == []
