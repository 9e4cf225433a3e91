"""Benchmark: the small read calls (status and list), crishim against containerd.

kubelet and critest make these calls one at a time, so each one's cost is mostly the
round trip through the runtime: decode, look up, encode, send. Each runtime gets a pod on
the CNI network with a running busybox container; then, in alternating rounds, every call
below is made CALLS times in a row through a grpcio client that sends and keeps raw bytes
(C-core, no decoding: the client costs the same for both runtimes and little in itself):

- ContainerStatus, PodSandboxStatus, ImageStatus, ListImages (critest's benchmark steps),
- ListPodSandbox, ListContainers (kubelet's one-second poll), Version (the bare round trip).

Then, as critest does, each status right after the change it reports (the first call for
a state, which no cache has seen): ContainerStatus after StartContainer, PodSandboxStatus
after RunPodSandbox, ImageStatus after PullImage of an image pulled before.

Run: ``python -m tests.bench.bench_status [--calls 200] [--fresh 10] [--rounds 2]``
(``--only crishim`` skips containerd; ``--hold [CALL]`` keeps crishim answering one call
(ContainerStatus unless named) until interrupted, printing its pid, for a profiler.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpclib.client import Channel

from crishim.api import v1
from tests.bench.bench_concurrent import container_config, pod_config, prepare
from tests.bench.runtimes import Containerd, Crishim, push_images
from tests.rig.registry import Registry

Runtime = Crishim | Containerd
RUNTIME = "/runtime.v1.RuntimeService/"
IMAGE = "/runtime.v1.ImageService/"


@dataclass(frozen=True)
class Subject:
    """What the calls of one runtime are about."""

    pod_id: str
    container_id: str
    image: str
    pod_config: v1.PodSandboxConfig


def steady_calls(subject: Subject) -> dict[str, tuple[str, bytes]]:
    """Name -> (method path, encoded request) of the calls made over and over."""
    return {
        "ContainerStatus": (
            RUNTIME + "ContainerStatus",
            bytes(v1.ContainerStatusRequest(container_id=subject.container_id)),
        ),
        "PodSandboxStatus": (
            RUNTIME + "PodSandboxStatus",
            bytes(v1.PodSandboxStatusRequest(pod_sandbox_id=subject.pod_id)),
        ),
        "ImageStatus": (
            IMAGE + "ImageStatus",
            bytes(v1.ImageStatusRequest(image=v1.ImageSpec(image=subject.image))),
        ),
        "ListImages": (IMAGE + "ListImages", bytes(v1.ListImagesRequest())),
        "ListPodSandbox": (RUNTIME + "ListPodSandbox", bytes(v1.ListPodSandboxRequest())),
        "ListContainers": (RUNTIME + "ListContainers", bytes(v1.ListContainersRequest())),
        "Version": (RUNTIME + "Version", bytes(v1.VersionRequest())),
    }


class RawClient:
    """grpcio unary calls with bytes in and bytes out."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._methods: dict[str, Callable[..., bytes]] = {}

    def call(self, path: str, request: bytes) -> bytes:
        method = self._methods.get(path)
        if method is None:
            method = self._methods[path] = self._channel.unary_unary(path)
        return method(request, timeout=60)

    def timed(self, path: str, request: bytes) -> float:
        """One call's round trip in ms."""
        start = time.perf_counter()
        self.call(path, request)
        return (time.perf_counter() - start) * 1000

    def close(self) -> None:
        self._channel.close()


async def remove_subject(runtime: Runtime, subject: Subject) -> None:
    channel = Channel(path=str(runtime.socket))
    cri = v1.RuntimeServiceStub(channel)
    try:
        await cri.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=subject.pod_id))
        await cri.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=subject.pod_id))
    finally:
        channel.close()


async def make_subject(runtime: Runtime, image: str, logs: Path) -> Subject:
    """A pod with a running container."""
    channel = Channel(path=str(runtime.socket))
    cri = v1.RuntimeServiceStub(channel)
    try:
        config = pod_config(f"status-{runtime.name}", logs)
        pod = await cri.run_pod_sandbox(v1.RunPodSandboxRequest(config=config), timeout=120)
        made = await cri.create_container(
            v1.CreateContainerRequest(
                pod_sandbox_id=pod.pod_sandbox_id,
                config=container_config(image),
                sandbox_config=config,
            ),
            timeout=120,
        )
        await cri.start_container(v1.StartContainerRequest(container_id=made.container_id))
        return Subject(pod.pod_sandbox_id, made.container_id, image, config)
    finally:
        channel.close()


def steady(
    client: RawClient, subject: Subject, calls: int, samples: dict[str, list[float]]
) -> None:
    for name, (path, request) in steady_calls(subject).items():
        client.call(path, request)  # the connection and any cache are warm
        samples.setdefault(name, []).extend(client.timed(path, request) for _ in range(calls))


