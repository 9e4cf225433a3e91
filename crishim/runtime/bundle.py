"""OCI bundles on disk: a bundle's ``config.json``, written, read and patched.

The spec is built elsewhere (``crishim.oci``, pure); this is where it meets the disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crishim.util.disk import disk_full_as

__all__ = ["cgroups_path", "read_spec", "update_resources", "write_spec"]

_CONFIG = "config.json"


def write_spec(bundle: Path, spec: dict[str, Any]) -> None:
    """Write the bundle's config.json (temp file + rename: never seen half-written)."""
    final = bundle / _CONFIG
    temp = bundle / f".{_CONFIG}.tmp"
    with disk_full_as("writing the runtime spec", final):
        try:
            temp.write_text(json.dumps(spec))
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def read_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json."""
    spec: dict[str, Any] = json.loads((bundle / _CONFIG).read_text())
    return spec


def update_resources(bundle: Path, resources: dict[str, Any]) -> None:
    """Merge OCI ``linux.resources`` into the spec of a container the runtime has not
    created yet, section by section, as ``runc update`` applies them to a running one."""
    spec = read_spec(bundle)
    current = spec.setdefault("linux", {}).setdefault("resources", {})
    for section, values in resources.items():
        if isinstance(values, dict) and isinstance(current.get(section), dict):
            current[section].update(values)
        else:
            current[section] = values
    write_spec(bundle, spec)


def cgroups_path(bundle: Path) -> str | None:
    """The container's ``linux.cgroupsPath``, or None without a (readable) spec."""
    try:
        path = read_spec(bundle).get("linux", {}).get("cgroupsPath")
    except (OSError, ValueError):
        return None
    return path if isinstance(path, str) and path else None
