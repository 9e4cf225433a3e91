"""Benchmark: ListPodSandbox + ListContainers through the real socket, as kubelet polls.

kubelet makes this pair of calls every second. The store is seeded with 250 containers in
84 pods, with the labels and annotations kubelet sets, then crishim is started as a real
process and the pair is called ROUNDS times over its unix socket. Reported:

- server-side time per call (from crishim's own per-RPC debug lines: decode, filter,
  encode and send, as measured inside the handler wrapper);
- client round trip per call (grpclib client on the same machine that keeps the reply as
  bytes, so the figure is transport + server, not Python's decoding; a betterproto2 decode
  of 250 containers alone costs tens of ms, which kubelet's Go client does not pay);
- for comparison, encoding the same ListContainersResponse with plain betterproto2,
  which is what each call would cost without the per-object encoding cache.

Run: ``python -m tests.bench.bench_list [--containers 250] [--rounds 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec

from crishim.api import convert, v1
from crishim.model import Container, ContainerMetadata, ContainerState, PodMetadata, Sandbox
from crishim.store import write_record
from tests.rig.crishim_proc import CrishimProcess

CONTAINERS_PER_POD = 3


def kubelet_like_records(containers: int) -> tuple[list[Sandbox], list[Container]]:
    """Records shaped like kubelet's: its labels and annotations, 64-hex ids."""
    sandboxes, items = [], []
    pods = (containers + CONTAINERS_PER_POD - 1) // CONTAINERS_PER_POD
    now = time.time_ns()
    for p in range(pods):
        uid = f"{p:08x}-1111-2222-3333-444455556666"
        sb = Sandbox(
            id=f"{p:064x}",
            metadata=PodMetadata(name=f"web-{p}", uid=uid, namespace="default"),
            created_at=now + p,
            runtime_handler="",
            labels={
                "app": "web",
                "io.kubernetes.pod.name": f"web-{p}",
                "io.kubernetes.pod.namespace": "default",
                "io.kubernetes.pod.uid": uid,
                "pod-template-hash": "5d4b7c9f8",
            },
            annotations={
                "kubernetes.io/config.seen": "2026-11-30T12:00:00.000000000Z",
                "kubernetes.io/config.source": "api",
            },
        )
        sandboxes.append(sb)
    for c in range(containers):
        sb = sandboxes[c // CONTAINERS_PER_POD]
        name = f"app-{c % CONTAINERS_PER_POD}"
        items.append(
            Container(
                id=f"{c + 10**6:064x}",
                sandbox_id=sb.id,
                metadata=ContainerMetadata(name=name),
                image="sha256:" + "ab" * 32,
                user_specified_image="registry.k8s.io/nginx:1.14-2",
                image_ref="sha256:" + "ab" * 32,
                image_id="sha256:" + "ab" * 32,
                state=ContainerState.EXITED,  # synthetic: no process behind them
                created_at=now + c,
                labels={
                    "io.kubernetes.container.name": name,
                    "io.kubernetes.pod.name": sb.metadata.name,
                    "io.kubernetes.pod.namespace": "default",
                    "io.kubernetes.pod.uid": sb.metadata.uid,
                },
                annotations={
                    "io.kubernetes.container.hash": "8f3c2b1a",
                    "io.kubernetes.container.restartCount": "0",
                    "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                    "io.kubernetes.container.terminationMessagePolicy": "File",
                    "io.kubernetes.pod.terminationGracePeriod": "30",
                },
            )
        )
    return sandboxes, items


def seed(root: Path, sandboxes: list[Sandbox], containers: list[Container]) -> None:
    for sb in sandboxes:
        write_record(
            root / "sandboxes" / sb.id / "sandbox.json", "sandbox", sb.model_dump(mode="json")
        )
    for ct in containers:
        write_record(
            root / "containers" / ct.id / "container.json", "container", ct.model_dump(mode="json")
        )


def plain_encoding_ms(containers: list[Container], repeat: int = 5) -> float:
    """What one ListContainers reply costs to encode without the cache."""
    reply = v1.ListContainersResponse(containers=[convert.container(c) for c in containers])
    start = time.perf_counter()
    for _ in range(repeat):
        bytes(reply)
    return (time.perf_counter() - start) / repeat * 1000


class RawReplyCodec(ProtoCodec):
    """Encodes requests as usual; hands replies back undecoded."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def poll(socket: Path, rounds: int) -> tuple[list[float], list[float], int]:
    channel = Channel(path=str(socket), codec=RawReplyCodec())
    stub = v1.RuntimeServiceStub(channel)
    pods_ms, containers_ms = [], []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await stub.list_pod_sandbox(v1.ListPodSandboxRequest())
            t1 = time.perf_counter()
            reply: Any = await stub.list_containers(v1.ListContainersRequest())
            t2 = time.perf_counter()
            pods_ms.append((t1 - t0) * 1000)
            containers_ms.append((t2 - t1) * 1000)
        count = len(v1.ListContainersResponse.parse(reply).containers)
    finally:
        channel.close()
    return pods_ms, containers_ms, count


def server_times(log: str, method: str) -> list[float]:
    return [float(m) for m in re.findall(rf"crishim\.rpc: {method} OK ([0-9.]+) ms", log)]


def summary(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[int(len(values) * 0.95) - 1]
    return f"median {statistics.median(values):7.3f} ms  p95 {p95:7.3f} ms  (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description="ListPodSandbox + ListContainers benchmark")
    parser.add_argument("--containers", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    sandboxes, containers = kubelet_like_records(args.containers)
    with tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        proc = CrishimProcess(Path(tmp))
        seed(proc.root, sandboxes, containers)
        proc.start()
        try:
            pods_ms, containers_ms, count = asyncio.run(poll(proc.socket, args.rounds))
        finally:
            proc.terminate()
        log = proc.log()
    assert count == len(containers), f"listed {count} containers, seeded {len(containers)}"
    # The first call of each kind fills the cache; steady state is what kubelet sees.
    server_pods = server_times(log, "ListPodSandbox")[1:]
    server_containers = server_times(log, "ListContainers")[1:]
    print(f"{len(sandboxes)} pod sandboxes, {len(containers)} containers, {args.rounds} rounds")
    print(f"server ListPodSandbox   {summary(server_pods)}")
    print(f"server ListContainers   {summary(server_containers)}")
    print(f"client ListPodSandbox   {summary(pods_ms[1:])}")
    print(f"client ListContainers   {summary(containers_ms[1:])}")
    print(
        f"without the cache: betterproto2 encodes this ListContainers reply in "
        f"{plain_encoding_ms(containers):.1f} ms"
    )


if __name__ == "__main__":
    main()
