"""A new user namespace with its ID maps, held by a short-lived process.

A multithreaded process such as crishim cannot ``unshare(CLONE_NEWUSER)`` (the kernel
refuses), and ``setns`` into a user namespace is refused to it too. So a child makes it:
``unshare(1)`` creates the user namespace and, in the same call, the other namespaces asked
for, which the new user namespace then owns (what lets the pod's root set its network
sysctls and mount sysfs). crishim, root in the parent namespace, writes the child's
``uid_map`` and ``gid_map`` (any mapping, in one write each), and may then pin or open
``/proc/<pid>/ns/*``. Leaving the block ends the child; pinned namespaces live on.

Usage::

    async with user_namespace_holder(uid_map, gid_map, ("--net",)) as pid:
        ...  # /proc/<pid>/ns/{user,net} are the new namespaces
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from crishim.errors import Internal
from crishim.util import proc

__all__ = ["user_namespace_holder"]

# After unshare(1) has made the namespaces, the shell says so and waits for its stdin to
# close (crishim's end of the pipe): the holder never outlives crishim.
_HOLD = ("/bin/sh", "-c", "echo ready; read _ || true")


@contextlib.asynccontextmanager
async def user_namespace_holder(
    uid_map: str, gid_map: str, other_namespaces: Sequence[str] = ()
) -> AsyncIterator[int]:
    """A child in a new user namespace (and the ``other_namespaces``, as unshare(1) flags
    such as ``--net``) with the given maps written; yields its pid. Internal on failure."""
    child = proc.spawn(
        ["unshare", "--user", *other_namespaces, "--", *_HOLD],
        what="unshare (util-linux), which makes user namespaces",
        remedy="install util-linux",
        stdin=proc.PIPE,
        stdout=proc.PIPE,
        stderr=proc.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await child.read(child.stdout)
        if not line.startswith(b"ready"):
            child.close_stdin()
            err = await child.read_all(child.stderr, 4096)
            code = await child.wait()
            raise Internal(
                f"making a user namespace: unshare exited {code}: "
                f"{err.decode(errors='replace').strip() or 'no message'}"
            )
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            _write_map(f"/proc/{child.pid}/{name}", text)
        yield child.pid
    finally:
        child.close_stdin()
        if child.returncode is None:
            child.kill()
        await child.wait()
        child.close()


def _write_map(path: str, text: str) -> None:
    # A write to /proc is quick and never blocks on a disk.
    try:
        with open(path, "w") as file:
            file.write(text)
    except OSError as exc:
        raise Internal(f"writing {path} ({text.strip()!r}): {exc.strerror}") from None
