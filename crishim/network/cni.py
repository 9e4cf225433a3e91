"""CNI: finding the network configuration and executing its plugins per the CNI spec.

As the CNI convention has it, the configuration is the first file (by name) in the conf
dir ending in .conflist, .conf or .json that parses; a .conf/.json holding a single plugin
is treated as a list of one. While the conf dir holds no such file at all, crishim's
built-in default network serves (:mod:`crishim.network.default_network`), if enabled. The
conf dir is read at every ADD and every status question, so a config written by a network
plugin takes over at once, without a restart.

:class:`CniManager` runs a list's plugins for ADD (in order, each getting the previous
one's result as ``prevResult``), CHECK and DEL (in reverse), per CNI 0.3.x-1.0.0. What ADD
used and returned is cached per sandbox, so DEL works after a restart of crishim, with a
changed conf dir, and without the pod's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crishim.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from crishim.network.cni_result import CniResult, parse_result, version_tuple
from crishim.network.default_network import DefaultNetwork
from crishim.network.netns import namespace_alive
from crishim.util import proc
from crishim.util.disk import disk_full_as

log = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
BUILTIN_SOURCE = "built-in default"


@dataclass(frozen=True)
class NetworkConfig:
    """A usable network configuration: its file, network name and plugin chain.

    ``path`` is None for the built-in default network, whose list is ``builtin``.
    """

    path: Path | None
    name: str
    cni_version: str
    plugin_types: tuple[str, ...]
    ipam_types: tuple[str, ...] = ()
    builtin: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        """Where the list comes from: its file, or crishim's built-in default."""
        return str(self.path) if self.path is not None else BUILTIN_SOURCE

    @property
    def required_plugins(self) -> tuple[str, ...]:
        """Every plugin binary the list runs: the chain's and their IPAM plugins."""
        return tuple(dict.fromkeys(self.plugin_types + self.ipam_types))


@dataclass(frozen=True)
class ConfigSearch:
    """The outcome of looking for a configuration: the config, or why there is none."""

    config: NetworkConfig | None
    problems: list[str] = field(default_factory=list)

    def reason(self, conf_dir: str) -> str:
        """A one-line explanation for NetworkReady=false."""
        if self.problems:
            return f"no valid CNI network config in {conf_dir}: " + "; ".join(self.problems)
        return f"no CNI network config found in {conf_dir}"


def parse_network_config(path: Path, text: str) -> NetworkConfig:
    """Parse one config file; ValueError names what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path.name}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    return _describe_list(data, path, list_form=path.suffix == ".conflist" or "plugins" in data)


def _describe_list(data: Mapping[str, Any], path: Path | None, *, list_form: bool) -> NetworkConfig:
    label = path.name if path is not None else BUILTIN_SOURCE
    if list_form:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError(f"{label}: 'plugins' must be a non-empty list")
    else:
        plugins = [data]
    types = []
    ipam_types = []
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ValueError(f"{label}: plugin {index} has no 'type'")
        types.append(plugin["type"])
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and isinstance(ipam.get("type"), str) and ipam["type"]:
            ipam_types.append(ipam["type"])
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{label}: 'name' is missing")
    return NetworkConfig(
        path=path,
        name=name,
        cni_version=str(data.get("cniVersion", "")),
        plugin_types=tuple(types),
        ipam_types=tuple(ipam_types),
        builtin=dict(data) if path is None else None,
    )


def find_network_config(conf_dir: str) -> ConfigSearch:
    """The first valid configuration in ``conf_dir``, with the problems of those skipped."""
    directory = Path(conf_dir)
    try:
        candidates = sorted(p for p in directory.iterdir() if p.suffix in CONFIG_SUFFIXES)
    except FileNotFoundError:
        return ConfigSearch(None)
    except OSError as exc:
        # Not "no config": what it holds is unknown, so the default network must not serve.
        return ConfigSearch(None, [f"cannot read {conf_dir}: {exc.strerror}"])
    problems: list[str] = []
    for path in candidates:
        try:
            return ConfigSearch(parse_network_config(path, path.read_text()), problems)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name}: cannot read: {exc}")
        except ValueError as exc:
            problems.append(str(exc))
    return ConfigSearch(None, problems)


def choose_network(conf_dir: str, default: DefaultNetwork | None) -> ConfigSearch:
    """The network new pods join: the conf dir's config, else the default while it holds none.

    A conf dir with config files that do not parse (one being written, or broken) gets no
    default: that network is what the node is meant to have.
    """
    search = find_network_config(conf_dir)
    if search.config is None and not search.problems and default is not None:
        return ConfigSearch(_describe_list(default.conflist(), None, list_form=True))
    return search


def missing_plugins(config: NetworkConfig, bin_dirs: list[str]) -> list[str]:
    """The plugins ``config`` runs that none of ``bin_dirs`` holds."""
    return [t for t in config.required_plugins if find_plugin(bin_dirs, t) is None]


def find_plugin(bin_dirs: list[str], plugin_type: str) -> str | None:
    """The first executable named ``plugin_type`` in ``bin_dirs``."""
    if "/" in plugin_type or plugin_type in ("", ".", ".."):
        return None
    for directory in bin_dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# --- Executing plugins ------------------------------------------------------------------

PLUGIN_TIMEOUT = 60.0
CACHE_VERSION = 1

# CNI error codes that mean the configuration or the call is wrong, not the host or the
# network (CNI spec, "Error"): incompatible version, unsupported field, invalid environment
# variables, undecodable content, invalid network config.
_CONFIG_ERROR_CODES = frozenset({1, 2, 4, 6, 7})
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def format_cni_args(args: Mapping[str, str]) -> str:
    """CNI_ARGS: ``K=V;K=V`` in the given order; InvalidArgument for a separator inside."""
    pairs = []
    for key, value in args.items():
        if not key or any(c in key for c in "=;") or ";" in value:
            raise InvalidArgument(f"CNI argument {key}={value!r} contains '=' or ';'")
        pairs.append(f"{key}={value}")
    return ";".join(pairs)


def plugin_exec_config(
    network: Mapping[str, Any],
    plugin: Mapping[str, Any],
    capabilities: Mapping[str, object],
    prev_result: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The config one plugin of a list gets on stdin (CNI spec, "Deriving execution config").

    It carries the list's ``name`` and ``cniVersion``, a ``runtimeConfig`` holding only the
    capabilities the plugin declares (a plugin must never see arguments it did not ask
    for), and the previous plugin's result as ``prevResult``.
    """
    config = dict(plugin)
    config["name"] = network["name"]
    config["cniVersion"] = network.get("cniVersion", "")
    declared = plugin.get("capabilities")
    runtime_config = {
        name: value
        for name, value in capabilities.items()
        if isinstance(declared, dict) and declared.get(name) is True
    }
    if runtime_config:
        config["runtimeConfig"] = runtime_config
    else:
        config.pop("runtimeConfig", None)
    if prev_result is not None:
        config["prevResult"] = dict(prev_result)
    else:
        config.pop("prevResult", None)
    return config


