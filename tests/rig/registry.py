"""A real OCI registry for tests: Debian's ``docker-registry`` (distribution v2).

:class:`Registry` writes a config into a temp dir it owns, starts
``docker-registry serve <config.yml>`` in its own process group on a free
127.0.0.1 port, and waits until ``GET /v2/`` answers.  ``stop()`` kills the
whole process group and removes the temp dir; it also runs at interpreter exit,
and (via util-linux ``setpriv --pdeathsig``) the child gets SIGKILL if the
process that started it dies, so no registry outlives the test run.

Basic auth (``htpasswd={"user": "password"}``) needs bcrypt hashes.  They come
from, in order: apache2-utils' ``htpasswd``, the Python ``bcrypt`` package,
or the C library's crypt(3) through the stdlib ``crypt`` module (glibc's
libxcrypt does ``$2b$``).  If none works, :class:`RegistryConfigError` says so.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.rig.oci_image import RegistryClient

__all__ = [
    "DOCKER_REGISTRY_BIN",
    "Registry",
    "RegistryConfigError",
    "RegistryStartError",
    "bcrypt_hash",
    "bcrypt_method",
]

DOCKER_REGISTRY_BIN = "/usr/bin/docker-registry"
# The registry checks the hash on every request; the minimum cost keeps tests fast.
_BCRYPT_COST = 4


class RegistryStartError(RuntimeError):
    """The registry process did not come up."""


class RegistryConfigError(RuntimeError):
    """The requested registry configuration cannot be provided on this machine."""


# --- bcrypt ----------------------------------------------------------------


def _crypt_module_hash(password: str) -> str | None:
    try:
        with warnings.catch_warnings():
            # 'crypt' is deprecated (gone in 3.13), hence the optional import.
            warnings.simplefilter("ignore", DeprecationWarning)
            crypt = importlib.import_module("crypt")
    except ImportError:
        return None
    try:
        salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << _BCRYPT_COST)
        hashed = crypt.crypt(password, salt)
    except (AttributeError, OSError, ValueError):
        return None
    return hashed if isinstance(hashed, str) and hashed.startswith("$2") else None


def bcrypt_method() -> str | None:
    """Name the bcrypt source that :func:`bcrypt_hash` will use, or None."""
    if shutil.which("htpasswd"):
        return "htpasswd"
    with contextlib.suppress(ImportError):
        importlib.import_module("bcrypt")
        return "bcrypt"
    if _crypt_module_hash("probe") is not None:
        return "crypt"
    return None


def bcrypt_hash(password: str) -> str:
    """Return a bcrypt hash of *password* usable in a registry htpasswd file."""
    method = bcrypt_method()
    if method == "htpasswd":
        out = subprocess.run(
            ["htpasswd", "-nbB", "-C", str(_BCRYPT_COST), "u", password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.split(":", 1)[1]
    if method == "bcrypt":
        bcrypt = importlib.import_module("bcrypt")
        hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=_BCRYPT_COST))
        return hashed.decode()
    if method == "crypt":
        hashed_s = _crypt_module_hash(password)
        if hashed_s is not None:
            return hashed_s
    raise RegistryConfigError(
        "basic auth for the test registry needs bcrypt hashes, but none of these is available: "
        "the 'htpasswd' command (Debian package apache2-utils), the Python package 'bcrypt', "
        "or a crypt(3) with bcrypt support via the stdlib 'crypt' module"
    )


# --- process helpers -------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_exit_no_reap(pid: int, timeout: float) -> bool:
    """Wait until *pid* has exited but leave it a zombie; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True  # already reaped
        if info is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _yaml_str(s: str) -> str:
    # A YAML double-quoted scalar; fine for the paths and tokens used here.
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the registry ----------------------------------------------------------


