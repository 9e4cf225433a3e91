"""StatsService over a fake v2 cgroup tree and fake /proc: attribution, pods, writable layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crishim.errors import NotFound
from crishim.model.container import Container, ContainerFilter, ContainerMetadata, ContainerState
from crishim.model.sandbox import PodMetadata, Sandbox, SandboxFilter, SandboxState
from crishim.services.stats import SnapshotUsage, StatsService


@dataclass(frozen=True)
class _Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass
class Fakes:
    """Container and sandbox records, and a snapshotter answering with fixed mounts."""

    containers: list[Container] = field(default_factory=list)
    sandboxes: list[Sandbox] = field(default_factory=list)
    snapshot_mounts: dict[str, list[_Mount]] = field(default_factory=dict)

    def get(self, object_id: str) -> Container:
        return next(c for c in self.containers if c.id == object_id)

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        return [c for c in self.containers if criteria.matches(c)]

    def mounts(self, key: str) -> Sequence[_Mount]:
        if key not in self.snapshot_mounts:
            raise NotFound(key)
        return self.snapshot_mounts[key]

    def mountpoint(self) -> str:
        return "/var/lib/crishim/snapshots"


@dataclass
class Pods:
    sandboxes: list[Sandbox]

    def get(self, sandbox_id: str) -> Sandbox:
        return next(s for s in self.sandboxes if s.id == sandbox_id)

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        return [s for s in self.sandboxes if criteria.matches(s)]


class Measured(Fakes):
    """A snapshotter that measures snapshots itself."""

    def usage_of(self, key: str) -> tuple[int, int]:
        return (4096, 2) if key in self.snapshot_mounts else (0, 0)


def _container(cid: str, pid: int, state: ContainerState = ContainerState.RUNNING) -> Container:
    return Container(
        id=cid,
        sandbox_id="pod1",
        metadata=ContainerMetadata(name=cid),
        image="sha256:1",
        state=state,
        created_at=1,
        pid=pid,
    )


def _cgroup(root: Path, pid: int, path: str, usage_usec: int, memory: int) -> None:
    directory = root / "unified" / path.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.stat").write_text(f"usage_usec {usage_usec}\n")
    (directory / "memory.current").write_text(f"{memory}\n")
    (directory / "pids.current").write_text("1\n")
    if pid:
        (root / "proc" / str(pid)).mkdir(parents=True)
        (root / "proc" / str(pid) / "cgroup").write_text(f"0::{path}\n")


def _service(root: Path, fakes: Fakes, sandboxes: list[Sandbox]) -> StatsService:
    mountinfo = root / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw\n")
    return StatsService(fakes, Pods(sandboxes), fakes, mountinfo=mountinfo, proc=root / "proc")


def _sandbox(cgroup_parent: str) -> Sandbox:
    return Sandbox(
        id="pod1",
        metadata=PodMetadata(name="p", uid="u", namespace="ns"),
        created_at=1,
        cgroup_parent=cgroup_parent,
        host_network=True,
    )


async def test_containers_pods_with_and_without_parent(tmp_path: Path) -> None:
    _cgroup(tmp_path, 10, "/kubepods/pod1/crishim-aaa", usage_usec=5, memory=100)
    _cgroup(tmp_path, 11, "/kubepods/pod1/crishim-bbb", usage_usec=7, memory=200)
    _cgroup(tmp_path, 0, "/kubepods/pod1", usage_usec=20, memory=1000)
    # ccc's pid was reused by a process of another cgroup: not ccc's numbers.
    _cgroup(tmp_path, 12, "/system.slice/sshd.service", usage_usec=99, memory=9)
    fakes = Fakes(
        containers=[
            _container("aaa", 10),
            _container("bbb", 11, ContainerState.CREATED),
            _container("ccc", 12),
            _container("ddd", 13, ContainerState.EXITED),
        ]
    )

    listed = await _service(tmp_path, fakes, []).list_container_stats(ContainerFilter())
    with_parent = await _service(tmp_path, fakes, [_sandbox("/kubepods/pod1")]).pod_stats("pod1")
    without = await _service(tmp_path, fakes, [_sandbox("")]).list_pod_stats(SandboxFilter())

    by_id = {s.attributes.id: s for s in listed}
    assert set(by_id) == {"aaa", "bbb", "ccc"}  # exited ones are not listed
    assert by_id["aaa"].cpu is not None
    assert by_id["aaa"].cpu.usage_core_nano_seconds == 5000
    assert by_id["aaa"].cpu.usage_nano_cores is None
    assert by_id["ccc"].cpu is None
    assert with_parent.cpu is not None
    assert with_parent.cpu.usage_core_nano_seconds == 20_000
    assert with_parent.network is None  # host network
    assert len(without) == 1
    assert without[0].cpu is not None
    assert without[0].cpu.usage_core_nano_seconds == 12_000  # aaa + bbb
    assert without[0].memory is not None
    assert without[0].memory.working_set_bytes == 300
    assert without[0].process is not None
    assert without[0].process.process_count == 2
    not_ready = SandboxFilter(state=SandboxState.NOTREADY)
    assert await _service(tmp_path, fakes, [_sandbox("")]).list_pod_stats(not_ready) == []


async def test_writable_layer_from_overlay_upperdir_or_the_snapshotter(tmp_path: Path) -> None:
    upper = tmp_path / "snapshots" / "7" / "fs"
    (upper / "tmp").mkdir(parents=True)
    (upper / "tmp" / "written").write_bytes(b"x" * 10_000)
    overlay = _Mount("overlay", "overlay", ("lowerdir=/a:/b", f"upperdir={upper}", "workdir=/w"))
    fakes = Fakes(
        containers=[_container("aaa", 0), _container("bbb", 0)],
        snapshot_mounts={"aaa": [overlay]},
    )
    measured = Measured(containers=fakes.containers, snapshot_mounts={"aaa": [overlay]})

    walked = await _service(tmp_path, fakes, []).container_stats("aaa")
    missing = await _service(tmp_path, fakes, []).container_stats("bbb")
    asked = await _service(tmp_path, measured, []).container_stats("aaa")

    assert walked.writable_layer is not None
    assert walked.writable_layer.mountpoint == "/var/lib/crishim/snapshots"
    assert walked.writable_layer.inodes_used == 3  # fs, tmp, written
    assert (walked.writable_layer.used_bytes or 0) >= 10_000
    assert missing.writable_layer is None
    assert isinstance(measured, SnapshotUsage)
    assert asked.writable_layer is not None
    assert (asked.writable_layer.used_bytes, asked.writable_layer.inodes_used) == (4096, 2)
