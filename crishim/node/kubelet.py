"""How kubelet is told its runtime, and careful edits of it (pure: text in, text out).

kubelet takes its runtime's socket from ``containerRuntimeEndpoint`` in its config file
(``--config``, kubeadm: ``/var/lib/kubelet/config.yaml``) or from the
``--container-runtime-endpoint`` flag, which kubeadm writes into
``/var/lib/kubelet/kubeadm-flags.env`` and which wins over the file. The image service
endpoint (``imageServiceEndpoint``, ``--image-service-endpoint``) defaults to the runtime's;
when a node sets it, it is pointed at crishim too.

Edits change the value and nothing else: the rest of the file (comments, order, quoting)
stays byte for byte, so a YAML round trip that would reformat it is not used.
"""

from __future__ import annotations

import json
import re
import shlex

from crishim.errors import FailedPrecondition

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_CONFIG",
    "FLAGS",
    "FLAGS_FILE",
    "config_value",
    "edit_config",
    "edit_flags",
    "flag_value",
    "flags_of",
]

DEFAULT_CONFIG = "/var/lib/kubelet/config.yaml"
FLAGS_FILE = "/var/lib/kubelet/kubeadm-flags.env"
RUNTIME_KEY = "containerRuntimeEndpoint"
IMAGE_KEY = "imageServiceEndpoint"
CONFIG_KEYS = (RUNTIME_KEY, IMAGE_KEY)
RUNTIME_FLAG = "--container-runtime-endpoint"
IMAGE_FLAG = "--image-service-endpoint"
FLAGS = (RUNTIME_FLAG, IMAGE_FLAG)


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag=value`` or ``--flag value``) in ``args``; the last
    one wins, as in kubelet."""
    value = None
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
        elif arg == flag and index + 1 < len(args):
            value = args[index + 1]
    return value


# -- kubeadm's flags file: KUBELET_KUBEADM_ARGS="--flag=value --flag=value"

_FLAGS_LINE = re.compile(r"^(?P<head>\s*KUBELET_KUBEADM_ARGS\s*=\s*)(?P<value>.*?)\s*$")


def _flags_line(text: str) -> tuple[int, re.Match[str]] | None:
    for index, line in enumerate(text.splitlines()):
        match = _FLAGS_LINE.match(line)
        if match:
            return index, match
    return None


def flags_of(text: str) -> list[str]:
    """The kubelet flags in a kubeadm flags file's text (empty when it sets none)."""
    found = _flags_line(text)
    if found is None:
        return []
    try:
        words = shlex.split(found[1]["value"])
    except ValueError as exc:
        raise FailedPrecondition(f"KUBELET_KUBEADM_ARGS cannot be read: {exc}") from exc
    return " ".join(words).split()


def edit_flags(text: str, changes: dict[str, str | None]) -> str:
    """The flags file's text with each flag of ``changes`` set to its value (None: the
    flag removed); everything else as it was."""
    found = _flags_line(text)
    if found is None:
        raise FailedPrecondition("no KUBELET_KUBEADM_ARGS line to edit")
    index, match = found
    value = match["value"]
    for flag, new in changes.items():
        value = _set_flag(value, flag, new)
    lines = text.splitlines(keepends=True)
    ending = lines[index][len(lines[index].rstrip("\r\n")) :]
    lines[index] = f"{match['head']}{value}{ending}"
    return "".join(lines)


def _set_flag(value: str, flag: str, new: str | None) -> str:
    pattern = re.compile(rf"(?<![^\s\"']){re.escape(flag)}(?P<sep>=|\s+)[^\s\"']*")
    matches = list(pattern.finditer(value))
    if new is not None and matches:
        return pattern.sub(lambda m: f"{flag}{m['sep']}{new}", value)
    if new is not None:
        return _append_flag(value, f"{flag}={new}")
    for m in reversed(matches):
        start, end = m.span()
        if start > 0 and value[start - 1] == " ":
            start -= 1
        elif end < len(value) and value[end] == " ":
            end += 1
        value = value[:start] + value[end:]
    return value


def _append_flag(value: str, flag: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return f"{value[0]}{inner} {flag}{value[0]}" if inner else f"{value[0]}{flag}{value[0]}"
    return f"{value} {flag}".strip()


# -- the config file: YAML (a mapping at the top) or JSON

_YAML_KEY = re.compile(r"^(?P<key>[A-Za-z]+)\s*:(?P<rest>.*)$")


def _yaml_scalar(rest: str) -> str:
    value = rest.strip()
    if value.startswith(("'", '"')):
        quote = value[0]
        end = value.find(quote, 1)
        return value[1:end] if end > 0 else value[1:]
    return value.split(" #", 1)[0].strip()


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def _yaml_lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    documents = sum(1 for line in lines if line.startswith("---"))
    if documents > 1 or any(line.startswith("...") for line in lines):
        raise FailedPrecondition("holds more than one YAML document; edit it by hand")
    return lines


def config_value(text: str, key: str) -> str | None:
    """The value of the top-level ``key`` in a kubelet config file's text."""
    if _is_json(text):
        value = _json(text).get(key)
        if isinstance(value, bool):
            return "true" if value else "false"
        # numbers as YAML would give them (healthzPort: 0 in a JSON file is 0, not absent)
        return str(value) if isinstance(value, str | int) else None
    value = None
    for line in _yaml_lines(text):
        match = _YAML_KEY.match(line)
        if match and match["key"] == key:
            value = _yaml_scalar(match["rest"])
    return value


def edit_config(text: str, changes: dict[str, str | None]) -> str:
    """The config file's text with each top-level key of ``changes`` set to its value
    (None: the key removed); everything else as it was (YAML) or re-indented (JSON)."""
    for key, value in changes.items():
        text = _set_json(text, key, value) if _is_json(text) else _set_yaml(text, key, value)
    return text


def _json(text: str) -> dict[str, object]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FailedPrecondition(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FailedPrecondition("not a JSON object")
    return data


def _set_json(text: str, key: str, value: str | None) -> str:
    data = _json(text)
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value
    return json.dumps(data, indent=2) + "\n"


def _set_yaml(text: str, key: str, value: str | None) -> str:
    lines = _yaml_lines(text)
    matches = [
        i for i, line in enumerate(lines) if (m := _YAML_KEY.match(line)) and m["key"] == key
    ]
    if len(matches) > 1:
        raise FailedPrecondition(f"sets {key} more than once; edit it by hand")
    if matches:
        index = matches[0]
        line = lines[index]
        ending = line[len(line.rstrip("\r\n")) :]
        if value is None:
            del lines[index]
        else:
            lines[index] = f"{key}: {value}{ending}"
    elif value is not None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{key}: {value}\n")
    return "".join(lines)
