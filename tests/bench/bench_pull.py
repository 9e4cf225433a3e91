"""Benchmark: pull and unpack a ~100 MB multi-layer image from a local registry.

The image (5 layers of files with a realistic mix of compressible and random content) is
pushed to Debian's docker-registry on loopback, then pulled through crishim's CRI socket
ROUNDS times (the image is removed between rounds, so every round downloads and unpacks
everything). If containerd is installed, the same pulls go through its CRI plugin,
started with a private root, state and socket, so the two are compared on one machine in
one run.

Run: ``python -m tests.bench.bench_pull [--rounds 3] [--mb 100]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.oci_image import Image, LayerBuilder, busybox_image, push
from tests.rig.registry import Registry

LAYERS = 5


def make_image(total_mb: int) -> tuple[Image, int]:
    """A busybox base plus LAYERS layers of files; returns the image and its blob bytes."""
    rng = random.Random(42)  # noqa: S311 - reproducible test data, not secrets
    per_layer = total_mb * 1_000_000 // LAYERS
    layers = []
    for index in range(LAYERS):
        builder = LayerBuilder()
        written = 0
        n = 0
        while written < per_layer:
            size = rng.choice((2_000, 20_000, 200_000, 1_000_000))
            if n % 3:
                data = rng.randbytes(size)  # incompressible, like binaries and media
            else:
                words = [
                    rng.choice(("lorem", "ipsum", "kube", "pod", "node")) for _ in range(size // 5)
                ]
                data = " ".join(words).encode()[:size]
            builder.file(f"layer{index}/dir{n % 20}/file{n}", data)
            written += len(data)
            n += 1
        layers.append(builder.build("gzip"))
    image = busybox_image(labels={"bench": "pull"}, extra_layers=layers)
    return image, sum(layer.size for layer in image.layers)


async def pull_rounds(socket: Path, ref: str, image_id: str, rounds: int) -> list[float]:
    channel = Channel(path=str(socket))
    images = v1.ImageServiceStub(channel)
    spec = v1.ImageSpec(image=ref)
    times = []
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            reply = await images.pull_image(v1.PullImageRequest(image=spec), timeout=600)
            times.append(time.perf_counter() - start)
            assert reply.image_ref == image_id, (reply.image_ref, image_id)
            await images.remove_image(v1.RemoveImageRequest(image=v1.ImageSpec(image=image_id)))
    finally:
        channel.close()
    return times


def start_containerd(base: Path, registry_host: str) -> tuple[subprocess.Popen[bytes], Path]:
    """containerd with only what a CRI pull needs, on private paths."""
    certs = base / "certs.d" / registry_host
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text(f'server = "http://{registry_host}"\n')
    sock = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\nstate = "{base / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'  config_path = "{base / "certs.d"}"\n'
    )
    log = (base / "containerd.log").open("wb")
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((base / "containerd.log").read_text()[-3000:])
        time.sleep(0.1)
    time.sleep(1.0)  # the CRI plugin registers its services a moment after the socket appears
    return proc, sock


def report(name: str, times: list[float], blob_bytes: int) -> float:
    median = statistics.median(times)
    print(
        f"{name:<11} median {median:6.2f} s  {blob_bytes / 1e6 / median:6.1f} MB/s  "
        f"(rounds: {', '.join(f'{t:.2f}' for t in times)})"
    )
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description="pull + unpack benchmark")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    image, blob_bytes = make_image(args.mb)
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        push(registry.url, "bench/big", "v1", image)
        ref = f"{registry.host}/bench/big:v1"
        print(
            f"image: {len(image.layers)} layers, {blob_bytes / 1e6:.1f} MB compressed, "
            f"{sum(len(layer.tar) for layer in image.layers) / 1e6:.1f} MB unpacked"
        )
        proc = CrishimProcess(Path(tmp) / "crishim").start()
        try:
            crishim_times = asyncio.run(
                pull_rounds(proc.socket, ref, image.config_digest, args.rounds)
            )
        finally:
            proc.terminate()
        ours = report("crishim", crishim_times, blob_bytes)
        if shutil.which("containerd") is None:
            print(
                "containerd: not installed on this machine, no comparison "
                "(apt-get install containerd to compare)"
            )
            return
        base = Path(tmp) / "containerd"
        base.mkdir()
        ctrd, sock = start_containerd(base, registry.host)
        try:
            theirs_times = asyncio.run(pull_rounds(sock, ref, image.config_digest, args.rounds))
        finally:
            ctrd.terminate()
            ctrd.wait(30)
            subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        theirs = report("containerd", theirs_times, blob_bytes)
        print(f"crishim / containerd time ratio: {ours / theirs:.2f} (below 1: crishim faster)")
        os.sync()


if __name__ == "__main__":
    main()
