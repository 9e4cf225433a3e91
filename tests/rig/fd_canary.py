"""Run ``crishim`` with canary threads that catch descriptors closed by someone else.

``python -m tests.rig.fd_canary --report FILE [--threads N] -- <crishim arguments>`` starts
N threads inside crishim's own process, then runs crishim's command line as usual. Each
thread keeps opening a file of its own, writing to it, checking the descriptor still names
that file (same inode) and reading back what it wrote. A descriptor that another part of
the process closes by mistake (a double close: the number was freed, this thread got it,
then the stray close hit it) shows up here as EBADF, as a descriptor that now names another
file, or as data that is not what was written. Each finding is one line in the report
file; ``iterations N`` lines record that the canaries really ran.

Linux hands out the lowest free descriptor number, so a thread that opens and closes
files in a tight loop is the likeliest to be handed a number that was just wrongly freed.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROUNDS_PER_FILE = 4


class Canary:
    """One checker thread's loop over its own files, with its findings."""

    def __init__(self, name: str, directory: Path, report: Path, lock: threading.Lock) -> None:
        self.name = name
        self.directory = directory
        self.report = report
        self.lock = lock
        self.iterations = 0

    def _found(self, what: str) -> None:
        with self.lock, self.report.open("a") as out:
            out.write(f"{self.name}: {what}\n")

    def _round(self) -> None:
        path = self.directory / f"{self.name}-{self.iterations % 4}"
        payload = f"{self.name} round {self.iterations}|".encode() * 32
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        inode = os.fstat(fd).st_ino
        closed = False
        try:
            for _ in range(ROUNDS_PER_FILE):
                if os.fstat(fd).st_ino != inode:
                    closed = True  # not ours any more: never close what someone else owns
                    self._found(f"fd {fd} of {path.name} now names another file")
                    return
                os.write(fd, payload)
                time.sleep(0)  # let other threads run while this descriptor is open
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            if data != payload * ROUNDS_PER_FILE:
                self._found(f"fd {fd} of {path.name} read back {len(data)} foreign bytes")
        except OSError as exc:
            if exc.errno == errno.EBADF:
                closed = True
                self._found(f"fd {fd} of {path.name} was closed under it (EBADF)")
                return
            raise
        finally:
            if not closed:
                try:
                    os.close(fd)
                except OSError as exc:
                    self._found(f"closing fd {fd} of {path.name}: {exc}")

    def run(self) -> None:
        while True:
            try:
                self._round()
            except Exception as exc:  # report, never die silently
                self._found(f"unexpected {type(exc).__name__}: {exc}")
            self.iterations += 1
            if self.iterations % 1000 == 0:
                with self.lock, self.report.open("a") as out:
                    out.write(f"iterations {self.name} {self.iterations}\n")


def start_canaries(report: Path, threads: int) -> list[Canary]:
    """Start ``threads`` daemon canary threads reporting into ``report``."""
    directory = Path(tempfile.mkdtemp(prefix="crishim-fd-canary-"))
    lock = threading.Lock()
    canaries = [Canary(f"canary{i}", directory, report, lock) for i in range(threads)]
    for canary in canaries:
        threading.Thread(target=canary.run, name=canary.name, daemon=True).start()
    return canaries


def main() -> int:
    parser = argparse.ArgumentParser(prog="fd_canary")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("crishim_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.crishim_args[1:] if args.crishim_args[:1] == ["--"] else args.crishim_args
    start_canaries(args.report, args.threads)
    from crishim.cli import main as crishim_main

    return crishim_main(rest)


if __name__ == "__main__":
    sys.exit(main())
