"""Finding host binaries and asking them their version."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class BinaryInfo:
    """A binary as found on the host: where it is and the version it reports."""

    name: str
    path: str | None
    version: str = ""
    error: str = ""

    @property
    def found(self) -> bool:
        """True when the binary exists and is executable."""
        return self.path is not None


def resolve_binary(name_or_path: str) -> str | None:
    """The absolute path of an executable named by path or looked up on PATH."""
    if "/" in name_or_path:
        ok = os.path.isfile(name_or_path) and os.access(name_or_path, os.X_OK)
        return os.path.abspath(name_or_path) if ok else None
    return shutil.which(name_or_path)


async def probe_binary(name_or_path: str, timeout: float = 5.0) -> BinaryInfo:
    """Resolve a binary and run ``--version``; its first line is the version."""
    path = resolve_binary(name_or_path)
    if path is None:
        return BinaryInfo(name_or_path, None, error=f"{name_or_path}: not found")
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return BinaryInfo(name_or_path, path, error=f"{path}: cannot run: {exc.strerror}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return BinaryInfo(name_or_path, path, error=f"{path} --version: no answer in {timeout}s")
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        return BinaryInfo(name_or_path, path, error=f"{path} --version failed: {detail}")
    return BinaryInfo(name_or_path, path, version=lines[0] if lines else "")
