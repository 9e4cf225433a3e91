"""CNI results: what a plugin chain printed, normalised across CNI versions 0.1-1.0."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CniResult",
    "Dns",
    "Interface",
    "IpConfig",
    "Route",
    "parse_result",
    "pod_ips",
    "version_tuple",
]


@dataclass(frozen=True)
class Interface:
    """An interface a plugin created; ``sandbox`` is set when it lives in the pod's netns."""

    name: str
    mac: str | None = None
    sandbox: str | None = None


@dataclass(frozen=True)
class IpConfig:
    """An address with its prefix ("10.0.0.5/24"), gateway and index into ``interfaces``."""

    address: str
    gateway: str | None = None
    interface: int | None = None

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_interface(self.address).version

    @property
    def ip(self) -> str:
        """The address without its prefix length."""
        return str(ipaddress.ip_interface(self.address).ip)


@dataclass(frozen=True)
class Route:
    """A route the plugin set up in the pod."""

    dst: str
    gw: str | None = None


@dataclass(frozen=True)
class Dns:
    """DNS settings a plugin suggests (most plugins leave them empty)."""

    nameservers: list[str] = field(default_factory=list)
    domain: str | None = None
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class CniResult:
    """A plugin chain's result, normalised across CNI versions; ``raw`` is what it printed."""

    cni_version: str
    interfaces: list[Interface]
    ips: list[IpConfig]
    routes: list[Route]
    dns: Dns
    raw: dict[str, Any]


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def _str_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _optional_str(value: object) -> str | None:
    return str(value) if isinstance(value, str) and value else None


def parse_result(raw: object) -> CniResult:
    """Normalise a result of any CNI version; ValueError says what is malformed.

    0.3.x-1.0.0 results share the ``ips``/``interfaces``/``routes`` shape (0.3.x's per-ip
    "version" is ignored: the address says it); 0.1/0.2 results with ``ip4``/``ip6`` are
    converted to it.
    """
    if not isinstance(raw, dict):
        raise ValueError("result is not a JSON object")
    version = str(raw.get("cniVersion", ""))
    routes: list[Route] = []
    ips: list[IpConfig] = []
    if "ips" in raw or "interfaces" in raw or version_tuple(version) >= (0, 3):
        ip_entries = raw.get("ips") or []
        route_entries = raw.get("routes") or []
    else:
        ip_entries = []
        route_entries = []
        for key in ("ip4", "ip6"):
            legacy = raw.get(key)
            if isinstance(legacy, dict):
                ip_entries.append({"address": legacy.get("ip"), "gateway": legacy.get("gateway")})
                route_entries.extend(legacy.get("routes") or [])
    if not isinstance(ip_entries, list) or not isinstance(route_entries, list):
        raise ValueError("'ips' and 'routes' must be lists")
    for entry in ip_entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise ValueError(f"ip entry {entry!r} has no 'address'")
        try:
            ipaddress.ip_interface(entry["address"])
        except ValueError:
            raise ValueError(f"ip entry address {entry['address']!r} is not an address") from None
        index = entry.get("interface")
        ips.append(
            IpConfig(
                address=entry["address"],
                gateway=_optional_str(entry.get("gateway")),
                interface=index if isinstance(index, int) else None,
            )
        )
    for entry in route_entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("dst"), str):
            raise ValueError(f"route {entry!r} has no 'dst'")
        routes.append(Route(dst=entry["dst"], gw=_optional_str(entry.get("gw"))))
    interfaces = []
    for entry in raw.get("interfaces") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"interface {entry!r} has no 'name'")
        interfaces.append(
            Interface(
                name=entry["name"],
                mac=_optional_str(entry.get("mac")),
                sandbox=_optional_str(entry.get("sandbox")),
            )
        )
    dns_raw = raw.get("dns")
    dns = Dns()
    if isinstance(dns_raw, dict):
        dns = Dns(
            nameservers=_str_list(dns_raw.get("nameservers")),
            domain=_optional_str(dns_raw.get("domain")),
            search=_str_list(dns_raw.get("search")),
            options=_str_list(dns_raw.get("options")),
        )
    return CniResult(version, interfaces, ips, routes, dns, raw)


def pod_ips(result: CniResult) -> list[str]:
    """The pod's addresses (no prefix), primary first.

    Addresses on host-side interfaces (those without a ``sandbox``) are not the pod's. As
    containerd does, the first IPv4 address is the primary one, so dual-stack pods keep a
    stable primary whatever order the plugins list their addresses in.
    """

    def in_pod(ip: IpConfig) -> bool:
        index = ip.interface
        if index is None or not 0 <= index < len(result.interfaces):
            return True
        return result.interfaces[index].sandbox is not None

    ips = [ip for ip in result.ips if in_pod(ip)]
    ordered = [ip for ip in ips if ip.family == 4] + [ip for ip in ips if ip.family == 6]
    return list(dict.fromkeys(ip.ip for ip in ordered))