@dataclass(frozen=True)
class Attachment:
    """What ADD did: the network a pod joined, where its list came from, and the result."""

    network: str
    source: str
    result: CniResult


def load_network_list(path: Path) -> dict[str, Any]:
    """Read a config file as a list (``name``, ``cniVersion``, ``plugins``); ValueError if bad."""
    text = path.read_text()
    parse_network_config(path, text)
    data: dict[str, Any] = json.loads(text)
    if "plugins" in data:
        return data
    # A single-plugin .conf is a list of one; the plugin keeps its own keys.
    return {"cniVersion": data.get("cniVersion", ""), "name": data["name"], "plugins": [data]}


@dataclass
class _Invocation:
    """What one call of a plugin chain needs besides the plugin itself."""

    command: str
    sandbox_id: str
    netns: str
    ifname: str
    args: str


class CniManager:
    """Runs the CNI plugin chain of the node's network for pods (ADD, CHECK, DEL).

    What ADD used is cached per sandbox (config, arguments, result), so CHECK and DEL use
    exactly that, after a restart of crishim and even when the conf dir changed since (a
    pod set up on the built-in default network is torn down on it after a network plugin
    wrote its config).
    """

    def __init__(
        self,
        conf_dir: str,
        bin_dirs: list[str],
        cache_dir: Path,
        *,
        default: DefaultNetwork | None = None,
        plugin_timeout: float = PLUGIN_TIMEOUT,
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir
        self.default = default
        self.plugin_timeout = plugin_timeout
        self._last_source: str | None = None

    def status(self) -> ConfigSearch:
        """The network config in use, or why there is none (a missing plugin counts)."""
        search = choose_network(self.conf_dir, self.default)
        if search.config is None:
            return search
        missing = missing_plugins(search.config, self.bin_dirs)
        if missing:
            where = ":".join(self.bin_dirs)
            label = search.config.path.name if search.config.path else BUILTIN_SOURCE
            problems = [f"{label}: plugin {t} not found in {where}" for t in missing]
            return ConfigSearch(None, [*search.problems, *problems])
        return search

    async def add(
        self,
        sandbox_id: str,
        netns: str,
        *,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
        capabilities: Mapping[str, object] | None = None,
    ) -> Attachment:
        """Attach the pod's netns to the network; on failure what was done is undone."""
        cache_path = self._cache_path(sandbox_id)
        search = choose_network(self.conf_dir, self.default)
        chosen = search.config
        if chosen is None:
            raise Unavailable("network plugin not ready: " + search.reason(self.conf_dir))
        if chosen.path is None:
            assert chosen.builtin is not None
            network = dict(chosen.builtin)
        else:
            try:
                network = await asyncio.to_thread(load_network_list, chosen.path)
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"CNI config {chosen.path}: {exc}") from None
        if chosen.source != self._last_source:
            log.info("new pods join CNI network %s (%s)", network["name"], chosen.source)
            self._last_source = chosen.source
        cni_args = dict(args or {})
        caps = dict(capabilities or {})
        call = _Invocation("ADD", sandbox_id, netns, ifname, format_cni_args(cni_args))
        entry: dict[str, Any] = {
            "version": CACHE_VERSION,
            "sandboxId": sandbox_id,
            "source": chosen.source,
            "network": network,
            "ifname": ifname,
            "netns": netns,
            "args": cni_args,
            "capabilities": caps,
            "result": None,
        }
        # Cached before the first plugin runs: if crishim dies halfway, DEL still knows
        # which network and plugins to clean up.
        await asyncio.to_thread(_write_json_atomic, cache_path, entry)
        try:
            prev: dict[str, Any] | None = None
            for plugin in network["plugins"]:
                output = await self._run(network, plugin, call, caps, prev)
                if output is not None:
                    prev = output
            if prev is None:
                raise Unavailable(f"CNI network {network['name']}: ADD returned no result")
            try:
                result = parse_result(prev)
            except ValueError as exc:
                raise Unavailable(
                    f"CNI network {network['name']}: invalid ADD result: {exc}"
                ) from None
            entry["result"] = prev
            await asyncio.to_thread(_write_json_atomic, cache_path, entry)
        except BaseException:
            # The spec leaves cleanup of a failed ADD to the runtime: DEL the whole chain
            # (but for plugins that are not installed: those never ran).
            try:
                await asyncio.shield(self.delete(sandbox_id, netns, ifname, skip_missing=True))
            except Exception:
                log.exception("cleaning up the failed CNI ADD of sandbox %s", sandbox_id)
            raise
        return Attachment(network["name"], chosen.source, result)

    async def check(self, sandbox_id: str, netns: str, ifname: str = "eth0") -> None:
        """Ask every plugin whether the pod's network is still as ADD left it."""
        entry = await self._load_cache(sandbox_id)
        if entry is None or entry.get("result") is None:
            raise NotFound(f"sandbox {sandbox_id} has no CNI network attached")
        network = entry["network"]
        # CHECK exists from CNI 0.4.0 on, and a list may opt out of it.
        if version_tuple(str(network.get("cniVersion", ""))) < (0, 4) or network.get(
            "disableCheck"
        ):
            return
        call = _Invocation(
            "CHECK", sandbox_id, netns, entry.get("ifname", ifname), format_cni_args(entry["args"])
        )
        for plugin in network["plugins"]:
            await self._run(network, plugin, call, entry["capabilities"], entry["result"])

    async def delete(
        self,
        sandbox_id: str,
        netns: str | None,
        ifname: str = "eth0",
        *,
        skip_missing: bool = False,
    ) -> None:
        """Detach the pod from the network with what ADD cached; idempotent.

        ``netns`` may be None or gone (the pod's namespace was already removed): plugins
        then get an empty CNI_NETNS and release what they hold on the host side.
        ``skip_missing`` skips plugins that are not installed (undoing an ADD that failed
        over one); otherwise a missing plugin fails the DEL, as it may hold something.
        """
        try:
            entry = await self._load_cache(sandbox_id)
        except DataLoss as exc:
            entry = await self._fallback_entry(sandbox_id, ifname, str(exc))
        if entry is None:
            return
        network = entry["network"]
        if netns is None or not namespace_alive(netns):
            netns = ""
        call = _Invocation(
            "DEL", sandbox_id, netns, entry.get("ifname", ifname), format_cni_args(entry["args"])
        )
        # prevResult on DEL arrived with CNI 0.4.0; older plugins would reject it.
        prev = entry.get("result")
        if version_tuple(str(network.get("cniVersion", ""))) < (0, 4):
            prev = None
        for plugin in reversed(network["plugins"]):
            if skip_missing and find_plugin(self.bin_dirs, str(plugin.get("type", ""))) is None:
                continue
            await self._run(network, plugin, call, entry["capabilities"], prev)
        with contextlib.suppress(FileNotFoundError):
            self._cache_path(sandbox_id).unlink()

    async def _fallback_entry(
        self, sandbox_id: str, ifname: str, problem: str
    ) -> dict[str, Any] | None:
        """For DEL without a usable cache: the current config, as libcni does without one.

        Failing DEL forever over a corrupt cache would wedge the pod; plugins' DEL must
        tolerate missing state, so a best-effort DEL with the current list is safe.
        """
        log.warning("%s; deleting with the current network config", problem)
        search = choose_network(self.conf_dir, self.default)
        if search.config is not None:
            with contextlib.suppress(OSError, ValueError):
                if search.config.path is None:
                    network = dict(search.config.builtin or {})
                else:
                    network = await asyncio.to_thread(load_network_list, search.config.path)
                return {"network": network, "ifname": ifname, "args": {}, "capabilities": {}}
        log.warning("no usable network config: dropping the CNI cache of %s", sandbox_id)
        with contextlib.suppress(FileNotFoundError):
            self._cache_path(sandbox_id).unlink()
        return None

    def discard_unfinished_writes(self) -> list[str]:
        """Remove cache files a crash left half-written (never renamed into place); called
        at start, before anything writes the cache. Returns their names."""
        try:
            names = os.listdir(self.cache_dir)
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    (self.cache_dir / name).unlink()
                removed.append(name)
        return sorted(removed)

    def cached_sandboxes(self) -> list[str]:
        """The sandboxes ADD has cached a network for (DEL removes the entry)."""
        try:
            names = os.listdir(self.cache_dir)
        except FileNotFoundError:
            return []
        return sorted(
            name.removesuffix(".json")
            for name in names
            if name.endswith(".json") and _SANDBOX_ID.fullmatch(name.removesuffix(".json"))
        )

    def _cache_path(self, sandbox_id: str) -> Path:
        if not _SANDBOX_ID.fullmatch(sandbox_id):
            raise InvalidArgument(f"sandbox id {sandbox_id!r} is not a valid file name")
        return self.cache_dir / f"{sandbox_id}.json"

    async def _load_cache(self, sandbox_id: str) -> dict[str, Any] | None:
        path = self._cache_path(sandbox_id)
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None
        try:
            entry: object = json.loads(text)
        except ValueError as exc:
            raise DataLoss(f"CNI cache {path} is corrupt: {exc}") from None
        if not isinstance(entry, dict):
            raise DataLoss(f"CNI cache {path} is corrupt: not a JSON object")
        network = entry.get("network")
        if (
            not isinstance(network, dict)
            or not isinstance(network.get("name"), str)
            or not isinstance(network.get("plugins"), list)
        ):
            raise DataLoss(f"CNI cache {path} is corrupt: no network list in it")
        return entry

    async def _run(
        self,
        network: Mapping[str, Any],
        plugin: Mapping[str, Any],
        call: _Invocation,
        capabilities: Mapping[str, object],
        prev_result: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        """Execute one plugin; its parsed stdout, or None when it printed nothing."""
        plugin_type = str(plugin.get("type", ""))
        what = f"CNI plugin {plugin_type} ({call.command}) of network {network['name']}"
        binary = find_plugin(self.bin_dirs, plugin_type)
        if binary is None:
            raise proc.ProgramMissing(
                f"{what}: not found in {':'.join(self.bin_dirs)}; install it in one of "
                "crishim's [cni] bin_dirs"
            )
        stdin = json.dumps(plugin_exec_config(network, plugin, capabilities, prev_result))
        env = dict(os.environ)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(
            CNI_COMMAND=call.command,
            CNI_CONTAINERID=call.sandbox_id,
            CNI_NETNS=call.netns,
            CNI_IFNAME=call.ifname,
            CNI_ARGS=call.args,
            CNI_PATH=":".join(self.bin_dirs),
        )
        done = await proc.run(
            [binary], what=what, input=stdin.encode(), env=env, timeout=self.plugin_timeout
        )
        stdout, stderr = done.stdout, done.stderr
        output: object = None
        if stdout.strip():
            try:
                output = json.loads(stdout)
            except ValueError:
                # Garbage on a failed exit is reported with stderr below.
                if done.returncode == 0:
                    raise Unavailable(f"{what}: output is not JSON: {stdout[:200]!r}") from None
        if isinstance(output, dict) and "code" in output and "msg" in output:
            code = output.get("code")
            message = f"{what} failed: {output.get('msg')}"
            if output.get("details"):
                message += f" ({output['details']})"
            if code in _CONFIG_ERROR_CODES:
                raise InvalidArgument(message)
            raise Unavailable(message)
        if done.returncode != 0:
            detail = stderr.decode(errors="replace").strip() or stdout.decode(errors="replace")
            raise Unavailable(f"{what} failed (exit {done.returncode}): {detail.strip()}")
        if output is None:
            return None
        if not isinstance(output, dict):
            raise Unavailable(f"{what}: output is not a JSON object")
        return output


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_full_as("writing the CNI cache", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
