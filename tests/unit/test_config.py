"""Configuration: defaults, files, drop-ins, flags, errors and rendering."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from crishim.config import Config, RuntimeHandlerConfig, load_config, render_config
from crishim.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_match_the_design() -> None:
    config = Config()
    assert config.socket == "/run/crishim/crishim.sock"
    assert config.root == "/var/lib/crishim"
    assert config.state == "/run/crishim"
    assert config.default_runtime == "runc"
    assert config.conmon == "conmon"
    assert set(config.runtimes) == {"runc", "crun"}
    assert config.cni.conf_dir == "/etc/cni/net.d"
    assert config.cni.bin_dirs == ["/opt/cni/bin", "/usr/lib/cni"]
    assert config.cni.default_network.enabled is True
    assert config.cni.default_network.subnet == "10.86.0.0/24"
    assert config.cni.default_network.bridge == "crishim0"
    assert config.streaming.address.startswith("127.0.0.1:")
    assert config.streaming.max_sessions == 128
    assert config.streaming.max_handshakes == 128
    assert config.streaming.request_timeout == 10
    assert config.streaming.idle_timeout == 4 * 3600  # kubelet's streamingConnectionIdleTimeout


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("crishim.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    assert load_config() == Config()


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml: config file does not exist"):
        load_config(tmp_path / "absent.toml")


def test_drop_ins_merge_over_main_file_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path / "crishim.toml", 'log_level = "debug"\n[cni]\nconf_dir = "/a"\n')
    write(tmp_path / "crishim.d" / "20-b.toml", '[cni]\nconf_dir = "/b"\n')
    write(tmp_path / "crishim.d" / "10-a.toml", '[cni]\nconf_dir = "/x"\nbin_dirs = ["/bin1"]\n')
    write(tmp_path / "crishim.d" / "ignored.conf", "this is not toml")
    config = load_config(main)
    assert config.log_level == "debug"
    assert config.cni.conf_dir == "/b"  # 20-b wins over 10-a
    assert config.cni.bin_dirs == ["/bin1"]  # tables merge key by key


def test_flags_override_files(tmp_path: Path) -> None:
    main = write(tmp_path / "crishim.toml", 'root = "/from/file"\nsocket = "/file.sock"\n')
    config = load_config(main, {"root": "/from/flag", "socket": None})
    assert config.root == "/from/flag"
    assert config.socket == "/file.sock"


def test_conmon_can_be_moved(tmp_path: Path) -> None:
    main = write(tmp_path / "crishim.toml", 'conmon = "/opt/conmon/bin/conmon"\n')
    assert load_config(main).conmon == "/opt/conmon/bin/conmon"


def test_new_runtime_keeps_the_predefined_ones(tmp_path: Path) -> None:
    main = write(
        tmp_path / "crishim.toml",
        'default_runtime = "kata"\n[runtimes.kata]\npath = "/usr/bin/kata-runtime"\n',
    )
    config = load_config(main)
    assert set(config.runtimes) == {"runc", "crun", "kata"}
    assert config.runtime_root("kata") == "/run/crishim/runtimes/kata"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    main = write(tmp_path / "crishim.toml", "")
    bad = write(tmp_path / "crishim.d" / "50-bad.toml", "[cni]\nconfdir = '/x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value) == f"{bad}: cni.confdir: unknown key"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('log_level = "loud"', "log_level: Input should be 'debug', 'info', 'warning' or 'error'"),
        ('root = "relative/dir"', "root: must be an absolute path, got 'relative/dir'"),
        ('socket = "/run/\\u0000.sock"', "socket: must not contain a NUL character"),
        ('[runtimes.runc]\npath = "runc\\u0000"', "runtimes.runc.path: must not contain a NUL"),
        ('[cni]\nbin_dirs = ["/a", "/\\u0000"]', "cni.bin_dirs: must not contain a NUL"),
        ('default_runtime = "nope"', "default_runtime 'nope' is not a configured runtime"),
        ("[cni]\nbin_dirs = []", "cni.bin_dirs: must name at least one directory"),
        ('conmon = " "', "conmon: must name a binary"),
        (
            '[cni.default_network]\nsubnet = "10.86.0.1/24"',
            "cni.default_network.subnet: must name the network address: 10.86.0.0/24, "
            "not '10.86.0.1/24'",
        ),
        (
            '[cni.default_network]\nsubnet = "10.86.0"',
            "cni.default_network.subnet: must be a CIDR subnet like 10.86.0.0/24, got '10.86.0'",
        ),
        (
            '[cni.default_network]\nsubnet = "10.86.0.0/31"',
            "cni.default_network.subnet: 10.86.0.0/31 is too small",
        ),
        (
            '[cni.default_network]\nsubnet = "0.0.0.0/0"',
            "cni.default_network.subnet: 0.0.0.0/0 is too large",
        ),
        (
            '[cni.default_network]\nsubnet = "127.0.0.0/8"',
            "cni.default_network.subnet: 127.0.0.0/8 is a loopback, link-local, multicast",
        ),
        (
            '[cni.default_network]\nsubnet = "169.254.0.0/16"',
            "cni.default_network.subnet: 169.254.0.0/16 is a loopback, link-local, multicast",
        ),
        (
            '[cni.default_network]\nbridge = "crishim-bridge-0"',
            "cni.default_network.bridge: must be a Linux interface name: 1 to 15 letters",
        ),
        (
            '[cni.default_network]\nbridge = "br 0"',
            "cni.default_network.bridge: must be a Linux interface name",
        ),
        (
            '[cni.default_network]\nenabled = "yes"',
            "cni.default_network.enabled: Input should be a valid boolean",
        ),
        ("[cni.default_network]\nsize = 3", "cni.default_network.size: unknown key"),
        ('[streaming]\naddress = "localhost"', "streaming.address: must be host:port"),
        ('[streaming]\naddress = "localhost:\u0661\u0662"', "streaming.address: must be host:port"),
        ('[metrics]\naddress = "localhost:\u00b2"', "metrics.address: must be host:port"),
        (f'[metrics]\naddress = "localhost:{"9" * 5000}"', "metrics.address: must be host:port"),
        ('[runtimes.x]\nroot = "/r"', "runtimes.x.path: Field required"),
        ("cgroup_driver = 1", "cgroup_driver: Input should be 'cgroupfs' or 'systemd'"),
        (
            "[streaming]\nmax_sessions = 0",
            "streaming.max_sessions: Input should be greater than or equal to 1",
        ),
        (
            "[streaming]\nmax_sessions = 1.5",
            "streaming.max_sessions: Input should be a valid integer",
        ),
        (
            "[streaming]\nmax_handshakes = true",
            "streaming.max_handshakes: Input should be a valid integer",
        ),
        (
            "[streaming]\nrequest_timeout = 0",
            "streaming.request_timeout: Input should be greater than 0",
        ),
        (
            "[streaming]\nrequest_timeout = nan",
            "streaming.request_timeout: Input should be a finite number",
        ),
        (
            '[streaming]\nidle_timeout = "4h"',
            "streaming.idle_timeout: must be a number of seconds, got '4h'",
        ),
        (
            "[streaming]\nidle_timeout = true",
            "streaming.idle_timeout: must be a number of seconds, got True",
        ),
        (
            "[streaming]\nidle_timeout = -1",
            "streaming.idle_timeout: Input should be greater than or equal to 0",
        ),
        (
            "[streaming]\nidle_timeout = inf",
            "streaming.idle_timeout: Input should be a finite number",
        ),
    ],
)
def test_bad_values_are_refused_with_file_key_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    main = write(tmp_path / "crishim.toml", text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value).startswith(f"{main}: ")
    assert problem in str(info.value)


def test_streaming_timeouts_take_whole_or_fractional_seconds_and_0_disables_idle(
    tmp_path: Path,
) -> None:
    main = write(
        tmp_path / "crishim.toml",
        "[streaming]\nmax_sessions = 2\nrequest_timeout = 2.5\nidle_timeout = 0\n",
    )
    config = load_config(main)
    assert config.streaming.max_sessions == 2
    assert config.streaming.request_timeout == 2.5
    assert config.streaming.idle_timeout == 0
    assert Config.model_validate(tomllib.loads(render_config(config, comments=False))) == config


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    main = write(tmp_path / "crishim.toml", "root = \n")
    with pytest.raises(ConfigError, match=r"crishim\.toml: not valid TOML"):
        load_config(main)


def test_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    main = tmp_path / "crishim.toml"
    main.write_bytes(b'root = "/\xff"\n')
    with pytest.raises(ConfigError, match=r"crishim\.toml: not valid TOML: 'utf-8' codec"):
        load_config(main)


@pytest.mark.parametrize(
    "text", ["a = " + "[" * 5000 + "]" * 5000, "cni = " + "{a = " * 2000 + "1" + "}" * 2000]
)
def test_file_nested_too_deeply_names_the_file(tmp_path: Path, text: str) -> None:
    main = write(tmp_path / "crishim.toml", text + "\n")
    with pytest.raises(ConfigError, match=r"crishim\.toml: not valid TOML: .* nested too deeply"):
        load_config(main)


def test_bad_flag_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command line: socket: must be an absolute path"):
        load_config(write(tmp_path / "c.toml", ""), {"socket": "rel.sock"})


def test_default_template_is_commented_and_parses_back_to_the_defaults() -> None:
    text = render_config(Config(), comments=True)
    assert "# unix socket kubelet connects to" in text
    assert "idle_timeout = 14400.0" in text
    assert "[runtimes.crun]" in text
    assert 'conmon = "conmon"' in text
    assert Config.model_validate(tomllib.loads(text)) == Config()


def test_effective_config_round_trips(tmp_path: Path) -> None:
    main = write(
        tmp_path / "crishim.toml", '[cni]\nbin_dirs = ["/x", "/y"]\n[runtimes.k]\npath = "k"\n'
    )
    config = load_config(main)
    assert Config.model_validate(tomllib.loads(render_config(config, comments=False))) == config


def test_strings_of_any_character_render_as_valid_toml() -> None:
    config = Config(root='/caf\u00e9/\U0001f600/\x7f\x01"\\')
    assert Config.model_validate(tomllib.loads(render_config(config, comments=False))) == config


def test_runtime_names_that_are_not_bare_keys_are_quoted() -> None:
    runtimes = {
        "runc": RuntimeHandlerConfig(path="runc"),
        'my.rt "x"': RuntimeHandlerConfig(path="k"),
    }
    config = Config(runtimes=runtimes)
    text = render_config(config, comments=False)
    assert '[runtimes."my.rt \\"x\\""]' in text
    assert Config.model_validate(tomllib.loads(text)) == config
