"""Registry endpoints from containerd's ``hosts.toml`` directory (the ``certs.d`` layout).

The configuration directory holds one folder per registry domain, named as the domain
appears in image references (``docker.io``, ``127.0.0.1:5000``; containerd's
``127.0.0.1_5000_`` spelling works too), and a ``_default`` folder for domains without
their own. Each folder holds a ``hosts.toml``::

    server = "https://registry.k8s.io"        # the upstream; default: derived from the domain
    capabilities = ["pull", "resolve"]        # what it may be used for; default: all three
    ca = "ca.crt"                             # CA file(s); relative to the folder
    client = [["client.cert", "client.key"]]  # client certificate(s): file or [cert, key]
    skip_verify = false                       # no TLS verification
    header = { X-Custom = "value" }           # extra request headers: string or list
    override_path = false                     # true: the URL path is the API root, no "/v2"
    dial_timeout = "5s"                       # connect timeout, a Go duration

    [host."http://127.0.0.1:5000"]            # a mirror: the same keys except server
      capabilities = ["pull", "resolve"]
      skip_verify = true

Mirrors are tried in file order, then the server. A folder without ``hosts.toml`` is read
the Docker way: ``*.crt`` files are CAs, ``*.cert`` files client certificates with their
``*.key``. Unlike containerd, a file with unknown keys or wrong types is refused rather than
skipped, so a typo does not silently bypass a mirror. Files are read on every call, so edits
apply to the next pull without a restart.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from crishim.errors import ConfigError, InvalidArgument

HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"

Capability = Literal["pull", "resolve", "push"]
ALL_CAPABILITIES: frozenset[str] = frozenset(("pull", "resolve", "push"))

_DOCKER_DOMAIN = "docker.io"
_DOCKER_API_DOMAIN = "registry-1.docker.io"

_HOST_KEYS = frozenset(
    ("capabilities", "skip_verify", "ca", "client", "header", "override_path", "dial_timeout")
)
_TOP_LEVEL_KEYS = _HOST_KEYS | {"server", "host"}

# Host names in ASCII; "_" too, as container networks name hosts with it.
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110's field-value in ASCII: visible characters, spaces and tabs only between them.
_HEADER_VALUE_RE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
# Go's time.ParseDuration units; both micro signs are accepted, as Go does.
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_DURATION_PART = r"(\d+\.?\d*|\.\d+)({})".format(
    "|".join(sorted(_GO_DURATION_UNITS, key=len, reverse=True))  # "ms" before "m"
)
_GO_DURATION_RE = re.compile(f"(?:{_GO_DURATION_PART})+")
# Go keeps a duration in an int64 of nanoseconds and refuses a longer one (~292 years).
_GO_DURATION_MAX = (2**63 - 1) * 1e-9
_GO_DURATION_PART_RE = re.compile(_GO_DURATION_PART)


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint that serves a registry domain: a mirror or the upstream server."""

    url: str  # scheme://host[:port][/path]
    api_base: str  # url + "/v2" (unless override_path or the path already ends in /v2)
    capabilities: frozenset[str]
    skip_verify: bool
    ca: tuple[str, ...]  # absolute CA file paths
    client: tuple[tuple[str, str | None], ...]  # (cert, key); no key: the cert file holds it
    header: dict[str, tuple[str, ...]] = field(hash=False)
    override_path: bool
    is_mirror: bool
    dial_timeout: float | None  # seconds; None: the client's default


def load_hosts(config_path: str | None, domain: str) -> list[RegistryHost]:
    """The endpoints to try for ``domain``, in order: its mirrors, then its server.

    ``config_path`` None, a missing directory or no folder for the domain give the default
    upstream only. Raises ConfigError naming the file, key and problem of a bad ``hosts.toml``.
    """
    if not domain or "/" in domain or domain in (".", "..") or "\0" in domain:
        raise InvalidArgument(f"invalid registry domain {json.dumps(domain)}")
    host_dir = _host_dir(Path(config_path), domain) if config_path else None
    if host_dir is None:
        return [_upstream(domain)]
    hosts_file = host_dir / HOSTS_FILE
    if hosts_file.is_file():
        return _parse_hosts_file(hosts_file, domain)
    ca, client = _docker_cert_files(host_dir)
    return [_upstream(domain, ca=ca, client=client)]


def hosts_for(config_path: str | None, domain: str, capability: Capability) -> list[RegistryHost]:
    """The endpoints of :func:`load_hosts` that may be used for ``capability``."""
    return [host for host in load_hosts(config_path, domain) if capability in host.capabilities]


def _host_dir(config_path: Path, domain: str) -> Path | None:
    """containerd's lookup: ``host_port_``, then the domain as is, then ``_default``."""
    candidates = [domain, DEFAULT_DIR]
    host, colon, port = domain.rpartition(":")
    if colon and host and not port.endswith("]"):
        candidates.insert(0, f"{host}_{port}_")
    for name in candidates:
        path = config_path / name
        try:
            if path.is_dir():
                return path
        except OSError as exc:
            # A name longer than the file system allows names no folder: try the next one.
            if exc.errno != errno.ENAMETOOLONG:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return None


