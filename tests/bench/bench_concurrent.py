"""Benchmark: N pods started at once, crishim against containerd, side by side.

Like a node given N new pods at once: N clients each run a pod on the CNI network
(RunPodSandbox, CreateContainer, StartContainer of a busybox sleeping), all at the same
time; the time until every container runs is measured, then the time until every pod is
stopped and removed (again all at once). The runtimes alternate round by round in one run;
only their ratio counts.

Run: ``python -m tests.bench.bench_concurrent [--pods 30 100] [--rounds 2] [--runtime runc]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.runtimes import Containerd, Crishim, push_images
from tests.rig.registry import Registry

Runtime = Crishim | Containerd


def pod_config(name: str, logs: Path, cgroups: str = "") -> v1.PodSandboxConfig:
    """A pod as kubelet sends it; with ``cgroups``, its cgroup parent is a pod cgroup
    below that (as kubelet's are below kubepods)."""
    uid = str(uuid.uuid4())
    return v1.PodSandboxConfig(
        metadata=v1.PodSandboxMetadata(name=name, uid=uid, namespace="bench", attempt=0),
        hostname=name,
        log_directory=str(logs / uid),
        linux=v1.LinuxPodSandboxConfig(
            cgroup_parent=f"{cgroups}/pod{uid}" if cgroups else "",
            security_context=v1.LinuxSandboxSecurityContext(
                namespace_options=v1.NamespaceOption(
                    network=v1.NamespaceMode.POD,
                    pid=v1.NamespaceMode.CONTAINER,
                    ipc=v1.NamespaceMode.POD,
                )
            ),
        ),
    )


def container_config(image: str) -> v1.ContainerConfig:
    return v1.ContainerConfig(
        metadata=v1.ContainerMetadata(name="main"),
        image=v1.ImageSpec(image=image),
        command=["sleep", "3600"],
        log_path="main/0.log",
    )


async def pull(runtime: v1.ImageServiceStub, image: str) -> None:
    await runtime.pull_image(v1.PullImageRequest(image=v1.ImageSpec(image=image)), timeout=300)


async def start_pod(cri: v1.RuntimeServiceStub, name: str, image: str, logs: Path) -> str:
    config = pod_config(name, logs)
    pod = await cri.run_pod_sandbox(v1.RunPodSandboxRequest(config=config), timeout=600)
    created = await cri.create_container(
        v1.CreateContainerRequest(
            pod_sandbox_id=pod.pod_sandbox_id,
            config=container_config(image),
            sandbox_config=config,
        ),
        timeout=600,
    )
    await cri.start_container(
        v1.StartContainerRequest(container_id=created.container_id), timeout=600
    )
    return pod.pod_sandbox_id


async def remove_pod(cri: v1.RuntimeServiceStub, pod_id: str) -> None:
    await cri.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=600)
    await cri.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=600)


async def burst(runtime: Runtime, pods: int, image: str, logs: Path) -> tuple[float, float]:
    """(seconds until all N containers run, seconds until all N pods are gone)."""
    channel = Channel(path=str(runtime.socket))
    cri = v1.RuntimeServiceStub(channel)
    try:
        start = time.perf_counter()
        ids = await asyncio.gather(
            *(start_pod(cri, f"burst-{i}", image, logs) for i in range(pods))
        )
        running = time.perf_counter() - start
        listed = await cri.list_containers(v1.ListContainersRequest())
        states = [c.state for c in listed.containers]
        assert states.count(v1.ContainerState.CONTAINER_RUNNING) == pods, states
        start = time.perf_counter()
        await asyncio.gather(*(remove_pod(cri, pod_id) for pod_id in ids))
        gone = time.perf_counter() - start
        assert not (await cri.list_pod_sandbox(v1.ListPodSandboxRequest())).items
        return running, gone
    finally:
        channel.close()


async def prepare(runtime: Runtime, image: str) -> None:
    channel = Channel(path=str(runtime.socket))
    try:
        await pull(v1.ImageServiceStub(channel), image)
    finally:
        channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="N pods started at once, side by side")
    parser.add_argument("--pods", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="runc", choices=["runc", "crun"])
    args = parser.parse_args()
    if not Containerd.available():
        raise SystemExit("containerd is not installed: apt-get install containerd")
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        images = push_images(registry)
        runtimes: list[Runtime] = [
            Crishim(base, args.runtime),
            Containerd(base, registry.host, images.pause),
        ]
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            for runtime in runtimes:
                runtime.start()
                asyncio.run(prepare(runtime, images.busybox))
            for pods in args.pods:
                for round_ in range(args.rounds):
                    # Alternate who goes first, so neither always meets a warmer machine.
                    order = runtimes if round_ % 2 == 0 else runtimes[::-1]
                    for runtime in order:
                        took = asyncio.run(burst(runtime, pods, images.busybox, base / "logs"))
                        results.setdefault((runtime.name, pods), []).append(took)
                        print(
                            f"{runtime.name:<10} {pods:>3} pods: all running {took[0]:6.2f} s, "
                            f"all removed {took[1]:6.2f} s",
                            flush=True,
                        )
        finally:
            for runtime in runtimes:
                runtime.stop()
    print(f"\nmedians over {args.rounds} rounds ({args.runtime}):")
    for pods in args.pods:
        ours = [statistics.median(x) for x in zip(*results[("crishim", pods)], strict=True)]
        theirs = [statistics.median(x) for x in zip(*results[("containerd", pods)], strict=True)]
        print(
            f"{pods:>3} pods  all running: crishim {ours[0]:6.2f} s  containerd {theirs[0]:6.2f} s"
            f"  ratio {ours[0] / theirs[0]:.2f} | all removed: crishim {ours[1]:6.2f} s  "
            f"containerd {theirs[1]:6.2f} s  ratio {ours[1] / theirs[1]:.2f}"
        )


if __name__ == "__main__":
    main()
