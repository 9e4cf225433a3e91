"""Benchmark: pod and container lifecycle latency, and memory per pod.

Like critest's benchmark mode, each step is timed on its own through crishim's CRI socket:
RunPodSandbox, StopPodSandbox, RemovePodSandbox for the pod lifecycle; CreateContainer,
StartContainer, StopContainer, RemoveContainer for the container lifecycle (in one pod).
For scale, the same container is run directly with ``runc run -d`` + kill + delete.
Memory: crishim's RSS and conmon's RSS per container with 10 and 50 pods of one
container each.

Run: ``python -m tests.bench.bench_lifecycle [--rounds 20] [--runtime runc|crun]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.rig.bundle import make_bundle
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.oci_image import busybox_image, push
from tests.rig.registry import Registry

BRIDGE = "crishim-bn0"
SUBNET = "10.88.216.0/24"


def conflist(ipam_dir: Path) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "crishim-bench",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET}]],
                        "dataDir": str(ipam_dir),
                    },
                },
                {"type": "loopback"},
            ],
        }
    )


def pod_config(name: str, logs: Path) -> v1.PodSandboxConfig:
    uid = str(uuid.uuid4())
    return v1.PodSandboxConfig(
        metadata=v1.PodSandboxMetadata(name=name, uid=uid, namespace="bench", attempt=0),
        hostname=name,
        log_directory=str(logs / uid),
        linux=v1.LinuxPodSandboxConfig(
            security_context=v1.LinuxSandboxSecurityContext(
                namespace_options=v1.NamespaceOption(
                    network=v1.NamespaceMode.POD,
                    pid=v1.NamespaceMode.CONTAINER,
                    ipc=v1.NamespaceMode.POD,
                )
            )
        ),
    )


def container_config(name: str, image: str) -> v1.ContainerConfig:
    return v1.ContainerConfig(
        metadata=v1.ContainerMetadata(name=name),
        image=v1.ImageSpec(image=image),
        command=["sleep", "3600"],
        log_path=f"{name}.log",
    )


async def timed(samples: dict[str, list[float]], key: str, call: Awaitable[object]) -> object:
    start = time.perf_counter()
    result = await call
    samples.setdefault(key, []).append((time.perf_counter() - start) * 1000)
    return result


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def conmon_rss_kib(root_marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"conmon .*{root_marker}"], capture_output=True, text=True)
    return [rss_kib(int(p)) for p in out.stdout.split()]


async def lifecycle(
    proc: CrishimProcess, image: str, rounds: int, logs: Path
) -> dict[str, list[float]]:
    channel = Channel(path=str(proc.socket))
    runtime = v1.RuntimeServiceStub(channel)
    samples: dict[str, list[float]] = {}
    try:
        for i in range(rounds):
            config = pod_config(f"pod-{i}", logs)
            reply = await timed(
                samples,
                "pod: run",
                runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config)),
            )
            pod_id = reply.pod_sandbox_id  # type: ignore[attr-defined]
            await timed(
                samples,
                "pod: stop",
                runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod_id)),
            )
            await timed(
                samples,
                "pod: remove",
                runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id)),
            )
        config = pod_config("ctr-pod", logs)
        pod_id = (
            await runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
        ).pod_sandbox_id
        for i in range(rounds):
            ctr = container_config(f"c{i}", image)
            made = await timed(
                samples,
                "container: create",
                runtime.create_container(
                    v1.CreateContainerRequest(
                        pod_sandbox_id=pod_id, config=ctr, sandbox_config=config
                    )
                ),
            )
            cid = made.container_id  # type: ignore[attr-defined]
            await timed(
                samples,
                "container: start",
                runtime.start_container(v1.StartContainerRequest(container_id=cid)),
            )
            await timed(
                samples,
                "container: stop",
                runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=0)),
            )
            await timed(
                samples,
                "container: remove",
                runtime.remove_container(v1.RemoveContainerRequest(container_id=cid)),
            )
        await runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        channel.close()
    return samples


async def memory(proc: CrishimProcess, image: str, pods: int, logs: Path) -> tuple[int, float]:
    """crishim RSS (KiB) and mean conmon RSS per container (KiB) with ``pods`` pods running."""
    channel = Channel(path=str(proc.socket))
    runtime = v1.RuntimeServiceStub(channel)
    ids = []
    try:
        for i in range(pods):
            config = pod_config(f"mem-{pods}-{i}", logs)
            pod_id = (
                await runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id
            ids.append(pod_id)
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
        await asyncio.sleep(1)
        assert proc.proc is not None
        conmons = conmon_rss_kib(str(proc.state))
        return rss_kib(proc.proc.pid), statistics.mean(conmons) if conmons else 0.0
    finally:
        for pod_id in ids:
            await runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        channel.close()


async def pull(socket: Path, ref: str) -> None:
    """PullImage through crishim's socket."""
    channel = Channel(path=str(socket))
    try:
        await v1.ImageServiceStub(channel).pull_image(
            v1.PullImageRequest(image=v1.ImageSpec(image=ref))
        )
    finally:
        channel.close()