def _upstream(
    domain: str,
    *,
    ca: tuple[str, ...] = (),
    client: tuple[tuple[str, str | None], ...] = (),
) -> RegistryHost:
    url = _default_server(domain)
    return RegistryHost(
        url=url,
        api_base=url + "/v2",
        capabilities=ALL_CAPABILITIES,
        skip_verify=False,
        ca=ca,
        client=client,
        header={},
        override_path=False,
        is_mirror=False,
        dial_timeout=None,
    )


def _default_server(domain: str) -> str:
    """Docker Hub's API host for docker.io; plain HTTP on loopback, as Docker does."""
    if domain == _DOCKER_DOMAIN:
        return f"https://{_DOCKER_API_DOMAIN}"
    if _is_loopback(domain):
        return f"http://{domain}"
    return f"https://{domain}"


def _is_loopback(domain: str) -> bool:
    # "[::1]:5000" -> "::1"; "localhost:5000" -> "localhost"
    host = domain[1:].partition("]")[0] if domain.startswith("[") else domain.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _docker_cert_files(
    host_dir: Path,
) -> tuple[tuple[str, ...], tuple[tuple[str, str | None], ...]]:
    """Docker's layout: ``*.crt`` are CAs, ``*.cert`` client certificates with ``*.key``."""
    ca: list[str] = []
    client: list[tuple[str, str | None]] = []
    try:
        entries = sorted(host_dir.iterdir())
    except OSError as exc:
        raise ConfigError(f"{host_dir}: cannot read: {exc.strerror}") from exc
    for path in entries:
        if not path.is_file():
            continue
        if path.suffix == ".crt":
            ca.append(str(path.absolute()))
        elif path.suffix == ".cert":
            key = path.with_suffix(".key")
            client.append((str(path.absolute()), str(key.absolute()) if key.is_file() else None))
    return tuple(ca), tuple(client)


def _parse_hosts_file(path: Path, domain: str) -> list[RegistryHost]:
    document = _read_toml(path)
    top = _Table(path, "", document)
    top.check_keys(_TOP_LEVEL_KEYS)
    mirror_tables = document.get("host", {})
    if not isinstance(mirror_tables, dict):
        raise top.error("host", f"expected a table of hosts, got {_toml_type(mirror_tables)}")
    hosts = []
    for url, values in mirror_tables.items():  # TOML tables keep their order in the file
        prefix = f"host.{json.dumps(url)}"
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {prefix}: expected a table, got {_toml_type(values)}")
        table = _Table(path, prefix + ".", values)
        table.check_keys(_HOST_KEYS)
        hosts.append(table.registry_host(url, prefix, is_mirror=True))
    # As in containerd, an absent or empty server means the domain's default upstream.
    server = (top.string("server") if "server" in document else "") or _default_server(domain)
    hosts.append(top.registry_host(server, "server", is_mirror=False))
    return hosts


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


