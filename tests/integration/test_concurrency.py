"""Many pods at once, as on a real node: the calls of dozens of pods interleave.

crishim runs here under the fd canary (``FD_CANARY``: threads inside crishim's process
that keep opening, writing and checking files of their own, see tests/rig/fd_canary.py),
so a descriptor closed by a part of crishim that does not own it fails the test even when
no CRI call happens to trip over it. Each burst checks that every call succeeded, that the
canaries ran and found nothing, and (the ``rig`` fixture) that nothing is left behind:
pods, containers, conmons, CNI leases and cache, mounts, namespace pins, cgroups, state
directories, snapshots.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest

from crishim.api import v1
from tests.integration.test_streaming_server import ws_collect, ws_connect, ws_url
from tests.rig.pods import (
    PodRig,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

FD_CANARY = True
SLEEP = ["sleep", "1000"]
# A burst that hangs fails instead of stalling the suite (seconds; a burst takes ~30).
BURST_TIMEOUT = 300


def assert_canaries_clean(rig: PodRig) -> None:
    findings, rounds = rig.proc.canary_findings()
    assert rounds > 0, "the fd canaries inside crishim never ran"
    assert findings == [], f"descriptors closed under their owner: {findings}{rig.log_tail()}"


def failures(results: Sequence[object]) -> list[str]:
    return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]


async def tty_exec(rig: PodRig, cid: str, text: str) -> bytes:
    """An interactive exec on a terminal through the streaming server: what it echoed."""
    reply = await rig.runtime.exec(
        v1.ExecRequest(container_id=cid, cmd=["cat"], tty=True, stdin=True, stdout=True)
    )
    async with ws_connect(ws_url(reply.url)) as client:
        await client.send(b"\x00" + text.encode() + b"\n\x04")
        channels = await asyncio.wait_for(ws_collect(client), 60)
    return channels.get(1, b"")


async def pod_lifecycle(rig: PodRig, index: int, *, host_network: bool) -> None:
    """Everything kubelet does to one pod, from RunPodSandbox to RemovePodSandbox."""
    network = v1.NamespaceMode.NODE if host_network else v1.NamespaceMode.POD
    pod = await rig.run_pod(f"burst-{index}", network=network)
    cid = await rig.start_container(pod, "main", SLEEP)
    for round_ in range(2):
        said = await rig.exec_out(cid, "echo", f"pod {index} round {round_}")
        assert said == f"pod {index} round {round_}\n"
    echoed = await tty_exec(rig, cid, f"typed into {index}")
    assert f"typed into {index}".encode() in echoed, echoed
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=0))
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))


async def test_concurrent_pods_never_close_each_others_descriptors(rig: PodRig) -> None:
    # Host-network pods are the quickest, so their calls interleave the most; pods on the
    # CNI network add plugins, namespaces and their descriptors to the mix.
    results = await asyncio.wait_for(
        asyncio.gather(
            *(pod_lifecycle(rig, i, host_network=i % 2 == 0) for i in range(30)),
            return_exceptions=True,
        ),
        BURST_TIMEOUT,
    )
    assert failures(results) == [], rig.log_tail()
    assert_canaries_clean(rig)


async def test_fifty_pods_start_exec_and_go_at_once(rig: PodRig) -> None:
    count = 50
    began = time.monotonic()
    pods = await asyncio.gather(*(rig.run_pod(f"fifty-{i}") for i in range(count)))
    containers = await asyncio.gather(*(rig.start_container(p, "main", SLEEP) for p in pods))
    all_running = time.monotonic() - began
    states = await asyncio.gather(*(rig.status(c) for c in containers))
    assert {s.state for s in states} == {v1.ContainerState.CONTAINER_RUNNING}
    ips = [(await rig.pod_status(p)).network.ip for p in pods]  # type: ignore[union-attr]
    assert len(set(ips)) == count, ips
    said = await asyncio.gather(
        *(rig.exec_out(c, "cat", "/etc/hostname") for c in containers), return_exceptions=True
    )
    assert failures(said) == [], rig.log_tail()
    assert said == [f"fifty-{i}\n" for i in range(count)]
    torn = await asyncio.gather(
        *(
            rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=p))
            for p in pods
        ),
        return_exceptions=True,
    )
    assert failures(torn) == [], rig.log_tail()
    assert (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items == []
    assert_canaries_clean(rig)
    print(
        json.dumps({"runtime": rig.runtime_name, "pods": count, "all_running_seconds": all_running})
    )


async def test_kill_9_in_the_middle_of_a_burst_leaves_every_pod_whole_or_removable(
    rig: PodRig,
) -> None:
    async def start_pod(index: int) -> None:
        pod = await rig.run_pod(f"crash-{index}")
        await rig.start_container(pod, "main", SLEEP)

    burst = [asyncio.create_task(start_pod(i)) for i in range(30)]
    # The first pod done means the other 29 are somewhere in the middle of their calls.
    await asyncio.wait(burst, return_when=asyncio.FIRST_COMPLETED, timeout=BURST_TIMEOUT)
    await rig.restart(kill=True)
    outcomes = await asyncio.gather(*burst, return_exceptions=True)
    interrupted = failures(outcomes)
    assert interrupted, "every pod was done before the kill: it hit nothing in flight"

    # Whatever crishim still reports is whole: ready pods take new containers and run them,
    # running containers answer exec.
    pods = (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items
    ready = [p.id for p in pods if p.state == v1.PodSandboxState.SANDBOX_READY]
    assert ready, "no pod survived the crash whole"
    probes = await asyncio.gather(*(rig.start_container(p, "probe", SLEEP) for p in ready))
    containers = (await rig.runtime.list_containers(v1.ListContainersRequest())).containers
    running = [c.id for c in containers if c.state == v1.ContainerState.CONTAINER_RUNNING]
    assert set(probes) <= set(running)
    said = await asyncio.gather(*(rig.exec_out(c, "echo", "whole") for c in running))
    assert set(said) == {"whole\n"}
    # ... and everything is removable, leaving nothing behind.
    removed = await asyncio.gather(
        *(
            rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=p.id))
            for p in pods
        ),
        return_exceptions=True,
    )
    assert failures(removed) == [], rig.log_tail()
    await rig.assert_nothing_left()
    assert_canaries_clean(rig)
