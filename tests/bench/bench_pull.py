"""Benchmark: pull and unpack a multi-layer image, crishim against containerd, side by side.

The image is a busybox base plus LAYERS layers of files (a realistic mix of compressible and
random content, ``--mb`` MB in all before compression), served by Debian's docker-registry
on loopback. Both runtimes are started once (containerd from Debian, on private root, state
and socket) and then pull in rounds, alternating who goes first. Every round pushes a fresh
image under a new tag: each of its layers carries a file naming the round, so every blob
and every layer is new to both runtimes and each pull downloads and unpacks everything
(removing an image and pulling it again could meet blobs that containerd's garbage
collection has not yet deleted). After each pull the image is removed, the runtime's
content store is waited on until it holds no blob of it, and the disks are synced, so no
pull pays for the one before it.

Only the ratio of the medians measured in one run means anything on a shared machine.

Run: ``python -m tests.bench.bench_pull [--rounds 5] [--mb 100]``
(``--only crishim`` skips containerd.)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.runtimes import Containerd, Crishim, push_images
from tests.rig.oci_image import DEFAULT_MTIME, Image, Layer, LayerBuilder, busybox_image, push
from tests.rig.registry import Registry

Runtime = Crishim | Containerd
LAYERS = 5
REPO = "bench/big"
GC_TIMEOUT_SECONDS = 60.0
Files = list[tuple[str, bytes]]


def layer_files(total_mb: int) -> list[Files]:
    """The files of the LAYERS bench layers: the same in every round (seeded)."""
    rng = random.Random(42)  # noqa: S311 - reproducible test data, not secrets
    per_layer = total_mb * 1_000_000 // LAYERS
    layers = []
    for index in range(LAYERS):
        files: Files = []
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
            files.append((f"layer{index}/dir{n % 20}/file{n}", data))
            written += len(data)
            n += 1
        layers.append(files)
    return layers


def with_marker(tar: bytes, round_: int) -> bytes:
    """``tar`` with one more file, naming the round (so its digests are new)."""
    out = io.BytesIO(tar)
    with tarfile.open(fileobj=out, mode="a") as archive:
        data = f"round {round_}\n".encode()
        info = tarfile.TarInfo(f"bench-round-{round_}")
        info.size = len(data)
        info.mtime = DEFAULT_MTIME
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def round_image(files: list[Files], round_: int) -> Image:
    """The image of one round: every layer, the base included, marked with the round."""
    layers = []
    for number, layer in enumerate(files):
        builder = LayerBuilder()
        for path, data in layer:
            builder.file(path, data)
        builder.file(f"layer{number}/bench-round", f"round {round_}\n")
        layers.append(builder.build("gzip"))
    image = busybox_image(labels={"bench": "pull", "round": str(round_)}, extra_layers=layers)
    base = Layer.from_tar(with_marker(image.layers[0].tar, round_), "gzip")
    return replace(image, layers=[base, *image.layers[1:]])


def make_image(total_mb: int) -> tuple[Image, int]:
    """The image of the first round (bench_import's image too), and its blob bytes."""
    image = round_image(layer_files(total_mb), 0)
    return image, sum(layer.size for layer in image.layers)


def report(name: str, times: list[float], blob_bytes: int) -> float:
    """Print the median of ``times`` and the rate it makes; returns the median."""
    median = statistics.median(times)
    print(
        f"{name:<11} median {median:6.2f} s  {blob_bytes / 1e6 / median:6.1f} MB/s  "
        f"(rounds: {', '.join(f'{t:.2f}' for t in times)})"
    )
    return median


def blob_dir(runtime: Runtime) -> Path:
    """Where the runtime keeps its blobs."""
    if isinstance(runtime, Crishim):
        return runtime.proc.root / "images" / "content" / "blobs" / "sha256"
    return runtime.base / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"


def wait_until_gone(runtime: Runtime, image: Image) -> None:
    """Until the runtime's content store holds none of the image's blobs."""
    digests = {d.split(":", 1)[1] for d in image.blobs()}
    directory = blob_dir(runtime)
    deadline = time.monotonic() + GC_TIMEOUT_SECONDS
    while left := digests & set(os.listdir(directory) if directory.is_dir() else ()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{runtime.name} kept {len(left)} blob(s) of a removed image")
        time.sleep(0.2)


async def pull_once(runtime: Runtime, ref: str, image: Image) -> float:
    """Seconds to pull ``ref``; the image is removed afterwards (not timed)."""
    channel = Channel(path=str(runtime.socket))
    images = v1.ImageServiceStub(channel)
    try:
        start = time.perf_counter()
        reply = await images.pull_image(
            v1.PullImageRequest(image=v1.ImageSpec(image=ref)), timeout=600
        )
        took = time.perf_counter() - start
        assert reply.image_ref == image.config_digest, (reply.image_ref, image.config_digest)
        await images.remove_image(v1.RemoveImageRequest(image=v1.ImageSpec(image=ref)))
    finally:
        channel.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description="pull + unpack, side by side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--only", choices=["crishim"], help="measure crishim alone")
    args = parser.parse_args()
    files = layer_files(args.mb)
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        pause = push_images(registry).pause
        runtimes: list[Runtime] = [Crishim(base)]
        if args.only is None:
            if not Containerd.available():
                raise SystemExit("containerd is not installed (apt-get install containerd)")
            runtimes.append(Containerd(base, registry.host, pause))
        times: dict[str, list[float]] = {r.name: [] for r in runtimes}
        blobs = 0
        try:
            for runtime in runtimes:
                runtime.start()
            for round_ in range(args.rounds):
                image = round_image(files, round_)
                push(registry.url, REPO, f"r{round_}", image)
                ref = f"{registry.host}/{REPO}:r{round_}"
                if round_ == 0:
                    blobs = sum(layer.size for layer in image.layers)
                    print(
                        f"image: {len(image.layers)} layers, {blobs / 1e6:.1f} MB compressed, "
                        f"{sum(len(layer.tar) for layer in image.layers) / 1e6:.1f} MB unpacked"
                    )
                os.sync()
                # Alternate who goes first, so neither always meets a warmer machine.
                order = runtimes if round_ % 2 == 0 else runtimes[::-1]
                line = []
                for runtime in order:
                    took = asyncio.run(pull_once(runtime, ref, image))
                    times[runtime.name].append(took)
                    wait_until_gone(runtime, image)
                    os.sync()
                    line.append(f"{runtime.name} {took:6.2f} s")
                print(f"round {round_}: {'   '.join(line)}", flush=True)
        finally:
            for runtime in runtimes:
                runtime.stop()
    medians = {name: report(name, t, blobs) for name, t in times.items()}
    if "containerd" in medians:
        ratio = medians["crishim"] / medians["containerd"]
        print(f"crishim / containerd time ratio: {ratio:.2f} (below 1: crishim faster)")


if __name__ == "__main__":
    main()
