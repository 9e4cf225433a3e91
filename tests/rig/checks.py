"""Checks the pod and container tests share: CRI log files, listings, cgroups, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from grpclib import GRPCError

from crishim.api import v1
from tests.rig.pods import PodRig

HOST_PORT = 38215
# A CRI log line: RFC3339Nano time, stream, P(artial) or F(ull), the text.
LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) (P|F) (.*)$")
SLEEP = ["sleep", "1000"]
TICKER = ["sh", "-c", "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.2; done"]
UNLIMITED_V1 = 9223372036854771712


def container_linux(**security: Any) -> v1.LinuxContainerConfig:
    """A container's linux config as kubelet sends it, with security context fields (the
    rig fills in the pod's namespace options)."""
    return v1.LinuxContainerConfig(
        resources=v1.LinuxContainerResources(cpu_shares=2, oom_score_adj=1000),
        security_context=v1.LinuxContainerSecurityContext(**security),
    )


async def grpc_error(rig: PodRig, call: Awaitable[object]) -> GRPCError:
    """The GRPCError a pending call raises (fails if it succeeds)."""
    try:
        result = await call
    except GRPCError as exc:
        return exc
    pytest.fail(f"expected a gRPC error, got {result!r}{rig.log_tail()}")


def log_lines(path: Path) -> list[tuple[str, str, str, str]]:
    """The CRI log file's lines as (time, stream, tag, text)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        found.append((match[1], match[2], match[3], match[4]))
    return found


def texts(path: Path) -> list[str]:
    return [text for _, _, _, text in log_lines(path)]


async def has_text(path: Path, text: str) -> bool:
    return text in texts(path)


async def has_lines(path: Path, n: int) -> bool:
    return len(texts(path)) >= n


async def ids_matching(rig: PodRig, flt: v1.PodSandboxFilter) -> set[str]:
    reply = await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest(filter=flt))
    return {item.id for item in reply.items}


async def containers_matching(rig: PodRig, flt: v1.ContainerFilter) -> set[str]:
    reply = await rig.runtime.list_containers(v1.ListContainersRequest(filter=flt))
    return {item.id for item in reply.containers}


def host_cgroup_file(pid: int, controller: str, name: str) -> Path:
    """A cgroup v1 file of the process ``pid`` as the host sees it."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


async def container_pid(rig: PodRig, cid: str) -> int:
    reply = await rig.runtime.container_status(
        v1.ContainerStatusRequest(container_id=cid, verbose=True)
    )
    pid = json.loads(reply.info["info"])["pid"]
    assert isinstance(pid, int)
    assert pid > 0
    return pid