def fresh(
    client: RawClient, subject: Subject, rounds: int, logs: Path, samples: dict[str, list[float]]
) -> None:
    """Each status right after the change it reports, as critest's benchmark makes it."""
    pull = bytes(v1.PullImageRequest(image=v1.ImageSpec(image=subject.image)))
    image_status = bytes(v1.ImageStatusRequest(image=v1.ImageSpec(image=subject.image)))
    for _ in range(rounds):
        config = container_config(subject.image)
        config.metadata = v1.ContainerMetadata(name=f"fresh-{uuid.uuid4().hex[:12]}")
        create = bytes(
            v1.CreateContainerRequest(
                pod_sandbox_id=subject.pod_id, config=config, sandbox_config=subject.pod_config
            )
        )
        cid = v1.CreateContainerResponse.parse(client.call(RUNTIME + "CreateContainer", create))
        started = bytes(v1.StartContainerRequest(container_id=cid.container_id))
        client.call(RUNTIME + "StartContainer", started)
        request = bytes(v1.ContainerStatusRequest(container_id=cid.container_id))
        samples.setdefault("ContainerStatus after start", []).append(
            client.timed(RUNTIME + "ContainerStatus", request)
        )
        stop = bytes(v1.StopContainerRequest(container_id=cid.container_id, timeout=0))
        client.call(RUNTIME + "StopContainer", stop)
        client.call(
            RUNTIME + "RemoveContainer",
            bytes(v1.RemoveContainerRequest(container_id=cid.container_id)),
        )
        pod_request = v1.RunPodSandboxRequest(config=pod_config("fresh", logs))
        pod = v1.RunPodSandboxResponse.parse(
            client.call(RUNTIME + "RunPodSandbox", bytes(pod_request))
        )
        request = bytes(v1.PodSandboxStatusRequest(pod_sandbox_id=pod.pod_sandbox_id))
        samples.setdefault("PodSandboxStatus after run", []).append(
            client.timed(RUNTIME + "PodSandboxStatus", request)
        )
        by_id = bytes(v1.StopPodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id))
        client.call(RUNTIME + "StopPodSandbox", by_id)
        client.call(RUNTIME + "RemovePodSandbox", by_id)
        client.call(IMAGE + "PullImage", pull)
        samples.setdefault("ImageStatus after pull", []).append(
            client.timed(IMAGE + "ImageStatus", image_status)
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def hold(runtime: Crishim, subject: Subject, call: str) -> None:
    """Make ``call`` until interrupted (for py-spy on crishim's pid): SIGINT, also
    where a shell started it in the background with SIGINT ignored, or SIGTERM (timeout)."""
    assert runtime.proc.proc is not None
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"crishim pid {runtime.proc.proc.pid}; calling {call}, ^C to stop", flush=True)
    client = RawClient(runtime.socket)
    path, request = steady_calls(subject)[call]
    try:
        while True:
            client.call(path, request)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="status and list calls, side by side")
    parser.add_argument("--calls", type=int, default=200, help="calls of each kind per round")
    parser.add_argument("--fresh", type=int, default=10, help="first-call samples per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--only", choices=["crishim"], help="measure crishim alone")
    parser.add_argument(
        "--hold",
        nargs="?",
        const="ContainerStatus",
        metavar="CALL",
        help="call crishim until ^C (ContainerStatus or another of the steady calls)",
    )
    args = parser.parse_args()
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        images = push_images(registry)
        runtimes: list[Runtime] = [Crishim(base)]
        if args.only is None and not args.hold:
            if not Containerd.available():
                raise SystemExit("containerd is not installed (apt-get install containerd)")
            runtimes.append(Containerd(base, registry.host, images.pause))
        samples: dict[str, dict[str, list[float]]] = {r.name: {} for r in runtimes}
        subjects: dict[str, Subject] = {}
        try:
            for runtime in runtimes:
                runtime.start()
                asyncio.run(prepare(runtime, images.busybox))
                subjects[runtime.name] = asyncio.run(
                    make_subject(runtime, images.busybox, base / "logs")
                )
            if args.hold:
                assert isinstance(runtimes[0], Crishim)
                hold(runtimes[0], subjects["crishim"], args.hold)
                return
            clients = {r.name: RawClient(r.socket) for r in runtimes}
            for round_ in range(args.rounds):
                order = runtimes if round_ % 2 == 0 else runtimes[::-1]
                for runtime in order:
                    client, subject = clients[runtime.name], subjects[runtime.name]
                    steady(client, subject, args.calls, samples[runtime.name])
                    fresh(client, subject, args.fresh, base / "logs", samples[runtime.name])
            for client in clients.values():
                client.close()
        finally:
            for runtime in runtimes:
                if runtime.name in subjects:
                    asyncio.run(remove_subject(runtime, subjects[runtime.name]))
                runtime.stop()
    report(samples, args)


def report(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    ours, theirs = samples["crishim"], samples.get("containerd")
    print(
        f"{args.rounds} rounds x {args.calls} calls (after a change: {args.fresh}), "
        "medians of the round trip:"
    )
    for name, values in ours.items():
        text = f"{name:<28} crishim {statistics.median(values):7.3f} ms"
        if theirs:
            other = statistics.median(theirs[name])
            text += (
                f"   containerd {other:7.3f} ms   ratio {statistics.median(values) / other:5.2f}"
            )
        print(text)


if __name__ == "__main__":
    main()
