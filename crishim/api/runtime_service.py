"""The CRI RuntimeService servicer: decodes requests, calls services, encodes replies."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from grpclib.const import Handler

from crishim.api import convert, v1
from crishim.api.codec import PreEncoded
from crishim.api.encoded import EncodedItems
from crishim.api.instrument import CallTracker, StreamHandler, build_mapping
from crishim.model import Container, Record, Sandbox
from crishim.services.containers import ContainerService
from crishim.services.runtime_info import RuntimeInfo
from crishim.services.sandboxes import SandboxService

LIST_POD_SANDBOX = "/runtime.v1.RuntimeService/ListPodSandbox"
LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"
# ListPodSandboxResponse.items and ListContainersResponse.containers are field 1.
_LIST_FIELD = 1
# Cached encodings of removed objects tolerated before the cache is pruned.
_PRUNE_SLACK = 64
# The version of the kubelet-runtime API itself, as every CRI runtime reports it.
KUBE_RUNTIME_API_VERSION = "0.1.0"

R = TypeVar("R", bound=Record)


class _Listing(Protocol):
    def count(self) -> int: ...

    def ids(self) -> list[str]: ...


class RuntimeServicer(v1.RuntimeServiceBase):
    """RuntimeService over crishim's services. RPCs not overridden answer UNIMPLEMENTED."""

    def __init__(
        self,
        info: RuntimeInfo,
        sandboxes: SandboxService,
        containers: ContainerService,
        tracker: CallTracker,
    ) -> None:
        self._info = info
        self._sandboxes = sandboxes
        self._containers = containers
        self._tracker = tracker
        self._encoded_sandboxes: EncodedItems[Sandbox] = EncodedItems(
            _LIST_FIELD, lambda s: bytes(convert.pod_sandbox(s))
        )
        self._encoded_containers: EncodedItems[Container] = EncodedItems(
            _LIST_FIELD, lambda c: bytes(convert.container(c))
        )

    def __mapping__(self) -> dict[str, Handler]:
        overrides: dict[str, StreamHandler] = {
            LIST_POD_SANDBOX: self._list_pod_sandbox_encoded,
            LIST_CONTAINERS: self._list_containers_encoded,
        }
        return build_mapping(self, v1.RuntimeServiceBase, self._tracker, overrides)

    async def version(self, message: v1.VersionRequest) -> v1.VersionResponse:
        info = self._info.version()
        return v1.VersionResponse(
            version=KUBE_RUNTIME_API_VERSION,
            runtime_name=info.runtime_name,
            runtime_version=info.runtime_version,
            runtime_api_version=info.runtime_api_version,
        )

    async def status(self, message: v1.StatusRequest) -> v1.StatusResponse:
        return convert.status_response(await self._info.status(message.verbose))

    async def runtime_config(self, message: v1.RuntimeConfigRequest) -> v1.RuntimeConfigResponse:
        return v1.RuntimeConfigResponse(
            linux=v1.LinuxRuntimeConfiguration(
                cgroup_driver=convert.cgroup_driver(self._info.cgroup_driver())
            )
        )

    async def _list_pod_sandbox_encoded(self, stream: Any) -> None:
        request: v1.ListPodSandboxRequest = await stream.recv_message()
        items = self._sandboxes.matching(convert.sandbox_filter(request.filter))
        await stream.send_message(
            PreEncoded(_join(self._encoded_sandboxes, items, self._sandboxes))
        )

    async def _list_containers_encoded(self, stream: Any) -> None:
        request: v1.ListContainersRequest = await stream.recv_message()
        items = self._containers.matching(convert.container_filter(request.filter))
        await stream.send_message(
            PreEncoded(_join(self._encoded_containers, items, self._containers))
        )


def _join(cache: EncodedItems[R], items: list[R], source: _Listing) -> bytes:
    """The encoded reply for ``items``, pruning the cache once it holds many dead ids."""
    data = cache.join(items)
    if len(cache) > source.count() + _PRUNE_SLACK:
        cache.prune(source.ids())
    return data
