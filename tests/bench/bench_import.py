"""Benchmark: import a large image archive through ``crishim images import``.

The image of bench_pull (a busybox base and 5 layers of mixed compressible and random
files) is written as an OCI archive (gzip layers) and as a docker-archive (plain tar layers,
as ``docker save`` writes them). Each round imports one archive into a running crishim from
the command line, reading the file as ``kind load`` pipes it, then removes the image, so
every round stages, verifies and unpacks everything. crishim's peak memory is reported too:
the archive streams through, so it must not grow with the archive.

If containerd is installed, the same archives go through ``ctr images import`` (kind's
invocation) into a containerd on private paths, for comparison.

Run: ``python -m tests.bench.bench_import [--rounds 3] [--mb 200]``
"""

from __future__ import annotations

import argparse
import asyncio
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


def crishim_rounds(proc: CrishimProcess, archive: Path, image_id: str, rounds: int) -> list[float]:
    command = [sys.executable, "-m", "crishim.cli", "images", "import"]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with archive.open("rb") as source:
            subprocess.run(
                [*command, "--config", str(proc.config_file), "-"],
                stdin=source,
                check=True,
                capture_output=True,
            )
        times.append(time.perf_counter() - start)
        asyncio.run(remove(proc.socket, image_id))
    return times


def containerd_rounds(ctrd: Containerd, archive: Path, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        ctrd.ctr(
            "images",
            "import",
            "--all-platforms",
            "--digests",
            "--snapshotter=overlayfs",
            "-",
            stdin=archive.read_bytes(),
        )
        times.append(time.perf_counter() - start)
        ctrd.ctr("images", "rm", "--sync", NAME)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description="archive import benchmark")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    image, _ = make_image(args.mb)
    with tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        archives = {
            "oci": Path(tmp) / "oci.tar",
            "docker": Path(tmp) / "docker.tar",
        }
        archives["oci"].write_bytes(tar_bytes(oci_archive([(image, {IMAGE_NAME: NAME})])))
        archives["docker"].write_bytes(tar_bytes(docker_archive([(image, [NAME])])))
        proc = CrishimProcess(Path(tmp) / "crishim", config='log_level = "info"\n').start()
        assert proc.proc is not None
        try:
            idle = peak_rss_mb(proc.proc.pid)
            largest = max(a.stat().st_size for a in archives.values()) / 1e6
            for kind, archive in archives.items():
                size = archive.stat().st_size
                times = crishim_rounds(proc, archive, image.config_digest, args.rounds)
                report(f"crishim {kind}", times, size)
            print(
                f"crishim peak RSS: {idle:.0f} MB idle, {peak_rss_mb(proc.proc.pid):.0f} MB "
                f"after importing archives of up to {largest:.0f} MB"
            )
        finally:
            proc.terminate()
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            print("containerd: not installed on this machine, no comparison")
            return
        with containerd(Path(tmp) / "containerd") as ctrd:
            for kind, archive in archives.items():
                times = containerd_rounds(ctrd, archive, args.rounds)
                report(f"ctr {kind}", times, archive.stat().st_size)


if __name__ == "__main__":
    main()
