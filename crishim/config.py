"""crishim's configuration: pydantic models, TOML loading with drop-ins, and rendering.

Sources, later ones winning: built-in defaults, the main file (``/etc/crishim/crishim.toml``
unless ``--config`` names another), every ``*.toml`` in the drop-in directory next to it
(``crishim.d/``) in name order, then command-line flags. Tables merge key by key; any other
value is replaced whole. Each file is checked as it is merged, so an error names the file
that introduced it, the key and the problem.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crishim.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/crishim/crishim.toml")
DROP_IN_DIR_NAME = "crishim.d"

LogLevel = Literal["debug", "info", "warning", "error"]
CgroupDriver = Literal["cgroupfs", "systemd"]


_PORT_RE = re.compile(r"[0-9]{1,5}")


class _Section(BaseModel):
    """A config table: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    # ASCII digits only: str.isdigit() takes "²" (int() refuses it) and "١٢" (int() reads 12).
    if not sep or not host or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"must be host:port with a port from 0 to 65535, got {value!r}")
    return value


def _no_nul(value: str) -> str:
    # The OS takes paths as C strings: a NUL would fail every call that uses one.
    if "\0" in value:
        raise ValueError(f"must not contain a NUL character, got {value!r}")
    return value


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return _no_nul(value)


def _seconds(value: object) -> object:
    # Durations are plain numbers of seconds; say so to someone writing "4h" as in kubelet.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    return value


class RuntimeHandlerConfig(_Section):
    """One OCI runtime that pods can choose with their runtime handler."""

    path: str = Field(description="binary: an absolute path, or a name looked up on PATH")
    root: str = Field(
        default="",
        description="the runtime's own state directory (--root); empty: <state>/runtimes/<name>",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a binary")
        return _no_nul(value)

    @field_validator("root")
    @classmethod
    def _root_absolute(cls, value: str) -> str:
        return _absolute(value) if value else value


class RegistryConfig(_Section):
    """Where images come from."""

    config_path: str = Field(
        default="/etc/crishim/certs.d",
        description="directory of <host>/hosts.toml files in containerd's format (mirrors, TLS)",
    )

    @field_validator("config_path")
    @classmethod
    def _config_path_absolute(cls, value: str) -> str:
        return _absolute(value)


_INTERFACE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class DefaultNetworkConfig(_Section):
    """crishim's built-in network, used only while conf_dir holds no CNI config."""

    enabled: bool = Field(
        default=True,
        strict=True,
        description="serve pods on the built-in bridge network while conf_dir holds no config",
    )
    # Not 10.88.0.0/16 (podman, containerd's examples), 10.85.0.0/16 (CRI-O), 10.244.0.0/16
    # (flannel, kind), 10.96.0.0/12 (Kubernetes services), 172.17.0.0/16 (Docker) or
    # 192.168.0.0/16 (Calico). A /24 holds 253 pods, more than kubelet's 110 per node.
    subnet: str = Field(
        default="10.86.0.0/24",
        description="the pods' subnet (IPv4 or IPv6 CIDR); the bridge takes its first address",
    )
    bridge: str = Field(
        default="crishim0", description="the Linux bridge the pods' veths are attached to"
    )

    @field_validator("subnet")
    @classmethod
    def _subnet_is_a_network(cls, value: str) -> str:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"must be a CIDR subnet like 10.86.0.0/24, got {value!r}") from None
        if str(network) != value:
            raise ValueError(f"must name the network address: {network}, not {value!r}")
        # A gateway and at least one pod besides the network (and broadcast) address.
        if network.num_addresses < 4:
            raise ValueError(f"{value} is too small: it needs room for a gateway and pods")
        if network.prefixlen < (8 if network.version == 4 else 16):
            raise ValueError(f"{value} is too large for one node's pods")
        if (
            network.is_loopback
            or network.is_multicast
            or network.is_link_local
            or network.is_unspecified
            or network.is_reserved
        ):
            raise ValueError(f"{value} is a loopback, link-local, multicast or reserved range")
        return value

    @field_validator("bridge")
    @classmethod
    def _bridge_is_an_interface_name(cls, value: str) -> str:
        if not _INTERFACE_NAME_RE.fullmatch(value) or value in (".", ".."):
            raise ValueError(
                "must be a Linux interface name: 1 to 15 letters, digits, '_', '.' or '-', "
                f"got {value!r}"
            )
        return value


