"""kill -9 of crishim at every step of a pod's life, then a restart (root).

One pod goes through everything kubelet does to it (run, create, start, exec, stop,
remove, stop and remove the pod) while crishim is killed after a delay; the delays step
through the whole sequence, so each kill lands in a different call. After the restart
whatever crishim reports must be whole (a ready pod runs a new container, a running
container answers exec) or removable, and once removed nothing may be left (the ``rig``
fixture checks: conmons, mounts, pins, leases, cgroups, state files, snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from crishim.api import v1
from tests.rig.pods import (
    PodRig,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

SLEEP = ["sleep", "1000"]
# Seconds after the first call at which crishim is killed: together they cover a lifecycle
# (about 0.3-0.6 s here), from inside RunPodSandbox to inside RemovePodSandbox.
KILL_AFTER = [0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7]


async def everything_kubelet_does(rig: PodRig, name: str) -> None:
    pod = await rig.run_pod(name)
    cid = await rig.create_container(pod, "main", SLEEP)
    await rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
    await rig.exec_out(cid, "true")
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=0))
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))


async def check_whole_or_removable(rig: PodRig) -> None:
    pods = (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items
    for pod in pods:
        if pod.state == v1.PodSandboxState.SANDBOX_READY:
            probe = await rig.start_container(pod.id, "probe", SLEEP)
            assert (await rig.exec_out(probe, "echo", "ok")) == "ok\n"
    containers = (await rig.runtime.list_containers(v1.ListContainersRequest())).containers
    for container in containers:
        if container.state == v1.ContainerState.CONTAINER_RUNNING:
            assert (await rig.exec_out(container.id, "echo", "ok")) == "ok\n"
        elif container.state == v1.ContainerState.CONTAINER_CREATED:
            # A create that happened before the kill can still be started.
            await rig.runtime.start_container(v1.StartContainerRequest(container_id=container.id))
            assert (await rig.exec_out(container.id, "echo", "ok")) == "ok\n"
    for pod in pods:
        await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    await rig.assert_nothing_left()


@pytest.mark.parametrize("delay", KILL_AFTER)
async def test_kill_9_at_this_moment_of_a_pods_life(rig: PodRig, delay: float) -> None:
    life = asyncio.create_task(everything_kubelet_does(rig, f"crash-{int(delay * 1000)}"))
    await asyncio.sleep(delay)
    await rig.restart(kill=True)
    with contextlib.suppress(Exception):
        await life  # the calls in flight failed with the connection, or all finished first
    await check_whole_or_removable(rig)
