"""Versioned JSON records written atomically.

A record file is ``{"version": N, "kind": "...", "object": {...}}``. It is written to a
temporary file in the same directory and renamed over the final name, so a reader (or
crishim after it was killed) sees the old record or the new one, never a mix. With
``sync`` the file and the directory are also fsynced before and after the rename, so the
record survives a power loss too. ``version`` is the record format; a reader refuses
versions it does not know.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crishim.util.disk import disk_full_as

RECORD_VERSION = 1


class RecordError(Exception):
    """A record file is unreadable, corrupt or of an unknown version; names the file."""


def write_record(path: Path, kind: str, obj: dict[str, Any], *, sync: bool = True) -> None:
    """Atomically replace ``path`` with a record of ``kind`` holding ``obj``."""
    data = json.dumps(
        {"version": RECORD_VERSION, "kind": kind, "object": obj}, separators=(",", ":")
    ).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_full_as(f"writing the {kind} record", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync:
            _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_record(path: Path, kind: str) -> dict[str, Any]:
    """The object stored in the record at ``path``, checked to be of ``kind``."""
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise RecordError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("object"), dict):
        raise RecordError(f"{path}: not a crishim record")
    if raw.get("version") != RECORD_VERSION:
        raise RecordError(f"{path}: record version {raw.get('version')!r} is not supported")
    if raw.get("kind") != kind:
        raise RecordError(f"{path}: holds a {raw.get('kind')!r} record, expected {kind!r}")
    obj: dict[str, Any] = raw["object"]
    return obj
