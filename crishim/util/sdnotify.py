"""systemd's readiness protocol (``sd_notify``) without libsystemd.

A service of ``Type=notify`` tells systemd its state by sending datagrams such as
``READY=1`` to the unix socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in
the abstract namespace. Outside systemd the variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager that started this process, if any."""

    def __init__(self, address: str | None) -> None:
        self._address = address or None

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``, taken out of the environment: the processes
        crishim starts (runtimes, conmon, CNI plugins) must not talk to systemd as crishim."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when none was sent.

        Errors are logged, never raised: readiness is a courtesy to systemd, not a reason
        for crishim to stop.
        """
        if self._address is None:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self._address, exc)
            return False
        return True
