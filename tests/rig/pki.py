"""Certificates for a test control plane, made with the openssl command line tool.

:class:`Pki` makes, in a directory it is given, a CA (ECDSA P-256, valid two days), leaf
certificates signed by it (server, client or both; subject and SANs as asked) and an RSA
key pair for service-account tokens. Nothing is read from or written to the host's
configuration: a private minimal openssl config keeps the host's defaults (and their CA
extensions on ``req -x509``) out.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
# Only what `openssl req` insists on; extensions come from -addext alone.
MINIMAL_CONFIG = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


class Pki:
    """A CA in ``directory`` and the certificates it signs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = directory / "openssl.cnf"
        self.ca = KeyPair(directory / "ca.crt", directory / "ca.key")

    def make_ca(self, name: str = "crishim-test-ca") -> KeyPair:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(MINIMAL_CONFIG)
        _openssl(
            "req", "-x509", "-config", str(self.config), "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", DAYS,
            "-keyout", str(self.ca.key), "-out", str(self.ca.cert), "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip
        return self.ca

    def issue(
        self,
        name: str,
        common_name: str,
        organization: str = "",
        *,
        server: bool = False,
        client: bool = True,
        sans: tuple[str, ...] = (),
    ) -> KeyPair:
        """A leaf certificate ``name.crt`` with key ``name.key``, signed by the CA.

        ``sans`` are openssl subjectAltName items (``IP:127.0.0.1``, ``DNS:localhost``).
        """
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        subject = (f"/O={organization}" if organization else "") + f"/CN={common_name}"
        usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        extensions = [
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext", "extendedKeyUsage=" + ",".join(usages),
        ]  # fmt: skip
        if sans:
            extensions += ["-addext", "subjectAltName=" + ",".join(sans)]
        _openssl(
            "req", "-x509", "-config", str(self.config), "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", DAYS,
            "-keyout", str(pair.key), "-out", str(pair.cert), "-subj", subject,
            "-CA", str(self.ca.cert), "-CAkey", str(self.ca.key), *extensions,
        )  # fmt: skip
        return pair

    def service_account_keys(self) -> tuple[Path, Path]:
        """(private key, public key) for signing and checking service-account tokens."""
        private, public = self.directory / "sa.key", self.directory / "sa.pub"
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                 "-out", str(private))  # fmt: skip
        _openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
        return private, public
