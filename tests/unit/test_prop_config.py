"""Property tests of the config loader: any file gives a usable Config or a ConfigError.

Files are arbitrary TOML documents (known and random keys, any values), valid
configurations with random edits (wrong types, unknown keys, bad values), and arbitrary
bytes; as the main file or as a drop-in. A Config that loads must be usable as is (paths
the OS accepts, ports that are numbers) and must render to TOML that loads back to itself.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crishim.config import DROP_IN_DIR_NAME, Config, load_config, render_config
from crishim.errors import ConfigError
from tests.rig.bounds import outcome
from tests.rig.toml_doc import mutated_documents, toml_documents, toml_text, toml_values

SECONDS = 2.0

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_known_keys = [
    *Config.model_fields,
    "path",
    "config_path",
    "conf_dir",
    "bin_dirs",
    "address",
    "max_sessions",
    "max_handshakes",
    "request_timeout",
    "idle_timeout",
    "allow_remote",
    "runc",
    "crun",
]
_keys = st.one_of(st.sampled_from(_known_keys), _text)
_absolute = _text.map(lambda text: "/" + text)
_address = st.one_of(
    st.sampled_from(["127.0.0.1:0", "[::1]:9464", "0.0.0.0:65535", "localhost:80"]),
    st.builds(lambda host, port: f"{host}:{port}", _text, _text),
    st.builds(lambda host, port: f"{host}:{port}", _text, st.integers(-1, 70000)),
)


@st.composite
def valid_config_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Documents of known keys with values of the right shape (some still refused)."""
    document: dict[str, Any] = {}
    for key in ("root", "state", "socket"):
        if draw(st.booleans()):
            document[key] = draw(_absolute)
    if draw(st.booleans()):
        document["log_level"] = draw(st.sampled_from(["debug", "info", "warning", "error"]))
    if draw(st.booleans()):
        document["cgroup_driver"] = draw(st.sampled_from(["cgroupfs", "systemd"]))
    runtimes = draw(
        st.dictionaries(
            st.one_of(st.sampled_from(["runc", "crun", "kata", "my.runtime"]), _text),
            st.fixed_dictionaries(
                {"path": st.one_of(st.sampled_from(["runc", "/usr/bin/crun"]), _text)},
                optional={"root": st.one_of(st.just(""), _absolute)},
            ),
            max_size=3,
        )
    )
    if runtimes:
        document["runtimes"] = runtimes
        document["default_runtime"] = draw(st.sampled_from([*runtimes, "runc"]))
    if draw(st.booleans()):
        document["registry"] = {"config_path": draw(_absolute)}
    if draw(st.booleans()):
        document["cni"] = draw(
            st.fixed_dictionaries(
                {}, optional={"conf_dir": _absolute, "bin_dirs": st.lists(_absolute, max_size=3)}
            )
        )
    if draw(st.booleans()):
        counts = st.one_of(st.integers(-1, 2**40), st.floats(), st.text(max_size=3))
        seconds = st.one_of(st.floats(), st.integers(-1, 2**40), st.sampled_from(["4h", "10"]))
        document["streaming"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "address": _address,
                    "max_sessions": counts,
                    "max_handshakes": counts,
                    "request_timeout": seconds,
                    "idle_timeout": seconds,
                },
            )
        )
    if draw(st.booleans()):
        document["metrics"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "address": st.one_of(st.just(""), _address),
                    "allow_remote": st.booleans(),
                },
            )
        )
    return document


def _check_config(config: Config) -> None:
    """What the rest of crishim relies on, and that the rendered form loads back."""
    paths = [config.root, config.state, config.socket, config.registry.config_path]
    paths += [config.cni.conf_dir, *config.cni.bin_dirs]
    paths += [runtime.root for runtime in config.runtimes.values() if runtime.root]
    for path in paths:
        assert os.path.isabs(path), path
        assert "\0" not in path, path
    for runtime in config.runtimes.values():
        assert runtime.path.strip()
        assert "\0" not in runtime.path
    assert config.default_runtime in config.runtimes
    streaming = config.streaming
    assert streaming.max_sessions >= 1
    assert streaming.max_handshakes >= 1
    assert math.isfinite(streaming.request_timeout)
    assert streaming.request_timeout > 0
    assert math.isfinite(streaming.idle_timeout)
    assert streaming.idle_timeout >= 0
    for address in (config.streaming.address, config.metrics.address or "x:0"):
        host, _, port = address.rpartition(":")
        assert host
        assert port.isascii()
        assert 0 <= int(port) <= 65535


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("etc-crishim")


