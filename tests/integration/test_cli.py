"""The crishim command: version, config and doctor, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from crishim import __version__
from crishim.config import Config


def crishim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crishim.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    out = crishim("version")
    assert out.returncode == 0
    assert out.stdout.startswith(f"crishim {__version__} (CRI v1")


def test_config_default_is_the_commented_template() -> None:
    out = crishim("config", "--default")
    assert out.returncode == 0
    assert out.stdout.count("\n# ") > 10
    assert Config.model_validate(tomllib.loads(out.stdout)) == Config()


def test_config_shows_files_and_flags_merged(tmp_path: Path) -> None:
    main = tmp_path / "crishim.toml"
    main.write_text('[cni]\nconf_dir = "/from/file"\n')
    (tmp_path / "crishim.d").mkdir()
    (tmp_path / "crishim.d" / "10.toml").write_text('cgroup_driver = "systemd"\n')
    out = crishim("config", "--config", str(main), "--socket", "/x/y.sock")
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(out.stdout)
    assert effective["cni"]["conf_dir"] == "/from/file"
    assert effective["cgroup_driver"] == "systemd"
    assert effective["socket"] == "/x/y.sock"


def test_bad_config_stops_serve_with_file_key_and_problem(tmp_path: Path) -> None:
    main = tmp_path / "crishim.toml"
    main.write_text('socket = "/run/x.sock"\n[streaming]\nadress = "127.0.0.1:1"\n')
    out = crishim("serve", "--config", str(main))
    assert out.returncode == 2
    assert out.stderr.strip() == f"crishim: {main}: streaming.adress: unknown key"


def doctor_config(tmp_path: Path, runc: str = "runc") -> Path:
    cni = tmp_path / "cni"
    cni.mkdir(exist_ok=True)
    conf = {
        "cniVersion": "1.0.0",
        "name": "doctor",
        "plugins": [{"type": "bridge"}, {"type": "host-local"}, {"type": "portmap"}],
    }
    (cni / "10-doctor.conflist").write_text(json.dumps(conf))
    main = tmp_path / "crishim.toml"
    main.write_text(
        f'root = "{tmp_path / "root"}"\nsocket = "{tmp_path / "s" / "c.sock"}"\n'
        f'[cni]\nconf_dir = "{cni}"\nbin_dirs = ["/usr/lib/cni"]\n'
        f'[runtimes.runc]\npath = "{runc}"\n'
    )
    return main


def test_doctor_reports_each_check(tmp_path: Path) -> None:
    out = crishim("doctor", "--config", str(doctor_config(tmp_path)))
    lines = out.stdout.splitlines()
    subjects = [line.split(":", 1)[0].split(None, 1)[1] for line in lines]
    assert subjects == [
        "runtime runc",
        "runtime crun",
        "catatonit",
        "conmon",
        "cgroups",
        "cgroup driver cgroupfs",
        "overlayfs",
        "cni config",
        "cni plugins",
        "socket",
    ]
    assert all(line.split()[0] in ("OK", "WARN") for line in lines), out.stdout
    assert out.returncode == 0
    assert any(line.startswith("OK    runtime runc: /") for line in lines)
    assert any("10-doctor.conflist: network 'doctor'" in line for line in lines)


def test_doctor_fails_when_the_default_runtime_is_missing(tmp_path: Path) -> None:
    out = crishim("doctor", "--config", str(doctor_config(tmp_path, runc="/nonexistent/runc")))
    assert out.returncode == 1
    assert "FAIL  runtime runc: /nonexistent/runc: not found (the default runtime)" in out.stdout


def test_doctor_fails_on_missing_cni_plugins(tmp_path: Path) -> None:
    main = doctor_config(tmp_path)
    conf = tmp_path / "cni" / "10-doctor.conflist"
    conf.write_text(conf.read_text().replace("portmap", "no-such-plugin"))
    out = crishim("doctor", "--config", str(main))
    assert out.returncode == 1
    assert "FAIL  cni plugins: no-such-plugin not found in /usr/lib/cni" in out.stdout


def test_images_import_without_a_running_crishim_says_so(tmp_path: Path) -> None:
    archive = tmp_path / "archive.tar"
    archive.write_bytes(b"")
    socket = tmp_path / "absent.sock"
    out = crishim("images", "import", "--socket", str(socket), str(archive))
    assert out.returncode == 2
    assert out.stderr.startswith(f"crishim: cannot reach crishim on {socket} (")
    assert "is `crishim serve` running" in out.stderr


def test_doctor_names_the_default_network_while_the_conf_dir_is_empty(tmp_path: Path) -> None:
    main = doctor_config(tmp_path)
    (tmp_path / "cni" / "10-doctor.conflist").unlink()
    with main.open("a") as file:
        file.write('[cni.default_network]\nsubnet = "10.86.5.0/24"\nbridge = "crishim-doc0"\n')
    out = crishim("doctor", "--config", str(main))
    assert (
        f"OK    cni config: none in {tmp_path / 'cni'}: new pods join crishim's built-in default "
        "network 'crishim-default' (bridge crishim-doc0, subnet 10.86.5.0/24) until a network "
        "plugin writes its config there"
    ) in out.stdout
    assert "OK    cni plugins: bridge, portmap, host-local in /usr/lib/cni" in out.stdout


def test_doctor_warns_of_an_empty_conf_dir_with_the_default_off(tmp_path: Path) -> None:
    main = doctor_config(tmp_path)
    (tmp_path / "cni" / "10-doctor.conflist").unlink()
    with main.open("a") as file:
        file.write("[cni.default_network]\nenabled = false\n")
    out = crishim("doctor", "--config", str(main))
    assert (
        f"WARN  cni config: no CNI network config found in {tmp_path / 'cni'} (the built-in "
        "default network is off: [cni.default_network] enabled = false); NetworkReady stays "
        "false and only host-network pods can run"
    ) in out.stdout


def test_doctor_warns_when_the_default_networks_plugins_are_missing(tmp_path: Path) -> None:
    main = doctor_config(tmp_path)
    (tmp_path / "cni" / "10-doctor.conflist").unlink()
    main.write_text(main.read_text().replace('bin_dirs = ["/usr/lib/cni"]', 'bin_dirs = ["/x"]'))
    out = crishim("doctor", "--config", str(main))
    assert "WARN  cni plugins: bridge, portmap, host-local not found in /x" in out.stdout
