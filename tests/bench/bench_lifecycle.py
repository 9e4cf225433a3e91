"""Benchmark: pod and container lifecycle, step by step, crishim against containerd.

Like critest's benchmark mode, each step is timed on its own through the CRI socket, one
call at a time: RunPodSandbox, StopPodSandbox, RemovePodSandbox (a pod on the CNI
network); CreateContainer, StartContainer, StopContainer, RemoveContainer (a busybox in
one pod). The runtimes alternate in rounds (crishim first in even rounds, containerd in
odd ones), so both see the same machine; the ratio of their medians is what counts.
Memory: the runtime's own RSS and that of its per-container helpers (conmons for crishim,
shims for containerd) with 10 and 50 pods of one container each.

Run: ``python -m tests.bench.bench_lifecycle [--rounds 20] [--batches 2] [--runtime runc]``
(``--only crishim`` skips containerd.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.bench_concurrent import container_config, pod_config, prepare
from tests.bench.runtimes import Containerd, Crishim, push_images
from tests.rig.registry import Registry

Runtime = Crishim | Containerd
Samples = dict[str, list[float]]
POD_STEPS = ["pod: run", "pod: stop", "pod: remove"]
CONTAINER_STEPS = ["container: create", "container: start", "container: stop", "container: remove"]


async def timed(samples: Samples, key: str, call: Awaitable[object]) -> object:
    start = time.perf_counter()
    result = await call
    samples.setdefault(key, []).append((time.perf_counter() - start) * 1000)
    return result


async def lifecycle(
    runtime: Runtime, image: str, rounds: int, logs: Path, samples: Samples
) -> None:
    channel = Channel(path=str(runtime.socket))
    cri = v1.RuntimeServiceStub(channel)
    try:
        for i in range(rounds):
            config = pod_config(f"pod-{i}", logs)
            reply = await timed(
                samples, "pod: run", cri.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
            )
            pod_id = reply.pod_sandbox_id  # type: ignore[attr-defined]
            stop = v1.StopPodSandboxRequest(pod_sandbox_id=pod_id)
            await timed(samples, "pod: stop", cri.stop_pod_sandbox(stop))
            remove = v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
            await timed(samples, "pod: remove", cri.remove_pod_sandbox(remove))
        config = pod_config("ctr-pod", logs)
        pod_id = (await cri.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))).pod_sandbox_id
        for _ in range(rounds):
            create = v1.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container_config(image), sandbox_config=config
            )
            made = await timed(samples, "container: create", cri.create_container(create))
            cid = made.container_id  # type: ignore[attr-defined]
            start = v1.StartContainerRequest(container_id=cid)
            await timed(samples, "container: start", cri.start_container(start))
            stop_ctr = v1.StopContainerRequest(container_id=cid, timeout=0)
            await timed(samples, "container: stop", cri.stop_container(stop_ctr))
            remove_ctr = v1.RemoveContainerRequest(container_id=cid)
            await timed(samples, "container: remove", cri.remove_container(remove_ctr))
        await cri.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        channel.close()


async def memory(runtime: Runtime, image: str, pods: int, logs: Path) -> tuple[int, int]:
    """(the runtime's RSS, its helpers' RSS), KiB, with ``pods`` pods of one container."""
    channel = Channel(path=str(runtime.socket))
    cri = v1.RuntimeServiceStub(channel)
    ids = []
    try:
        for i in range(pods):
            config = pod_config(f"mem-{pods}-{i}", logs)
            pod_id = (
                await cri.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id
            ids.append(pod_id)
            create = v1.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container_config(image), sandbox_config=config
            )
            cid = (await cri.create_container(create)).container_id
            await cri.start_container(v1.StartContainerRequest(container_id=cid))
        await asyncio.sleep(1)
        return runtime.memory_kib()
    finally:
        for pod_id in ids:
            await cri.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            await cri.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        channel.close()


def line(name: str, ours: list[float], theirs: list[float] | None) -> str:
    text = f"{name:<20} crishim {statistics.median(ours):7.1f} ms"
    if theirs:
        ratio = statistics.median(ours) / statistics.median(theirs)
        text += f"   containerd {statistics.median(theirs):7.1f} ms   ratio {ratio:5.2f}"
    return text


def totals(samples: Samples, steps: list[str]) -> list[float]:
    return [sum(v) for v in zip(*(samples[k] for k in steps), strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description="pod/container lifecycle, side by side")
    parser.add_argument("--rounds", type=int, default=20, help="lifecycles per batch")
    parser.add_argument("--batches", type=int, default=2, help="alternating batches each")
    parser.add_argument("--runtime", default="runc", choices=["runc", "crun"])
    parser.add_argument("--only", choices=["crishim"], help="measure crishim alone")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        images = push_images(registry)
        runtimes: list[Runtime] = [Crishim(base, args.runtime)]
        if args.only is None:
            if not Containerd.available():
                raise SystemExit("containerd is not installed (apt-get install containerd)")
            runtimes.append(Containerd(base, registry.host, images.pause))
        samples: dict[str, Samples] = {r.name: {} for r in runtimes}
        mem: dict[str, list[tuple[int, int, int]]] = {r.name: [] for r in runtimes}
        try:
            for runtime in runtimes:
                runtime.start()
                asyncio.run(prepare(runtime, images.busybox))
            for batch in range(args.batches):
                order = runtimes if batch % 2 == 0 else runtimes[::-1]
                for runtime in order:
                    asyncio.run(
                        lifecycle(
                            runtime,
                            images.busybox,
                            args.rounds,
                            base / "logs",
                            samples[runtime.name],
                        )
                    )
            if not args.no_memory:
                for runtime in runtimes:
                    for pods in (10, 50):
                        own, helpers = asyncio.run(
                            memory(runtime, images.busybox, pods, base / "logs")
                        )
                        mem[runtime.name].append((pods, own, helpers))
        finally:
            for runtime in runtimes:
                runtime.stop()
    ours = samples["crishim"]
    theirs = samples.get("containerd")
    print(f"{args.runtime}, {args.batches} batches x {args.rounds} rounds, medians:")
    for key in [*POD_STEPS, *CONTAINER_STEPS]:
        print(line(key, ours[key], theirs[key] if theirs else None))
    print(
        line(
            "pod lifecycle", totals(ours, POD_STEPS), totals(theirs, POD_STEPS) if theirs else None
        )
    )
    print(
        line(
            "container lifecycle",
            totals(ours, CONTAINER_STEPS),
            totals(theirs, CONTAINER_STEPS) if theirs else None,
        )
    )
    for name, rows in mem.items():
        for pods, own, helpers in rows:
            print(
                f"memory {name:<10} {pods:>3} pods: own RSS {own / 1024:6.1f} MiB, helpers "
                f"{helpers / 1024:6.1f} MiB, total {(own + helpers) / 1024:6.1f} MiB"
            )


if __name__ == "__main__":
    main()
