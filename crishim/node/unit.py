"""The systemd unit shipped with crishim (``systemd/crishim.service``).

Found, like ``bundles/``, next to the package (a checkout or an editable install) or under
``<prefix>/share/crishim/systemd/`` (where a wheel installs its data files).
``crishim unit`` prints it with ``ExecStart`` naming the crishim that prints it, so the
output can go straight to ``/etc/systemd/system/crishim.service``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from crishim.errors import ConfigError

__all__ = ["UNIT_NAME", "add_settings", "crishim_executable", "render_unit", "unit_path"]

UNIT_NAME = "crishim.service"
_EXEC_START = "ExecStart="


def unit_path() -> Path:
    """Where the shipped unit file is."""
    candidates = [
        Path(__file__).resolve().parents[2] / "systemd" / UNIT_NAME,
        Path(sys.prefix) / "share" / "crishim" / "systemd" / UNIT_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{UNIT_NAME} not found; searched {searched}")


def crishim_executable() -> str:
    """The absolute path of this installation's ``crishim`` command."""
    beside = Path(sys.prefix) / "bin" / "crishim"
    if beside.is_file():
        return str(beside)
    found = shutil.which("crishim")
    return str(Path(found).absolute()) if found else "/usr/local/bin/crishim"


def render_unit(text: str, executable: str) -> str:
    """The unit ``text`` with ExecStart running ``executable``."""
    lines = []
    for line in text.splitlines():
        if line.startswith(_EXEC_START):
            _, _, arguments = line.partition(" ")
            line = f"{_EXEC_START}{executable} {arguments}".rstrip()
        lines.append(line)
    return "\n".join(lines) + "\n"


def add_settings(text: str, section: str, settings: list[str]) -> str:
    """The unit ``text`` with ``settings`` (lines) added at the end of ``[section]``."""
    lines = text.splitlines()
    header = f"[{section}]"
    if header not in lines:
        raise ConfigError(f"the unit has no {header} section")
    end = lines.index(header) + 1
    while end < len(lines) and not lines[end].startswith("["):
        end += 1
    while end > 0 and not lines[end - 1].strip():  # before the blank lines ending it
        end -= 1
    return "\n".join([*lines[:end], *settings, *lines[end:]]) + "\n"