@dataclass(frozen=True)
class _Table:
    """One table of a hosts.toml: typed reads whose errors name the file and the key."""

    file: Path
    prefix: str  # the table's dotted key path, "" at the top level
    values: dict[str, Any]

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.prefix}{key}: {problem}")

    def check_keys(self, known: frozenset[str]) -> None:
        for key in self.values:
            if key not in known:
                raise self.error(key, f"unknown key (known: {', '.join(sorted(known))})")

    def registry_host(self, url_text: str, url_key: str, *, is_mirror: bool) -> RegistryHost:
        override_path = self.boolean("override_path")
        try:
            url, api_base = _endpoint(url_text, override_path=override_path)
        except ValueError as exc:
            raise ConfigError(f"{self.file}: {url_key}: {exc}") from exc
        return RegistryHost(
            url=url,
            api_base=api_base,
            capabilities=self.capabilities(),
            skip_verify=self.boolean("skip_verify"),
            ca=self.ca(),
            client=self.client(),
            header=self.header(),
            override_path=override_path,
            is_mirror=is_mirror,
            dial_timeout=self.dial_timeout(),
        )

    def string(self, key: str) -> str:
        value = self.values[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_toml_type(value)}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.values.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_toml_type(value)}")
        return value

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        """A string or an array of strings."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise self.error(key, f"expected a string or an array of strings, got {_shape(value)}")
        return tuple(items)

    def capabilities(self) -> frozenset[str]:
        if "capabilities" not in self.values:
            return ALL_CAPABILITIES
        names = {name.lower() for name in self.strings("capabilities", self.values["capabilities"])}
        unknown = names - ALL_CAPABILITIES
        if unknown:
            raise self.error(
                "capabilities",
                f"unknown capability {', '.join(sorted(unknown))} (known: pull, resolve, push)",
            )
        # As in containerd, an empty list means every capability.
        return frozenset(names) or ALL_CAPABILITIES

    def ca(self) -> tuple[str, ...]:
        if "ca" not in self.values:
            return ()
        return tuple(self.path("ca", p) for p in self.strings("ca", self.values["ca"]))

    def client(self) -> tuple[tuple[str, str | None], ...]:
        value = self.values.get("client", [])
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list):
            raise self.error("client", f"expected a file or [cert, key] pairs, got {_shape(value)}")
        pairs: list[tuple[str, str | None]] = []
        for entry in entries:
            if isinstance(entry, str):
                pairs.append((self.path("client", entry), None))
            elif (
                isinstance(entry, list)
                and len(entry) == 2
                and all(isinstance(item, str) for item in entry)
            ):
                pairs.append((self.path("client", entry[0]), self.path("client", entry[1])))
            else:
                raise self.error(
                    "client", f"expected a file or a [cert, key] pair, got {_shape(entry)}"
                )
        return tuple(pairs)

    def header(self) -> dict[str, tuple[str, ...]]:
        table = self.values.get("header", {})
        if not isinstance(table, dict):
            raise self.error("header", f"expected a table, got {_toml_type(table)}")
        headers: dict[str, tuple[str, ...]] = {}
        for name, value in table.items():
            key = f"header.{json.dumps(name)}"
            if not _HEADER_NAME_RE.fullmatch(name):
                raise self.error(key, "not a valid HTTP header name")
            values = self.strings(key, value)
            # A line break in a value would smuggle another header into every request.
            if any(ch in item for item in values for ch in "\r\n\0"):
                raise self.error(key, "a header value must not contain line breaks")
            # The HTTP client sends values as ASCII and refuses one it cannot put on the wire.
            if not all(_HEADER_VALUE_RE.fullmatch(item) for item in values):
                raise self.error(
                    key,
                    "a header value must be printable ASCII, with spaces or tabs only inside it",
                )
            headers[name] = values
        return headers

    def dial_timeout(self) -> float | None:
        if "dial_timeout" not in self.values:
            return None
        text = self.string("dial_timeout")
        if not text:  # containerd reads an empty string as unset
            return None
        seconds = _parse_go_duration(text)
        if seconds is None:
            raise self.error(
                "dial_timeout", f'expected a duration such as "5s" or "1m30s", got "{text}"'
            )
        # Go's dialer reads zero as "no timeout of its own": the client's default applies.
        return seconds or None

    def path(self, key: str, text: str) -> str:
        """A file path; relative ones are relative to the hosts.toml folder."""
        if not text:
            raise self.error(key, "empty file path")
        if "\0" in text:
            raise self.error(key, "a file path must not contain a NUL character")
        return os.path.abspath(os.path.join(self.file.parent, text))


def _endpoint(text: str, *, override_path: bool) -> tuple[str, str]:
    """The normalised URL and API base of a host; ValueError names what is wrong."""
    # urlsplit would silently drop some of them; the HTTP client refuses the others.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ValueError(f"a URL must not contain control characters, got {json.dumps(text)}")
    # As in containerd, a bare host[:port][/path] means HTTPS.
    parts = urlsplit(text if "://" in text else f"https://{text}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f'unsupported URL scheme "{parts.scheme}": use http or https')
    if not parts.hostname or parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f'expected scheme://host[:port][/path], got "{text}"')
    # A DNS name or an IPv4 address; an IPv6 one ("[...]", with ":") urlsplit checks itself.
    if ":" not in parts.hostname and not (
        _HOST_NAME_RE.fullmatch(parts.hostname) and _idna_decodes(parts.hostname)
    ):
        raise ValueError(f'invalid host name "{parts.hostname}" in "{text}"')
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f'invalid port in "{text}"') from exc
    netloc = parts.netloc
    # docker.io is Docker Hub's name; its registry API is served by registry-1.docker.io.
    if parts.hostname == _DOCKER_DOMAIN and port is None:
        netloc = _DOCKER_API_DOMAIN
    path = posixpath.normpath("/" + parts.path.lstrip("/")) if parts.path else ""
    url = f"{scheme}://{netloc}{'' if path == '/' else path}"
    if override_path or path.endswith("/v2"):
        return url, url
    return url, url + "/v2"


def _idna_decodes(host: str) -> bool:
    """Whether the HTTP client can decode the IDNA labels ("xn--...") of ``host``: it does so
    on every request, and a malformed label makes each one fail with UnicodeError."""
    try:
        return bool(httpx.URL(f"http://{host}/").host)
    except (httpx.InvalidURL, UnicodeError):
        return False


def _parse_go_duration(text: str) -> float | None:
    """Seconds of a non-negative Go duration ("300ms", "1m30s"), or None if invalid."""
    body = text.removeprefix("+")
    if body == "0":
        return 0.0
    if not _GO_DURATION_RE.fullmatch(body):
        return None
    seconds = sum(
        float(number) * _GO_DURATION_UNITS[unit]
        for number, unit in _GO_DURATION_PART_RE.findall(body)
    )
    return seconds if seconds <= _GO_DURATION_MAX else None


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _shape(value: object) -> str:
    """A TOML type, spelling out an array's item types (the usual mistake is inside it)."""
    if isinstance(value, list):
        items = sorted({_toml_type(item) for item in value})
        return f"an array of {' and '.join(items)}" if items else "an empty array"
    return _toml_type(value)
