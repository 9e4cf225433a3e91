"""Finding host binaries and asking them their version."""

from __future__ import annotations

from dataclasses import dataclass

from crishim.errors import DeadlineExceeded, FailedPrecondition
from crishim.util import proc


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
    return proc.find_program(name_or_path)


async def probe_binary(name_or_path: str, timeout: float = 5.0) -> BinaryInfo:
    """Resolve a binary and run ``--version``; its first line is the version."""
    path = resolve_binary(name_or_path)
    if path is None:
        return BinaryInfo(name_or_path, None, error=f"{name_or_path}: not found")
    try:
        done = await proc.run([path, "--version"], what=name_or_path, timeout=timeout)
    except FailedPrecondition as exc:
        return BinaryInfo(name_or_path, path, error=f"{path}: cannot run: {exc}")
    except DeadlineExceeded:
        return BinaryInfo(name_or_path, path, error=f"{path} --version: no answer in {timeout}s")
    lines = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    if done.returncode != 0:
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        return BinaryInfo(name_or_path, path, error=f"{path} --version failed: {detail}")
    return BinaryInfo(name_or_path, path, version=lines[0] if lines else "")