class Registry:
    """A throw-away distribution registry on ``127.0.0.1:<free port>``.

    Usage::

        with Registry() as reg:
            push(reg.url, "library/busybox", "latest", busybox_image())

    ``start()`` is called by ``__enter__``; calling it directly is fine too.
    """

    def __init__(
        self,
        *,
        htpasswd: Mapping[str, str] | None = None,
        binary: str = DOCKER_REGISTRY_BIN,
        startup_timeout: float = 20.0,
        tmp_parent: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.binary = binary
        # A fixed port (for configs that name one, like the conformance certs.d); None: free.
        self._fixed_port = port
        self.startup_timeout = startup_timeout
        self.htpasswd: dict[str, str] | None = dict(htpasswd) if htpasswd is not None else None
        self._tmp_parent = tmp_parent
        self._tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        if self.htpasswd is not None:
            for user in self.htpasswd:
                if not user or ":" in user or "\n" in user:
                    raise ValueError(f"invalid htpasswd user name {user!r}")
            # Fail now, with the clear message, rather than after the spawn.
            if bcrypt_method() is None:
                bcrypt_hash("")

    # -- public properties --

    @property
    def port(self) -> int:
        if self._port is None or self._proc is None:
            raise RuntimeError("registry is not running")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first configured credential, handy for ``push(..., auth=)``."""
        if not self.htpasswd:
            return None
        user, password = next(iter(self.htpasswd.items()))
        return (user, password)

    @property
    def storage_dir(self) -> Path:
        """Root of the filesystem storage driver (to corrupt blobs on purpose)."""
        if self._tmpdir is None:
            raise RuntimeError("registry is not running")
        return self._tmpdir / "storage"

    @property
    def log_path(self) -> Path:
        if self._tmpdir is None:
            raise RuntimeError("registry is not running")
        return self._tmpdir / "registry.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, auth: tuple[str, str] | None = None) -> RegistryClient:
        return RegistryClient(self.url, auth if auth is not None else self.auth)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except (OSError, RuntimeError):
            return ""
        return data[-limit:].decode(errors="replace")

    # -- lifecycle --

    def start(self) -> Self:
        with self._lock:
            if self._proc is not None:
                return self
            if not os.access(self.binary, os.X_OK):
                raise RegistryStartError(
                    f"{self.binary} not found; install the Debian package 'docker-registry'"
                )
            self._tmpdir = Path(tempfile.mkdtemp(prefix="crishim-registry-", dir=self._tmp_parent))
            atexit.register(self.stop)
            try:
                self._write_auth()
                # The port is probed then released, so another process can grab it
                # before the registry binds: retry on "address already in use".
                for _attempt in range(1 if self._fixed_port else 5):
                    self._port = self._fixed_port or _free_port()
                    config = self._write_config(self._port)
                    if self._spawn_and_wait(config):
                        return self
                raise RegistryStartError(
                    "docker-registry could not bind a port after 5 attempts; log:\n"
                    + self.log_tail()
                )
            except BaseException:
                self._stop_locked()
                raise

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --

    def _write_auth(self) -> None:
        assert self._tmpdir is not None
        if self.htpasswd is None:
            return
        lines = [f"{user}:{bcrypt_hash(pw)}\n" for user, pw in self.htpasswd.items()]
        (self._tmpdir / "htpasswd").write_text("".join(lines))

    def _write_config(self, port: int) -> Path:
        assert self._tmpdir is not None
        storage = self._tmpdir / "storage"
        storage.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {_yaml_str(str(storage))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {_yaml_str(f'127.0.0.1:{port}')}",
            f"  secret: {_yaml_str(secrets.token_hex(16))}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.htpasswd is not None:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: crishim-test",
                f"    path: {_yaml_str(str(self._tmpdir / 'htpasswd'))}",
            ]
        path = self._tmpdir / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn_and_wait(self, config: Path) -> bool:
        """Start the process; True once it serves, False on a port clash."""
        assert self._tmpdir is not None
        # REGISTRY_* variables override the config file; keep them out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        argv = [self.binary, "serve", str(config)]
        # setpriv makes the kernel SIGKILL the registry if this process dies
        # without cleaning up.  PDEATHSIG follows the *thread* that forked, so
        # only use it from the main thread, whose end is the process's end.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._tmpdir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        probe = f"http://127.0.0.1:{self._port}/v2/"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = self.log_tail()
                self._proc = None
                if "address already in use" in tail:
                    return False
                raise RegistryStartError(
                    f"docker-registry exited with code {rc} during startup; log:\n{tail}"
                )
            try:
                with opener.open(probe, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except urllib.error.HTTPError as e:
                # 401 means it is up and auth is on.
                if e.code == 401 and self.htpasswd is not None:
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RegistryStartError(
                    f"docker-registry did not answer GET {probe} within {self.startup_timeout}s; "
                    f"log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _stop_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # start_new_session made pid == pgid: signal the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            if not _wait_exit_no_reap(proc.pid, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _wait_exit_no_reap(proc.pid, 5.0)
            # Sweep anything else left in the group while the unreaped leader
            # still pins the group id (so it cannot have been reused).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        tmp, self._tmpdir = self._tmpdir, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        self._port = None
        atexit.unregister(self.stop)

    def __repr__(self) -> str:
        state = f"{self.host}" if self.running else "stopped"
        return f"<Registry {state}>"
