"""User namespaces of pods (``hostUsers: false``): which requests are valid, and the ID maps.

A pod in mode POD gets a user namespace of its own with the UID and GID mappings kubelet
chose (65536 IDs at a multiple of 65536 on the node); every container of the pod joins it,
so a container must ask for the same mappings as its pod (or nothing). Mode NODE (or
no options) is the node's user namespace; CONTAINER and TARGET do not exist for users.

Rules checked here, each refused with an InvalidArgument naming the problem: mappings
present for POD and only for POD, at most 340 lines (the kernel's limit), every range
non-empty and inside the 32-bit ID space (the top ID, 4294967295, is never valid), no two
ranges overlapping on the container side or on the node side, and container ID 0 mapped
(runtimes start the container's process as root of the namespace before they switch user).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from crishim.errors import InvalidArgument
from crishim.model.specs import IdMapping, NamespaceMode, NamespaceOptions, UserNamespace

__all__ = [
    "MAX_MAP_LINES",
    "check_container_userns",
    "check_mount_mappings",
    "host_id_of",
    "id_map_text",
    "pod_userns",
]

# The kernel takes at most this many lines in /proc/<pid>/uid_map (since Linux 4.15).
MAX_MAP_LINES = 340
# IDs are 32 bits; (uid_t)-1 means "no ID" and cannot be mapped.
_ID_LIMIT = 1 << 32
_INVALID_ID = _ID_LIMIT - 1


def pod_userns(options: NamespaceOptions) -> UserNamespace | None:
    """The pod's user namespace when it asks for one of its own (mode POD), validated;
    None for the node's. Raises InvalidArgument for a request that cannot be honoured."""
    userns = options.userns_options
    if userns is None or userns.mode is NamespaceMode.NODE:
        if userns is not None and (userns.uids or userns.gids):
            raise InvalidArgument("user namespace mode NODE takes no UID/GID mappings")
        return None
    if userns.mode is not NamespaceMode.POD:
        raise InvalidArgument(
            f"user namespace mode {userns.mode.name} is not supported: a pod uses the node's "
            "user namespace (NODE) or one of its own (POD)"
        )
    for kind, mode in (("network", options.network), ("IPC", options.ipc), ("PID", options.pid)):
        if mode is NamespaceMode.NODE:
            raise InvalidArgument(
                f"a pod with its own user namespace cannot use the node's {kind} namespace"
            )
    _check_mappings("UID", userns.uids)
    _check_mappings("GID", userns.gids)
    return userns


def check_container_userns(container: NamespaceOptions | None, pod: UserNamespace | None) -> None:
    """A container joins its pod's user namespace: its own options, when it has any, must
    ask for that one (same mode, same mappings). Raises InvalidArgument otherwise."""
    asked = container.userns_options if container is not None else None
    if asked is None:
        return
    mode = asked.mode
    if pod is None:
        if mode is not NamespaceMode.NODE:
            raise InvalidArgument(
                f"container asks for user namespace mode {mode.name}, "
                "but its pod uses the node's user namespace"
            )
        return
    if mode is not NamespaceMode.POD:
        raise InvalidArgument(
            f"container asks for user namespace mode {mode.name}, but its pod has its own "
            "user namespace, which every container of the pod joins"
        )
    if _normal(asked.uids) != _normal(pod.uids) or _normal(asked.gids) != _normal(pod.gids):
        raise InvalidArgument(
            "container's user namespace mappings differ from its pod's "
            f"(container uids {_show(asked.uids)} gids {_show(asked.gids)}, "
            f"pod uids {_show(pod.uids)} gids {_show(pod.gids)})"
        )


def check_mount_mappings(
    path: str, uids: Sequence[IdMapping], gids: Sequence[IdMapping], pod: UserNamespace | None
) -> bool:
    """Whether a mount is to be ID-mapped. Mounts are mapped with the pod's user namespace,
    so their mappings must be the pod's; InvalidArgument otherwise (naming ``path``)."""
    if not uids and not gids:
        return False
    if pod is None:
        raise InvalidArgument(
            f"mount {path}: ID-mapped mounts need a pod with its own user namespace"
        )
    if _normal(uids) != _normal(pod.uids) or _normal(gids) != _normal(pod.gids):
        raise InvalidArgument(
            f"mount {path}: its UID/GID mappings differ from the pod's user namespace "
            f"(mount uids {_show(uids)} gids {_show(gids)}, pod uids {_show(pod.uids)} "
            f"gids {_show(pod.gids)})"
        )
    return True


def id_map_text(mappings: Sequence[IdMapping]) -> str:
    """The mappings as ``/proc/<pid>/uid_map`` takes them (one write, one line each)."""
    return "".join(f"{m.container_id} {m.host_id} {m.length}\n" for m in mappings)


def host_id_of(container_id: int, mappings: Sequence[IdMapping]) -> int:
    """The node's ID for ``container_id``; InvalidArgument when it is not mapped."""
    for m in mappings:
        if m.container_id <= container_id < m.container_id + m.length:
            return m.host_id + container_id - m.container_id
    raise InvalidArgument(f"ID {container_id} is not mapped into the user namespace")


def _check_mappings(kind: str, mappings: Sequence[IdMapping]) -> None:
    if not mappings:
        raise InvalidArgument(f"user namespace mode POD needs {kind} mappings; none were given")
    if len(mappings) > MAX_MAP_LINES:
        raise InvalidArgument(
            f"{len(mappings)} {kind} mappings: the kernel takes at most {MAX_MAP_LINES}"
        )
    for m in mappings:
        if m.length <= 0:
            raise InvalidArgument(f"{kind} mapping {_one(m)} is empty (length {m.length})")
        for side, start in (("container", m.container_id), ("host", m.host_id)):
            if start < 0 or start + m.length > _INVALID_ID:
                raise InvalidArgument(
                    f"{kind} mapping {_one(m)} does not fit in the {side} ID space "
                    f"(IDs 0..{_INVALID_ID - 1})"
                )
    for side in ("container", "host"):
        ranges = sorted(
            ((m.container_id if side == "container" else m.host_id, m) for m in mappings),
            key=lambda pair: pair[0],
        )
        for (start_a, a), (start_b, b) in itertools.pairwise(ranges):
            if start_b < start_a + a.length:
                raise InvalidArgument(
                    f"{kind} mappings {_one(a)} and {_one(b)} overlap on the {side} side"
                )
    if not any(m.container_id == 0 for m in mappings):
        raise InvalidArgument(
            f"{kind} mappings {_show(mappings)} do not map container ID 0 (root of the pod)"
        )


def _normal(mappings: Sequence[IdMapping]) -> list[tuple[int, int, int]]:
    return sorted((m.container_id, m.host_id, m.length) for m in mappings)


def _one(m: IdMapping) -> str:
    return f"{m.container_id}:{m.host_id}:{m.length}"


def _show(mappings: Sequence[IdMapping]) -> str:
    return "[" + ", ".join(_one(m) for m in mappings) + "]"