def load_files(config_dir: Path, main: bytes, drop_in: bytes | None = None) -> None:
    """Load ``main`` (and one drop-in) and check the outcome; the error names a file."""
    main_file = config_dir / "crishim.toml"
    main_file.write_bytes(main)
    drop_ins = config_dir / DROP_IN_DIR_NAME
    drop_ins.mkdir(exist_ok=True)
    drop_in_file = drop_ins / "50-test.toml"
    if drop_in is None:
        drop_in_file.unlink(missing_ok=True)
    else:
        drop_in_file.write_bytes(drop_in)
    config = outcome(lambda: load_config(main_file), ConfigError, SECONDS)
    if isinstance(config, ConfigError):
        assert str(config).startswith((f"{main_file}: ", f"{drop_in_file}: ")), str(config)
        return
    _check_config(config)
    for comments in (True, False):
        main_file.write_text(render_config(config, comments=comments))
        drop_in_file.unlink(missing_ok=True)
        again = outcome(lambda: load_config(main_file), ConfigError, SECONDS)
        assert again == config, f"{again}\n--- rendered as ---\n{main_file.read_text()}"


def _text_bytes(document: dict[str, Any]) -> bytes:
    return toml_text(document).encode()


@given(toml_documents(_keys, toml_values(_keys)))
def test_any_document_gives_a_usable_config_or_config_error(
    config_dir: Path, document: dict[str, Any]
) -> None:
    load_files(config_dir, _text_bytes(document))


@given(valid_config_documents())
@example({"runtimes": {"my.runtime": {"path": "x"}}, "default_runtime": "runc"})
@example({"root": "/caf\u00e9/\U0001f600"})
@example({"socket": "/run/\x7f.sock"})
@example({"root": "/a\0b"})
@example({"streaming": {"address": "localhost:\u0661\u0662"}})
@example({"metrics": {"address": "localhost:\u00b2"}})
def test_valid_documents_give_a_usable_config_or_config_error(
    config_dir: Path, document: dict[str, Any]
) -> None:
    load_files(config_dir, _text_bytes(document))


@given(mutated_documents(valid_config_documents(), _keys))
def test_edited_documents_give_a_usable_config_or_config_error(
    config_dir: Path, document: dict[str, Any]
) -> None:
    load_files(config_dir, _text_bytes(document))


@given(valid_config_documents(), mutated_documents(valid_config_documents(), _keys))
def test_a_bad_drop_in_is_named_in_the_error(
    config_dir: Path, main: dict[str, Any], drop_in: dict[str, Any]
) -> None:
    load_files(config_dir, _text_bytes(main), _text_bytes(drop_in))


@given(
    st.one_of(
        st.binary(max_size=200),
        valid_config_documents()
        .map(_text_bytes)
        .flatmap(
            lambda text: st.tuples(st.just(text), st.integers(0, len(text)), st.binary(max_size=4))
        )
        .map(lambda cut: cut[0][: cut[1]] + cut[2] + cut[0][cut[1] :]),
    )
)
@example(b'root = "\xff"\n')
@example(b"a = " + b"[" * 2000 + b"]" * 2000)
@example(b"cni = " + b"{a = " * 1000 + b"1" + b"}" * 1000)
def test_any_bytes_give_a_usable_config_or_config_error(config_dir: Path, content: bytes) -> None:
    load_files(config_dir, content)


def _without_nan(value: Any) -> Any:
    """NaN is the one TOML value not equal to itself: compare it as a marker."""
    if isinstance(value, float) and math.isnan(value):
        return "<nan>"
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


@given(toml_documents(_keys, toml_values(_keys)))
def test_the_toml_writer_of_these_tests_round_trips(document: dict[str, Any]) -> None:
    # Otherwise a writer bug would turn every example into a dull "not valid TOML".
    assert _without_nan(tomllib.loads(toml_text(document))) == _without_nan(document)