class CniConfig(_Section):
    """Pod networking through CNI plugins."""

    conf_dir: str = Field(
        default="/etc/cni/net.d",
        description="directory holding the network configuration (.conflist, .conf, .json)",
    )
    bin_dirs: list[str] = Field(
        default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"],
        description="directories searched, in order, for plugin binaries",
    )
    default_network: DefaultNetworkConfig = Field(default_factory=DefaultNetworkConfig)

    @field_validator("conf_dir")
    @classmethod
    def _conf_dir_absolute(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("bin_dirs")
    @classmethod
    def _bin_dirs_absolute(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one directory")
        return [_absolute(v) for v in value]


class StreamingConfig(_Section):
    """The HTTP server behind Exec, Attach and PortForward URLs."""

    address: str = Field(
        default="127.0.0.1:0",
        description="host:port to listen on; port 0 picks a free one",
    )
    # An idle SPDY session costs crishim about 0.35 MiB (its zlib contexts), up to about
    # 1 MiB with full buffers; an exec session also holds 4 file descriptors (socket, three
    # pipes) and a runtime process. 128 sessions: at most ~128 MiB and 512 descriptors, half
    # of systemd's default soft limit of 1024; far more than people and tools open at once.
    max_sessions: int = Field(
        default=128,
        ge=1,
        strict=True,
        description="exec/attach/port-forward sessions at once; more get 429 Too Many Requests",
    )
    # About 8 KiB each, plus up to 16 KiB of unfinished request head: 3 MiB at most.
    max_handshakes: int = Field(
        default=128,
        ge=1,
        strict=True,
        description="connections still sending their request; past it the oldest is dropped",
    )
    request_timeout: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        strict=True,
        description="seconds a new connection has to send its HTTP request",
    )
    idle_timeout: float = Field(
        default=4 * 3600.0,
        ge=0,
        allow_inf_nan=False,
        strict=True,
        description="seconds with no traffic before a session is closed (kubelet's default, 4 h); "
        "0: never",
    )

    @field_validator("address")
    @classmethod
    def _address_is_host_port(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("request_timeout", "idle_timeout", mode="before")
    @classmethod
    def _timeouts_are_seconds(cls, value: object) -> object:
        return _seconds(value)


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    address: str = Field(
        default="127.0.0.1:9464",
        description="host:port serving /metrics (loopback unless allow_remote); '' disables it",
    )
    allow_remote: bool = Field(default=False, description="allow a non-loopback address")

    @field_validator("address")
    @classmethod
    def _address_is_host_port(cls, value: str) -> str:
        return _host_port(value) if value else value


def _default_runtimes() -> dict[str, RuntimeHandlerConfig]:
    return {
        "runc": RuntimeHandlerConfig(path="runc"),
        "crun": RuntimeHandlerConfig(path="crun"),
    }


class Config(_Section):
    """The whole configuration of one crishim instance."""

    root: str = Field(default="/var/lib/crishim", description="durable state: images, records")
    state: str = Field(default="/run/crishim", description="runtime state: bundles, namespaces")
    socket: str = Field(
        default="/run/crishim/crishim.sock", description="unix socket kubelet connects to"
    )
    log_level: LogLevel = Field(default="info", description="debug, info, warning or error")
    cgroup_driver: CgroupDriver = Field(
        default="cgroupfs", description="cgroupfs or systemd; must match kubelet's cgroupDriver"
    )
    host_root: str = Field(
        default="/",
        description="where crishim sees the node's root file system: / unless crishim runs "
        "from a root of its own (`crishim node install` binds the node's root at /host); node "
        "paths of volumes that crishim does not see at their own path resolve under it",
    )
    default_runtime: str = Field(
        default="runc", description="runtime used when a pod names no runtime handler"
    )
    conmon: str = Field(
        default="conmon",
        description="conmon, the monitor every container runs under: an absolute path, or a name "
        "looked up on PATH",
    )
    runtimes: dict[str, RuntimeHandlerConfig] = Field(
        default_factory=_default_runtimes,
        description="runtime handlers by name; runc and crun are predefined",
    )
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    cni: CniConfig = Field(default_factory=CniConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("root", "state", "socket", "host_root")
    @classmethod
    def _paths_absolute(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("conmon")
    @classmethod
    def _conmon_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a binary")
        return value

    @model_validator(mode="after")
    def _default_runtime_defined(self) -> Config:
        if self.default_runtime not in self.runtimes:
            known = ", ".join(sorted(self.runtimes)) or "none"
            raise ValueError(
                f"default_runtime {self.default_runtime!r} is not a configured runtime "
                f"(known: {known})"
            )
        return self

    def runtime_root(self, name: str) -> str:
        """The state directory handed to runtime ``name`` as ``--root``."""
        configured = self.runtimes[name].root
        return configured or f"{self.state}/runtimes/{name}"


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}")
    return "; ".join(problems)


def _validate(data: Mapping[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc


def config_files(main: Path, *, required: bool) -> list[Path]:
    """The files that make up the configuration, in merge order."""
    files: list[Path] = []
    if main.exists():
        files.append(main)
    elif required:
        raise ConfigError(f"{main}: config file does not exist")
    drop_ins = main.parent / DROP_IN_DIR_NAME
    if drop_ins.is_dir():
        files.extend(sorted(p for p in drop_ins.iterdir() if p.suffix == ".toml"))
    return files


def load_config(main: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the effective configuration from files and flag overrides.

    ``main`` None means the default file, which may be absent; a file named explicitly
    must exist. ``overrides`` are flag values keyed like the TOML (None values ignored).
    """
    files = config_files(main or DEFAULT_CONFIG_FILE, required=main is not None)
    data: dict[str, Any] = Config().model_dump()
    for path in files:
        data = _deep_merge(data, _read_toml(path))
        _validate(data, str(path))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        data = _deep_merge(data, flags)
    return _validate(data, "command line")


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's, but for two: JSON writes characters beyond the BMP as
        # surrogate pairs, which TOML refuses, and leaves DEL raw, which TOML must escape.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _render_table(model: BaseModel, header: str, comments: bool, out: list[str]) -> None:
    # (header, table, comment shown above it)
    tables: list[tuple[str, BaseModel, str | None]] = []
    if header:
        out.append(f"[{header}]")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        prefix = f"{header}." if header else ""
        if isinstance(value, BaseModel):
            tables.append((f"{prefix}{name}", value, (value.__doc__ or "").strip()))
        elif isinstance(value, dict):
            for index, (key, item) in enumerate(value.items()):
                header_key = key if _BARE_KEY_RE.fullmatch(key) else _toml_value(key)
                tables.append(
                    (f"{prefix}{name}.{header_key}", item, None if index else field.description)
                )
        else:
            if comments and field.description:
                out.append(f"# {field.description}")
            out.append(f"{name} = {_toml_value(value)}")
    for sub_header, sub_model, comment in tables:
        out.append("")
        if comments and comment:
            out.append(f"# {comment}")
        _render_table(sub_model, sub_header, comments, out)


def render_config(config: Config, *, comments: bool) -> str:
    """The configuration as TOML; with comments it is the documented template."""
    out: list[str] = []
    if comments:
        out += [
            "# crishim configuration. Main file: /etc/crishim/crishim.toml; drop-ins in",
            "# /etc/crishim/crishim.d/*.toml are merged over it in name order.",
            "",
        ]
    _render_table(config, "", comments, out)
    return "\n".join(out) + "\n"
