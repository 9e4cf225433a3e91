"""The CNI network the tests give their runtimes: a bridge with host-local addresses, portmap
and loopback, on a bridge and subnet of the test's own (other tools use /etc/cni/net.d)."""

from __future__ import annotations

import json
from pathlib import Path


def bridge_conflist(name: str, bridge: str, subnet: str, ipam_dir: Path) -> str:
    """The conflist's JSON text; host-local keeps its leases in ``ipam_dir``."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "dataDir": str(ipam_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
        }
    )
