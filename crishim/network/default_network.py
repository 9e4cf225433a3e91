"""crishim's built-in default network: a bridge with host-local addresses and portmap.

A fresh node has no CNI config until a cluster network plugin writes one; without a network
every pod but host-network ones would fail. While the conf dir holds no config file at all,
pods join this network instead. It exists only in memory and in the per-pod CNI cache
(never as a file in the conf dir, where a network plugin would take it for the node's
network); its addresses are leased in crishim's own root. Once a config file appears, new
pods get that network and pods already on the default keep it: the cache tells DEL what
they were set up with.

A conf dir holding only files that do not parse (a plugin halfway through writing its
config) does not bring the default back: that config is coming, so the node waits for it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crishim.config import Config

__all__ = ["DEFAULT_NETWORK_NAME", "DefaultNetwork", "default_network"]

DEFAULT_NETWORK_NAME = "crishim-default"
DEFAULT_CNI_VERSION = "1.0.0"


@dataclass(frozen=True)
class DefaultNetwork:
    """The built-in network's settings: its subnet, bridge and host-local data directory."""

    subnet: str
    bridge: str
    ipam_dir: Path

    @property
    def name(self) -> str:
        """The CNI network name (host-local keeps the leases in ``ipam_dir/<name>``)."""
        return DEFAULT_NETWORK_NAME

    @property
    def lease_dir(self) -> Path:
        """Where host-local records the addresses it handed out (one file per address)."""
        return self.ipam_dir / DEFAULT_NETWORK_NAME

    def conflist(self) -> dict[str, Any]:
        """The network list, as a conflist file would hold it."""
        network = ipaddress.ip_network(self.subnet)
        default_route = "0.0.0.0/0" if network.version == 4 else "::/0"
        return {
            "cniVersion": DEFAULT_CNI_VERSION,
            "name": DEFAULT_NETWORK_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # The bridge gets the subnet's first address and routes the pods out,
                    # masqueraded, as podman's and containerd's example networks do.
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": default_route}],
                        "dataDir": str(self.ipam_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            ],
        }

    def describe(self) -> str:
        """One line naming the network for Status and doctor."""
        return (
            f"crishim's built-in default network {DEFAULT_NETWORK_NAME!r} "
            f"(bridge {self.bridge}, subnet {self.subnet})"
        )


def default_network(config: Config) -> DefaultNetwork | None:
    """The built-in network ``config`` describes, or None when it is disabled."""
    settings = config.cni.default_network
    if not settings.enabled:
        return None
    return DefaultNetwork(
        subnet=settings.subnet, bridge=settings.bridge, ipam_dir=Path(config.root) / "cni-ipam"
    )
