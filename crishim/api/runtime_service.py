"""The CRI RuntimeService servicer: decodes requests, calls services, encodes replies."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from grpclib.const import Handler

from crishim.api import convert, v1, wire
from crishim.api.codec import PreEncoded
from crishim.api.encoded import EncodedItems
from crishim.api.instrument import CallTracker, StreamHandler, build_mapping
from crishim.errors import DeadlineExceeded, InvalidArgument, Unavailable
from crishim.model import Container, ContainerFilter, Sandbox, SandboxFilter
from crishim.model.events import LifecycleEvent
from crishim.services.containers import ContainerService
from crishim.services.exec import ExecService
from crishim.services.metrics import metric_descriptors, pod_metrics
from crishim.services.runtime_info import RuntimeInfo
from crishim.services.sandboxes import SandboxService
from crishim.services.stats import StatsService
from crishim.streaming import StreamingServer
from crishim.streaming.backend import AttachRequest as StreamAttachRequest
from crishim.streaming.backend import ExecRequest as StreamExecRequest
from crishim.streaming.backend import PortForwardRequest as StreamPortForwardRequest

LIST_POD_SANDBOX = "/runtime.v1.RuntimeService/ListPodSandbox"
LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"
POD_SANDBOX_STATUS = "/runtime.v1.RuntimeService/PodSandboxStatus"
CONTAINER_STATUS = "/runtime.v1.RuntimeService/ContainerStatus"
# ListPodSandboxResponse.items and ListContainersResponse.containers are field 1, as are
# PodSandboxStatusResponse.status and ContainerStatusResponse.status.
_LIST_FIELD = 1
_STATUS_FIELD = 1
_MEMBER_STATUSES_FIELD = 3  # PodSandboxStatusResponse.containers_statuses
_TIMESTAMP_KEY = wire.varint(4 << 3)  # PodSandboxStatusResponse.timestamp, a varint
# The version of the kubelet-runtime API itself, as every CRI runtime reports it.
KUBE_RUNTIME_API_VERSION = "0.1.0"

T = TypeVar("T")


class RuntimeServicer(v1.RuntimeServiceBase):
    """RuntimeService over crishim's services. RPCs not overridden answer UNIMPLEMENTED."""

    def __init__(
        self,
        info: RuntimeInfo,
        sandboxes: SandboxService,
        containers: ContainerService,
        stats: StatsService,
        tracker: CallTracker,
        exec_service: ExecService | None = None,
        streaming: StreamingServer | None = None,
    ) -> None:
        self._info = info
        self._sandboxes = sandboxes
        self._containers = containers
        self._stats = stats
        self._tracker = tracker
        self._exec = exec_service or ExecService(containers, sandboxes)
        self._streaming = streaming
        self._encoded_sandboxes: EncodedItems[Sandbox] = EncodedItems(
            _LIST_FIELD, lambda s: wire.encode(convert.pod_sandbox(s)), sandboxes
        )
        self._encoded_containers: EncodedItems[Container] = EncodedItems(
            _LIST_FIELD, lambda c: wire.encode(convert.container(c)), containers
        )
        # Statuses are asked for over and over (kubelet, probes, critest) and change only
        # with the record: each record is encoded once.
        self._encoded_pod_status: EncodedItems[Sandbox] = EncodedItems(
            _STATUS_FIELD, lambda s: wire.encode(convert.pod_sandbox_status(s)), sandboxes
        )
        self._encoded_status: EncodedItems[Container] = EncodedItems(
            _STATUS_FIELD, lambda c: wire.encode(convert.container_status(c)), containers
        )
        self._encoded_member_status: EncodedItems[Container] = EncodedItems(
            _MEMBER_STATUSES_FIELD, lambda c: wire.encode(convert.container_status(c)), containers
        )

    def __mapping__(self) -> dict[str, Handler]:
        overrides: dict[str, StreamHandler] = {
            LIST_POD_SANDBOX: self._list_pod_sandbox_encoded,
            LIST_CONTAINERS: self._list_containers_encoded,
            POD_SANDBOX_STATUS: self._pod_sandbox_status_encoded,
            CONTAINER_STATUS: self._container_status_encoded,
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

    # ---- pod sandboxes ------------------------------------------------------------------

    async def run_pod_sandbox(self, message: v1.RunPodSandboxRequest) -> v1.RunPodSandboxResponse:
        config = convert.sandbox_config(message.config)
        sandbox = await self._sandboxes.run(config, message.runtime_handler)
        return v1.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    async def stop_pod_sandbox(
        self, message: v1.StopPodSandboxRequest
    ) -> v1.StopPodSandboxResponse:
        await self._sandboxes.stop(message.pod_sandbox_id)
        return v1.StopPodSandboxResponse()

    async def remove_pod_sandbox(
        self, message: v1.RemovePodSandboxRequest
    ) -> v1.RemovePodSandboxResponse:
        await self._sandboxes.remove(message.pod_sandbox_id)
        return v1.RemovePodSandboxResponse()

    async def pod_sandbox_status(
        self, message: v1.PodSandboxStatusRequest
    ) -> v1.PodSandboxStatusResponse:
        # kubelet's evented PLEG takes the pod's containers from this reply and caches them
        # under ``timestamp`` (nanoseconds): no await between the stamp and the reading.
        timestamp = time.time_ns()
        sandbox = self._sandboxes.get(message.pod_sandbox_id)
        members = self._containers.matching(ContainerFilter(sandbox_id=sandbox.id))
        info: dict[str, str] = {}
        if message.verbose:
            info["info"] = sandbox.model_dump_json()
        return v1.PodSandboxStatusResponse(
            status=convert.pod_sandbox_status(sandbox),
            info=info,
            containers_statuses=convert.container_statuses(members),
            timestamp=timestamp,
        )

    # ---- containers ---------------------------------------------------------------------

    async def create_container(
        self, message: v1.CreateContainerRequest
    ) -> v1.CreateContainerResponse:
        config = convert.container_config(message.config)
        container = await self._containers.create(message.pod_sandbox_id, config, None)
        return v1.CreateContainerResponse(container_id=container.id)

    async def start_container(self, message: v1.StartContainerRequest) -> v1.StartContainerResponse:
        await self._containers.start(message.container_id)
        return v1.StartContainerResponse()

    async def stop_container(self, message: v1.StopContainerRequest) -> v1.StopContainerResponse:
        await self._containers.stop(message.container_id, float(message.timeout))
        return v1.StopContainerResponse()

    async def remove_container(
        self, message: v1.RemoveContainerRequest
    ) -> v1.RemoveContainerResponse:
        await self._containers.remove(message.container_id)
        return v1.RemoveContainerResponse()

    async def container_status(
        self, message: v1.ContainerStatusRequest
    ) -> v1.ContainerStatusResponse:
        container = self._containers.get(message.container_id)
        status = convert.container_status(container)
        info: dict[str, str] = {}
        if message.verbose:
            info["info"] = json.dumps(
                {
                    "pid": container.pid,
                    "sandboxID": container.sandbox_id,
                    "runtimeHandler": container.runtime_handler,
                    "config": container.config,
                }
            )
        return v1.ContainerStatusResponse(status=status, info=info)

    async def update_container_resources(
        self, message: v1.UpdateContainerResourcesRequest
    ) -> v1.UpdateContainerResourcesResponse:
        await self._containers.update_resources(
            message.container_id, convert.linux_resources(message.linux)
        )
        return v1.UpdateContainerResourcesResponse()

    async def reopen_container_log(
        self, message: v1.ReopenContainerLogRequest
    ) -> v1.ReopenContainerLogResponse:
        await self._containers.reopen_log(message.container_id)
        return v1.ReopenContainerLogResponse()

    async def exec_sync(self, message: v1.ExecSyncRequest) -> v1.ExecSyncResponse:
        result = await self._containers.exec_sync(
            message.container_id, list(message.cmd), float(message.timeout)
        )
        if result.timed_out:
            raise DeadlineExceeded(
                f"command {message.cmd!r} in container {message.container_id} timed out "
                f"after {message.timeout}s"
            )
        return v1.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    # ---- stats --------------------------------------------------------------------------

    async def container_stats(self, message: v1.ContainerStatsRequest) -> v1.ContainerStatsResponse:
        found = await self._stats.container_stats(message.container_id)
        return v1.ContainerStatsResponse(stats=convert.container_stats(found))

    async def list_container_stats(
        self, message: v1.ListContainerStatsRequest
    ) -> v1.ListContainerStatsResponse:
        found = await self._stats.list_container_stats(
            convert.container_stats_filter(message.filter)
        )
        return v1.ListContainerStatsResponse(stats=[convert.container_stats(s) for s in found])

    async def pod_sandbox_stats(
        self, message: v1.PodSandboxStatsRequest
    ) -> v1.PodSandboxStatsResponse:
        found = await self._stats.pod_stats(message.pod_sandbox_id)
        return v1.PodSandboxStatsResponse(stats=convert.pod_sandbox_stats(found))

    async def list_pod_sandbox_stats(
        self, message: v1.ListPodSandboxStatsRequest
    ) -> v1.ListPodSandboxStatsResponse:
        found = await self._stats.list_pod_stats(convert.pod_stats_filter(message.filter))
        return v1.ListPodSandboxStatsResponse(stats=[convert.pod_sandbox_stats(s) for s in found])

    # ---- events, streamed lists, runtime config ------------------------------------------

    async def get_container_events(
        self, message: v1.GetEventsRequest
    ) -> AsyncIterator[v1.ContainerEventResponse]:
        async for event in self._containers.events.subscribe():
            yield self._event_response(event)

    @staticmethod
    def _event_response(event: LifecycleEvent) -> v1.ContainerEventResponse:
        """The event with the pod's state it was published with (not today's)."""
        return v1.ContainerEventResponse(
            container_id=event.container_id,
            container_event_type=v1.ContainerEventType(int(event.type)),
            created_at=event.created_at,
            pod_sandbox_status=(
                convert.pod_sandbox_status(event.sandbox) if event.sandbox is not None else None
            ),
            containers_statuses=convert.container_statuses(event.containers),
        )

    async def stream_pod_sandboxes(
        self, message: v1.StreamPodSandboxesRequest
    ) -> AsyncIterator[v1.StreamPodSandboxesResponse]:
        items = self._sandboxes.matching(convert.sandbox_filter(message.filter))
        for chunk in _chunks(items):
            yield v1.StreamPodSandboxesResponse(
                pod_sandboxes=[convert.pod_sandbox(s) for s in chunk]
            )

    async def stream_containers(
        self, message: v1.StreamContainersRequest
    ) -> AsyncIterator[v1.StreamContainersResponse]:
        items = self._containers.matching(convert.container_filter(message.filter))
        for chunk in _chunks(items):
            yield v1.StreamContainersResponse(containers=[convert.container(c) for c in chunk])

    async def stream_container_stats(
        self, message: v1.StreamContainerStatsRequest
    ) -> AsyncIterator[v1.StreamContainerStatsResponse]:
        found = await self._stats.list_container_stats(
            convert.container_stats_filter(message.filter)
        )
        for chunk in _chunks(found):
            yield v1.StreamContainerStatsResponse(
                container_stats=[convert.container_stats(s) for s in chunk]
            )

    async def stream_pod_sandbox_stats(
        self, message: v1.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[v1.StreamPodSandboxStatsResponse]:
        found = await self._stats.list_pod_stats(convert.pod_stats_filter(message.filter))
        for chunk in _chunks(found):
            yield v1.StreamPodSandboxStatsResponse(
                pod_sandbox_stats=[convert.pod_sandbox_stats(s) for s in chunk]
            )

    async def update_runtime_config(
        self, message: v1.UpdateRuntimeConfigRequest
    ) -> v1.UpdateRuntimeConfigResponse:
        network = message.runtime_config.network_config if message.runtime_config else None
        self._sandboxes.set_pod_cidr(network.pod_cidr if network else "")
        return v1.UpdateRuntimeConfigResponse()

    async def update_pod_sandbox_resources(
        self, message: v1.UpdatePodSandboxResourcesRequest
    ) -> v1.UpdatePodSandboxResourcesResponse:
        resources = convert.linux_resources(message.resources) if message.resources else None
        await self._sandboxes.update_resources(message.pod_sandbox_id, resources)
        return v1.UpdatePodSandboxResourcesResponse()

    # ---- streaming ----------------------------------------------------------------------

    async def exec(self, message: v1.ExecRequest) -> v1.ExecResponse:
        if self._streaming is None:
            raise Unavailable("the streaming server is not running")
        self._exec.check_exec(message.container_id, list(message.cmd))
        if not (message.stdin or message.stdout or message.stderr):
            raise InvalidArgument("exec: one of stdin, stdout and stderr must be set")
        url = self._streaming.create_exec_url(
            StreamExecRequest(
                container_id=message.container_id,
                cmd=list(message.cmd),
                tty=message.tty,
                stdin=message.stdin,
                stdout=message.stdout,
                stderr=message.stderr and not message.tty,
            )
        )
        return v1.ExecResponse(url=url)

    async def attach(self, message: v1.AttachRequest) -> v1.AttachResponse:
        if self._streaming is None:
            raise Unavailable("the streaming server is not running")
        self._exec.check_exec(message.container_id, ["attach"])
        url = self._streaming.create_attach_url(
            StreamAttachRequest(
                container_id=message.container_id,
                tty=message.tty,
                stdin=message.stdin,
                stdout=message.stdout,
                stderr=message.stderr and not message.tty,
            )
        )
        return v1.AttachResponse(url=url)

    async def port_forward(self, message: v1.PortForwardRequest) -> v1.PortForwardResponse:
        if self._streaming is None:
            raise Unavailable("the streaming server is not running")
        self._exec.check_port_forward(message.pod_sandbox_id)
        url = self._streaming.create_portforward_url(
            StreamPortForwardRequest(sandbox_id=message.pod_sandbox_id, ports=list(message.port))
        )
        return v1.PortForwardResponse(url=url)

    async def list_metric_descriptors(
        self, message: v1.ListMetricDescriptorsRequest
    ) -> v1.ListMetricDescriptorsResponse:
        return v1.ListMetricDescriptorsResponse(
            descriptors=[convert.metric_descriptor(d) for d in metric_descriptors()]
        )

    async def _pod_metrics(self) -> list[v1.PodSandboxMetrics]:
        found = []
        for pod in await self._stats.list_pod_stats(SandboxFilter()):
            members = self._containers.matching(ContainerFilter(sandbox_id=pod.attributes.id))
            images = {c.id: c.image_ref or c.image for c in members}
            found.append(convert.pod_sandbox_metrics(pod_metrics(pod, images=images)))
        return found

    async def list_pod_sandbox_metrics(
        self, message: v1.ListPodSandboxMetricsRequest
    ) -> v1.ListPodSandboxMetricsResponse:
        return v1.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def stream_pod_sandbox_metrics(
        self, message: v1.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[v1.StreamPodSandboxMetricsResponse]:
        for chunk in _chunks(await self._pod_metrics()):
            yield v1.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)

    async def _pod_sandbox_status_encoded(self, stream: Any) -> None:
        request: v1.PodSandboxStatusRequest = await stream.recv_message()
        if request.verbose:
            await stream.send_message(await self.pod_sandbox_status(request))
            return
        # As pod_sandbox_status: no await between the stamp and the reading.
        timestamp = time.time_ns()
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        members = convert.newest_first(
            self._containers.matching(ContainerFilter(sandbox_id=sandbox.id))
        )
        data = self._encoded_pod_status.join([sandbox])
        data += self._encoded_member_status.join(members)
        data += _TIMESTAMP_KEY + wire.varint(timestamp)
        await stream.send_message(PreEncoded(data))

    async def _container_status_encoded(self, stream: Any) -> None:
        request: v1.ContainerStatusRequest = await stream.recv_message()
        if request.verbose:
            await stream.send_message(await self.container_status(request))
            return
        container = self._containers.get(request.container_id)
        data = self._encoded_status.join([container])
        await stream.send_message(PreEncoded(data))

    async def _list_pod_sandbox_encoded(self, stream: Any) -> None:
        request: v1.ListPodSandboxRequest = await stream.recv_message()
        items = self._sandboxes.matching(convert.sandbox_filter(request.filter))
        await stream.send_message(PreEncoded(self._encoded_sandboxes.join(items)))

    async def _list_containers_encoded(self, stream: Any) -> None:
        request: v1.ListContainersRequest = await stream.recv_message()
        items = self._containers.matching(convert.container_filter(request.filter))
        await stream.send_message(PreEncoded(self._encoded_containers.join(items)))


# Items per message of a streamed list (each must stay well under gRPC's 16 MiB limit).
STREAM_CHUNK = 100


def _chunks(items: list[T]) -> list[list[T]]:
    return [items[i : i + STREAM_CHUNK] for i in range(0, len(items), STREAM_CHUNK)]
