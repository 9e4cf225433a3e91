"""Benchmark: import a large image archive through ``crishim images import``.

The image of bench_pull (a busybox base and 5 layers of mixed compressible and random
files) is written as an OCI archive (gzip layers) and as a docker-archive (plain tar layers,
as ``docker save`` writes them). Each round imports one archive into a running crishim from
the command line, reading the file as ``kind load`` pipes it, then removes the image, so
every round stages, verifies and unpacks everything. crishim's peak memory is reported too:
the archive streams through, so it must not grow with the archive.

If containerd is installed, the same archives go through ``ctr images import`` (kind's
invocation) into a containerd on private paths, round for round alternating with crishim,
and the ratio of the medians is printed.

Run: ``python -m tests.bench.bench_import [--rounds 3] [--mb 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.bench_pull import make_image, report
from tests.rig.archives import IMAGE_NAME, docker_archive, oci_archive, tar_bytes
from tests.rig.containerd import Containerd, containerd
from tests.rig.crishim_proc import CrishimProcess

NAME = "docker.io/bench/import:v1"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def remove(socket: Path, image_id: str) -> None:
    channel = Channel(path=str(socket))
    try:
        request = v1.RemoveImageRequest(image=v1.ImageSpec(image=image_id))
        await v1.ImageServiceStub(channel).remove_image(request)
    finally:
        channel.close()


def crishim_round(proc: CrishimProcess, archive: Path, image_id: str) -> float:
    """One ``crishim images import -`` of ``archive``, timed; the image is removed after."""
    command = [sys.executable, "-m", "crishim.cli", "images", "import"]
    start = time.perf_counter()
    with archive.open("rb") as source:
        subprocess.run(
            [*command, "--config", str(proc.config_file), "-"],
            stdin=source,
            check=True,
            capture_output=True,
        )
    took = time.perf_counter() - start
    asyncio.run(remove(proc.socket, image_id))
    return took


def containerd_round(ctrd: Containerd, archive: Path) -> float:
    """One ``ctr images import`` as kind runs it, timed; the image is removed after."""
    command = ["ctr", "--address", str(ctrd.socket), "--namespace=k8s.io", "images", "import"]
    kind_flags = ["--all-platforms", "--digests", "--snapshotter=overlayfs", "-"]
    start = time.perf_counter()
    with archive.open("rb") as source:
        subprocess.run([*command, *kind_flags], stdin=source, check=True, capture_output=True)
    took = time.perf_counter() - start
    ctrd.ctr("images", "rm", "--sync", NAME)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description="archive import benchmark")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    image, _ = make_image(args.mb)
    compare = shutil.which("containerd") is not None and shutil.which("ctr") is not None
    if not compare:
        print("containerd: not installed on this machine, no comparison")
    with (
        tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        archives = {
            "oci": Path(tmp) / "oci.tar",
            "docker": Path(tmp) / "docker.tar",
        }
        archives["oci"].write_bytes(tar_bytes(oci_archive([(image, {IMAGE_NAME: NAME})])))
        archives["docker"].write_bytes(tar_bytes(docker_archive([(image, [NAME])])))
        proc = CrishimProcess(Path(tmp) / "crishim", config='log_level = "info"\n').start()
        stack.callback(proc.terminate)
        assert proc.proc is not None
        ctrd = stack.enter_context(containerd(Path(tmp) / "containerd")) if compare else None
        idle = peak_rss_mb(proc.proc.pid)
        largest = max(a.stat().st_size for a in archives.values()) / 1e6
        for kind, archive in archives.items():
            size = archive.stat().st_size
            ours: list[float] = []
            theirs: list[float] = []
            # Alternating, so both see the same state of a machine others share.
            for _ in range(args.rounds):
                ours.append(crishim_round(proc, archive, image.config_digest))
                if ctrd is not None:
                    theirs.append(containerd_round(ctrd, archive))
            ours_median = report(f"crishim {kind}", ours, size)
            if ctrd is not None:
                theirs_median = report(f"ctr {kind}", theirs, size)
                print(
                    f"{kind}: crishim / containerd time ratio {ours_median / theirs_median:.2f} "
                    "(below 1: crishim faster)"
                )
        print(
            f"crishim peak RSS: {idle:.0f} MB idle, {peak_rss_mb(proc.proc.pid):.0f} MB "
            f"after importing archives of up to {largest:.0f} MB"
        )


if __name__ == "__main__":
    main()
