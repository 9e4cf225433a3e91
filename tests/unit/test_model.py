"""Model types: filters and legal transitions."""

from __future__ import annotations

from crishim.model import (
    Container,
    ContainerFilter,
    ContainerMetadata,
    ContainerState,
    PodMetadata,
    Sandbox,
    SandboxFilter,
    SandboxState,
    matches_selector,
)


def sandbox(sid: str, state: SandboxState = SandboxState.READY, **labels: str) -> Sandbox:
    return Sandbox(
        id=sid,
        metadata=PodMetadata(name="p", uid="u", namespace="ns"),
        state=state,
        created_at=1,
        labels=labels,
    )


def container(cid: str, sid: str, state: ContainerState, **labels: str) -> Container:
    return Container(
        id=cid,
        sandbox_id=sid,
        metadata=ContainerMetadata(name="c"),
        image="sha256:1",
        state=state,
        created_at=1,
        labels=labels,
    )


def test_selector_needs_every_pair() -> None:
    assert matches_selector({"a": "1", "b": "2"}, {"a": "1"})
    assert not matches_selector({"a": "1"}, {"a": "1", "b": "2"})
    assert not matches_selector({"a": "2"}, {"a": "1"})
    assert matches_selector({}, {})


def test_sandbox_filter_by_id_prefix_state_and_labels() -> None:
    ready = sandbox("abc123", app="web")
    stopped = sandbox("abd456", SandboxState.NOTREADY, app="web")
    assert SandboxFilter(id="abc").matches(ready)
    assert not SandboxFilter(id="abc").matches(stopped)
    assert SandboxFilter(state=SandboxState.NOTREADY).matches(stopped)
    assert not SandboxFilter(state=SandboxState.NOTREADY).matches(ready)
    assert SandboxFilter(label_selector={"app": "web"}).matches(stopped)
    assert not SandboxFilter(label_selector={"app": "db"}).matches(ready)
    assert SandboxFilter().matches(ready)


def test_container_filter_by_sandbox_and_state() -> None:
    running = container("c1", "s1", ContainerState.RUNNING, tier="a")
    exited = container("c2", "s2", ContainerState.EXITED)
    assert ContainerFilter(sandbox_id="s1").matches(running)
    assert not ContainerFilter(sandbox_id="s1").matches(exited)
    assert ContainerFilter(state=ContainerState.EXITED).matches(exited)
    assert not ContainerFilter(
        state=ContainerState.EXITED, id="c2", label_selector={"tier": "a"}
    ).matches(exited)


def test_only_a_created_container_can_start() -> None:
    assert container("c", "s", ContainerState.CREATED).can_start()
    for state in (ContainerState.RUNNING, ContainerState.EXITED, ContainerState.UNKNOWN):
        assert not container("c", "s", state).can_start()


def test_a_running_container_cannot_be_removed() -> None:
    assert not container("c", "s", ContainerState.RUNNING).can_remove()
    assert container("c", "s", ContainerState.EXITED).can_remove()
