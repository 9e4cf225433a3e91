"""Benchmark: CPU cost under kubelet-like polling with many pods, crishim and containerd.

Starts N pods (default 100) of one container each, then for a measured period polls the
way kubelet does in steady state: ListPodSandbox + ListContainers every second, and every
10 s ListContainerStats, ListPodSandboxStats and ImageFsInfo. Reports the CPU seconds
(user + system, from /proc) per minute of the runtime and of its per-container helpers
(conmons; containerd's shims), and as a share of one core. containerd goes second when
installed (``--only crishim`` skips it).

Run: ``python -m tests.bench.bench_steady [--pods 100] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.bench_concurrent import container_config, pod_config, prepare
from tests.bench.runtimes import Containerd, Crishim, pids_whose_cmdline_has, push_images
from tests.rig.registry import Registry

Runtime = Crishim | Containerd
BENCH_CGROUPS = "/crishim-bench"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def helper_pids(runtime: Runtime) -> list[int]:
    """The runtime's per-container helpers: conmons, or containerd's shims."""
    if isinstance(runtime, Crishim):
        return pids_whose_cmdline_has(str(runtime.proc.state), "conmon")
    return pids_whose_cmdline_has(str(runtime.base), "containerd-shim")


def runtime_pid(runtime: Runtime) -> int:
    process = runtime.proc.proc if isinstance(runtime, Crishim) else runtime.proc
    assert process is not None
    return process.pid


async def start_pods(socket: Path, image: str, pods: int, logs: Path) -> list[str]:
    channel = Channel(path=str(socket))
    runtime = v1.RuntimeServiceStub(channel)
    ids = []
    try:
        for i in range(pods):
            # containerd answers ListPodSandboxStats only for pods with a cgroup parent.
            config = pod_config(f"steady-{i}", logs, cgroups=BENCH_CGROUPS)
            pod_id = (
                await runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id
            cid = (
                await runtime.create_container(
                    v1.CreateContainerRequest(
                        pod_sandbox_id=pod_id,
                        config=container_config(image),
                        sandbox_config=config,
                    )
                )
            ).container_id
            await runtime.start_container(v1.StartContainerRequest(container_id=cid))
            ids.append(pod_id)
    finally:
        channel.close()
    return ids


async def poll(socket: Path, seconds: float) -> int:
    """Poll like kubelet for ``seconds``; returns the number of RPCs made."""
    channel = Channel(path=str(socket))
    runtime = v1.RuntimeServiceStub(channel)
    images = v1.ImageServiceStub(channel)
    calls = 0
    start = time.monotonic()
    tick = 0
    try:
        while time.monotonic() - start < seconds:
            await runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
            await runtime.list_containers(v1.ListContainersRequest())
            calls += 2
            if tick % 10 == 0:
                await runtime.list_container_stats(v1.ListContainerStatsRequest())
                await runtime.list_pod_sandbox_stats(v1.ListPodSandboxStatsRequest())
                await images.image_fs_info(v1.ImageFsInfoRequest())
                calls += 3
            tick += 1
            await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
    finally:
        channel.close()
    return calls


async def remove_pods(socket: Path, ids: list[str]) -> None:
    channel = Channel(path=str(socket))
    runtime = v1.RuntimeServiceStub(channel)
    try:
        for pod_id in ids:
            await runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        channel.close()


def measure(runtime: Runtime, image: str, pods: int, seconds: float, logs: Path) -> str:
    asyncio.run(prepare(runtime, image))
    started = time.monotonic()
    ids = asyncio.run(start_pods(runtime.socket, image, pods, logs))
    took = time.monotonic() - started
    helpers = helper_pids(runtime)
    own_before = cpu_seconds(runtime_pid(runtime))
    helpers_before = sum(cpu_seconds(p) for p in helpers)
    wall = time.monotonic()
    calls = asyncio.run(poll(runtime.socket, seconds))
    elapsed = time.monotonic() - wall
    own = (cpu_seconds(runtime_pid(runtime)) - own_before) / elapsed * 60
    helper = (sum(cpu_seconds(p) for p in helpers) - helpers_before) / elapsed * 60
    asyncio.run(remove_pods(runtime.socket, ids))
    return (
        f"{runtime.name:<10} {len(ids)} pods started one by one in {took:.1f} s; {calls} RPCs "
        f"in {elapsed:.0f} s; CPU s per minute: own {own:.2f} ({own / 60 * 100:.1f} % of a "
        f"core), helpers {helper:.2f}, total {(own + helper) / 60 * 100:.1f} % of a core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="steady-state CPU benchmark")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", choices=["crishim"], help="measure crishim alone")
    args = parser.parse_args()
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        images = push_images(registry)
        runtimes: list[Runtime] = [Crishim(base)]
        if args.only is None and Containerd.available():
            runtimes.append(Containerd(base, registry.host, images.pause))
        for runtime in runtimes:
            runtime.start()
            try:
                print(
                    measure(runtime, images.busybox, args.pods, args.seconds, base / "logs"),
                    flush=True,
                )
            finally:
                runtime.stop()
                remove_cgroup_tree(BENCH_CGROUPS)


def remove_cgroup_tree(relative: str) -> None:
    """Remove the (empty) pod cgroups the benchmark's pods left, in every hierarchy."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mount, fstype = line.split()[1:3]
        top = Path(mount) / relative.strip("/")
        if fstype in ("cgroup", "cgroup2") and top.is_dir():
            for group in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if group.is_dir():
                    group.rmdir()
            top.rmdir()


if __name__ == "__main__":
    main()
