"""Finding and reading CNI network configuration.

As the CNI convention has it, the configuration is the first file (by name) in the conf
dir ending in .conflist, .conf or .json that parses; a .conf/.json holding a single plugin
is treated as a list of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass(frozen=True)
class NetworkConfig:
    """A usable network configuration: its file, network name and plugin chain."""

    path: Path
    name: str
    cni_version: str
    plugin_types: tuple[str, ...]


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
    if path.suffix == ".conflist" or "plugins" in data:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError(f"{path.name}: 'plugins' must be a non-empty list")
    else:
        plugins = [data]
    types = []
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ValueError(f"{path.name}: plugin {index} has no 'type'")
        types.append(plugin["type"])
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path.name}: 'name' is missing")
    return NetworkConfig(
        path=path,
        name=name,
        cni_version=str(data.get("cniVersion", "")),
        plugin_types=tuple(types),
    )


def find_network_config(conf_dir: str) -> ConfigSearch:
    """The first valid configuration in ``conf_dir``, with the problems of those skipped."""
    directory = Path(conf_dir)
    try:
        candidates = sorted(p for p in directory.iterdir() if p.suffix in CONFIG_SUFFIXES)
    except OSError:
        return ConfigSearch(None)
    problems: list[str] = []
    for path in candidates:
        try:
            return ConfigSearch(parse_network_config(path, path.read_text()), problems)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name}: cannot read: {exc}")
        except ValueError as exc:
            problems.append(str(exc))
    return ConfigSearch(None, problems)


def find_plugin(bin_dirs: list[str], plugin_type: str) -> str | None:
    """The first executable named ``plugin_type`` in ``bin_dirs``."""
    if "/" in plugin_type or plugin_type in ("", ".", ".."):
        return None
    for directory in bin_dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
