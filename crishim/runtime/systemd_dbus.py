"""A small client of systemd's manager over D-Bus (``org.freedesktop.systemd1.Manager``).

Only what the systemd cgroup driver needs: start a transient unit (a scope holding given
pids), stop a unit, set properties of a unit at run time, and reset a failed unit. Every
call that queues a job waits for the job's ``JobRemoved`` signal, so when it returns the
unit is in place (or gone) and its cgroup exists (or not).

The connection: the system bus, else systemd's private socket (``/run/systemd/private``,
root only, for nodes without dbus-daemon; systemd does not reliably answer the Hello a bus
client sends there first); made on first use and made again after systemd or the bus went
away (``daemon-reexec``). The library is
dbus-fast (asyncio, maintained, used by Home Assistant); the wire format stays behind this
module.

Errors: systemd's D-Bus errors become crishim's (``NoSuchUnit`` -> NotFound,
``UnitExists`` -> AlreadyExists, the rest Internal); no bus at all is Unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from crishim.errors import AlreadyExists, Internal, NotFound, Unavailable

__all__ = ["JOB_TIMEOUT", "Property", "SystemdManager", "property_value"]

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
PRIVATE_SOCKET = "/run/systemd/private"
# How long a queued job may take; systemd's own default start timeout is longer, but a scope
# or a property change is done in milliseconds unless systemd is stuck.
JOB_TIMEOUT = 30.0
# How long connecting may take. systemd's own socket does not always answer the Hello every
# bus client sends first (dbus-fast cannot skip it), so that one is only the fallback.
CONNECT_TIMEOUT = 5.0
# Results of jobs nobody waits for (yet): the signal can arrive before the reply is read.
_KEPT_RESULTS = 512
_JOB_REMOVED_RULE = (
    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',interface='{MANAGER}',"
    "member='JobRemoved'"
)
_ERRORS: dict[str, type[Internal] | type[NotFound] | type[AlreadyExists]] = {
    "org.freedesktop.systemd1.NoSuchUnit": NotFound,
    "org.freedesktop.systemd1.UnitExists": AlreadyExists,
}


@dataclass(frozen=True)
class Property:
    """One unit property as systemd takes it: a name and a D-Bus typed value."""

    name: str
    signature: str
    value: object


def property_value(prop: Property) -> list[object]:
    """The ``(sv)`` struct of a property."""
    return [prop.name, Variant(prop.signature, prop.value)]


class SystemdManager:
    """One connection to systemd, shared by every caller; safe to use concurrently."""

    def __init__(self, *, private_socket: str = PRIVATE_SOCKET) -> None:
        self._private_socket = private_socket
        self._bus: MessageBus | None = None
        self._connecting: asyncio.Lock | None = None
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._results: OrderedDict[str, str] = OrderedDict()
        self._via = ""

    # ---- calls ----------------------------------------------------------------------------

    async def start_transient_unit(self, name: str, properties: Sequence[Property]) -> None:
        """Create and start the transient unit ``name`` (mode "fail"); wait for its job."""
        job = await self._call(
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            [name, "fail", [property_value(p) for p in properties], []],
        )
        await self._wait_job(str(job[0]), f"start {name}")

    async def stop_unit(self, name: str) -> None:
        """Stop ``name`` and wait until it stopped; a unit systemd does not know is fine."""
        try:
            job = await self._call("StopUnit", "ss", [name, "replace"])
        except NotFound:
            return
        await self._wait_job(str(job[0]), f"stop {name}")

    async def set_unit_properties(self, name: str, properties: Sequence[Property]) -> None:
        """Change properties of a loaded unit for this boot only (``--runtime``)."""
        await self._call(
            "SetUnitProperties", "sba(sv)", [name, True, [property_value(p) for p in properties]]
        )

    async def reset_failed_unit(self, name: str) -> None:
        """Forget that ``name`` failed, so systemd unloads it; unknown or fine is fine."""
        try:
            await self._call("ResetFailedUnit", "s", [name])
        except NotFound:
            return

    async def ping(self) -> str:
        """Connect (if not yet) and say how: "private socket" or "system bus"."""
        await self._connection()
        return self._via

    async def close(self) -> None:
        """Close the connection (at shutdown)."""
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()

    # ---- plumbing -------------------------------------------------------------------------

    async def _call(self, member: str, signature: str, body: list[object]) -> list[object]:
        bus = await self._connection()
        reply = await bus.call(
            Message(
                destination=SYSTEMD,
                path=MANAGER_PATH,
                interface=MANAGER,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply.message_type == MessageType.ERROR:
            error = _ERRORS.get(reply.error_name or "", Internal)
            detail = reply.body[0] if reply.body else reply.error_name
            raise error(f"systemd {member} {body[0]}: {detail}")
        return list(reply.body)

    async def _wait_job(self, job: str, what: str) -> None:
        result = self._results.pop(job, None)
        if result is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[job] = waiter
            try:
                result = await asyncio.wait_for(waiter, JOB_TIMEOUT)
            except TimeoutError:
                raise Internal(f"systemd: {what}: job {job} not done in {JOB_TIMEOUT}s") from None
            finally:
                self._waiters.pop(job, None)
        if result != "done":
            raise Internal(f"systemd: {what}: job {result}")

    def _on_message(self, message: Message) -> None:
        if (
            message.message_type != MessageType.SIGNAL
            or message.interface != MANAGER
            or message.member != "JobRemoved"
        ):
            return
        _, job, _, result = message.body
        waiter = self._waiters.get(job)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(result)
            return
        self._results[job] = result
        while len(self._results) > _KEPT_RESULTS:
            self._results.popitem(last=False)

    async def _connection(self) -> MessageBus:
        if self._bus is not None and self._bus.connected:
            return self._bus
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._bus is not None and self._bus.connected:
                return self._bus
            self._bus = await self._connect()
            return self._bus

    async def _connect(self) -> MessageBus:
        problems: list[str] = []
        try:
            return await self._subscribe(MessageBus(bus_type=BusType.SYSTEM), direct=False)
        except Exception as exc:
            problems.append(f"system bus: {exc!r}")
        if os.geteuid() == 0 and os.path.exists(self._private_socket):
            try:
                return await self._subscribe(
                    MessageBus(bus_address=f"unix:path={self._private_socket}"), direct=True
                )
            except Exception as exc:
                problems.append(f"{self._private_socket}: {exc!r}")
        raise Unavailable("cannot reach systemd over D-Bus: " + "; ".join(problems))

    async def _subscribe(self, bus: MessageBus, *, direct: bool) -> MessageBus:
        await asyncio.wait_for(bus.connect(), CONNECT_TIMEOUT)
        try:
            bus.add_message_handler(self._on_message)
            if not direct:
                # On the bus, signals reach only those who asked; systemd's own socket sends
                # every subscriber its signals directly.
                await self._bus_call(bus, "AddMatch", [_JOB_REMOVED_RULE])
            reply = await bus.call(
                Message(
                    destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER, member="Subscribe"
                )
            )
            if reply.message_type == MessageType.ERROR:
                raise Internal(f"systemd Subscribe: {reply.body}")
        except BaseException:
            bus.disconnect()
            raise
        self._via = "private socket" if direct else "system bus"
        log.debug("connected to systemd (%s)", self._via)
        return bus

    @staticmethod
    async def _bus_call(bus: MessageBus, member: str, body: list[object]) -> None:
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature="s",
                body=body,
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise Internal(f"D-Bus {member}: {reply.body}")