def raw_runc(base: Path, rounds: int) -> list[float]:
    """`runc run -d` + kill + delete of the same busybox, as a floor."""
    bundle = make_bundle(base / "raw", ["sleep", "3600"])
    times = []
    for i in range(rounds):
        cid = f"crishim-bench-raw-{i}"
        start = time.perf_counter()
        subprocess.run(
            ["runc", "--root", str(base / "runc-root"), "run", "-d", "--bundle", str(bundle), cid],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        subprocess.run(["runc", "--root", str(base / "runc-root"), "kill", cid, "KILL"], check=True)
        while (
            json.loads(
                subprocess.run(
                    ["runc", "--root", str(base / "runc-root"), "state", cid],
                    capture_output=True,
                    check=True,
                ).stdout
            )["status"]
            != "stopped"
        ):
            time.sleep(0.005)
        subprocess.run(["runc", "--root", str(base / "runc-root"), "delete", cid], check=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def line(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return f"{name:<20} median {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description="pod/container lifecycle benchmark")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runtime", default="runc", choices=["runc", "crun"])
    args = parser.parse_args()
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        image = busybox_image()
        push(registry.url, "bench/busybox", "1", image)
        ref = f"{registry.host}/bench/busybox:1"
        (base / "ipam").mkdir()
        proc = CrishimProcess(
            base / "crishim",
            config=f'default_runtime = "{args.runtime}"\n',
        )
        proc.cni_conf_dir.mkdir(parents=True)
        (proc.cni_conf_dir / "10-bench.conflist").write_text(conflist(base / "ipam"))
        proc.start()
        try:
            asyncio.run(pull(proc.socket, ref))
            samples = asyncio.run(lifecycle(proc, ref, args.rounds, base / "logs"))
            mem10 = asyncio.run(memory(proc, ref, 10, base / "logs"))
            mem50 = asyncio.run(memory(proc, ref, 50, base / "logs"))
        finally:
            proc.terminate()
            proc.unmount_all()
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        raw = raw_runc(base, args.rounds)
    print(f"runtime {args.runtime}, {args.rounds} rounds each")
    for key, values in samples.items():
        print(line(key, values))
    pod_total = [
        sum(v)
        for v in zip(samples["pod: run"], samples["pod: stop"], samples["pod: remove"], strict=True)
    ]
    ctr_keys = ["container: create", "container: start", "container: stop", "container: remove"]
    ctr_total = [sum(v) for v in zip(*(samples[k] for k in ctr_keys), strict=True)]
    print(line("pod lifecycle", pod_total))
    print(line("container lifecycle", ctr_total))
    print(line("raw runc run/kill/rm", raw))
    for pods, (crishim_kib, conmon_kib) in ((10, mem10), (50, mem50)):
        print(
            f"memory with {pods} pods: crishim RSS {crishim_kib / 1024:.1f} MiB, "
            f"conmon {conmon_kib / 1024:.2f} MiB per container"
        )


if __name__ == "__main__":
    main()
