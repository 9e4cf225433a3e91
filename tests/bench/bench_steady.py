"""Benchmark: crishim's CPU cost under kubelet-like polling with many pods.

Starts N pods (default 100) of one container each, then for a measured period polls the
way kubelet does in steady state: ListPodSandbox + ListContainers every second, and every
10 s ListContainerStats, ListPodSandboxStats and ImageFsInfo. Reports crishim's CPU
seconds (user + system, from /proc) per minute and as a share of one core.

Run: ``python -m tests.bench.bench_steady [--pods 100] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.bench_lifecycle import BRIDGE, conflist, container_config, pod_config, pull
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.oci_image import busybox_image, push
from tests.rig.registry import Registry

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def start_pods(socket: Path, image: str, pods: int, logs: Path) -> list[str]:
    channel = Channel(path=str(socket))
    runtime = v1.RuntimeServiceStub(channel)
    ids = []
    try:
        for i in range(pods):
            config = pod_config(f"steady-{i}", logs)
            pod_id = (
                await runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id
            cid = (
                await runtime.create_container(
                    v1.CreateContainerRequest(
                        pod_sandbox_id=pod_id,
                        config=container_config("app", image),
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


def main() -> None:
    parser = argparse.ArgumentParser(description="steady-state CPU benchmark")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        push(registry.url, "bench/busybox", "1", busybox_image())
        ref = f"{registry.host}/bench/busybox:1"
        (base / "ipam").mkdir()
        proc = CrishimProcess(base / "crishim", config='log_level = "info"\n')
        proc.cni_conf_dir.mkdir(parents=True)
        (proc.cni_conf_dir / "10-bench.conflist").write_text(conflist(base / "ipam"))
        proc.start()
        try:
            asyncio.run(pull(proc.socket, ref))
            started = time.monotonic()
            ids = asyncio.run(start_pods(proc.socket, ref, args.pods, base / "logs"))
            print(
                f"{len(ids)} pods with one container each started in "
                f"{time.monotonic() - started:.1f} s"
            )
            assert proc.proc is not None
            before = cpu_seconds(proc.proc.pid)
            wall = time.monotonic()
            calls = asyncio.run(poll(proc.socket, args.seconds))
            used = cpu_seconds(proc.proc.pid) - before
            elapsed = time.monotonic() - wall
            asyncio.run(remove_pods(proc.socket, ids))
        finally:
            proc.terminate()
            proc.unmount_all()
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
    per_minute = used / elapsed * 60
    print(
        f"{calls} RPCs in {elapsed:.0f} s; crishim used {used:.2f} CPU s: "
        f"{per_minute:.2f} CPU s per minute = {per_minute / 60 * 100:.1f} % of one core"
    )


if __name__ == "__main__":
    main()
