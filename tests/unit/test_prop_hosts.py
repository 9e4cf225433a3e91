"""Property tests of hosts.toml reading: any file gives usable endpoints or a ConfigError.

Files are arbitrary TOML documents, valid ones with random edits, and arbitrary bytes; the
domain asked for is arbitrary text too. What comes back must be usable as is by the
registry client: URLs httpx accepts, header lines an HTTP/1.1 client will send, file paths
the ssl module can open, a finite dial timeout.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crishim.errors import ConfigError, CrishimError, InvalidArgument
from crishim.images.hosts import ALL_CAPABILITIES, RegistryHost, load_hosts
from tests.rig.bounds import outcome
from tests.rig.toml_doc import mutated_documents, toml_documents, toml_text, toml_values

DOMAIN = "registry.example:5000"
SECONDS = 2.0
# Go's time.Duration is an int64 of nanoseconds: about 292 years.
GO_DURATION_MAX_SECONDS = (2**63 - 1) / 1e9

_host_keys = [
    "capabilities",
    "skip_verify",
    "ca",
    "client",
    "header",
    "override_path",
    "dial_timeout",
]
_keys = st.one_of(
    st.sampled_from([*_host_keys, "server", "host"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=10),
)

_file_name = st.one_of(
    st.sampled_from(["ca.crt", "/etc/ssl/ca.pem", "../up.crt", "client.cert", "client.key"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
)
_url = st.one_of(
    st.sampled_from(
        [
            "https://mirror.example",
            "http://127.0.0.1:5000",
            "mirror.example:443/v2",
            "https://docker.io",
            "https://[::1]:5000/prefix/",
            "https://mirror.example/a/../b",
            "",
        ]
    ),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
        st.sampled_from(["https://", "http://", "", "ftp://", "HTTPS://"]),
        st.one_of(
            st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True),
            st.text(st.characters(exclude_categories=["Cs"]), max_size=10),
        ),
        st.one_of(st.just(""), st.integers(-1, 70000).map(lambda p: f":{p}")),
        st.one_of(st.just(""), st.text(st.characters(exclude_categories=["Cs"]), max_size=10)),
    ),
)
_header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=10),
)
_strings_or_list = st.one_of(st.text(max_size=0), _file_name, st.lists(_file_name, max_size=3))
_duration_part = st.builds(
    lambda number, unit: number + unit,
    st.one_of(
        st.integers(0, 9999).map(str),
        st.floats(0, 9999, allow_nan=False).map(lambda f: f"{f:.3f}"),
        st.integers(0, 999).map(lambda n: f".{n}"),
    ),
    st.sampled_from(["ns", "us", "\u00b5s", "ms", "s", "m", "h"]),
)
_durations = st.one_of(
    st.lists(_duration_part, min_size=1, max_size=3).map("".join),
    st.integers(300, 320).map(lambda digits: "9" * digits + "s"),
    st.sampled_from(["", "0", "5s", "+1m30s", "-1s", "1d", "s", "1.s"]),
)


@st.composite
def _host_table(draw: st.DrawFn) -> dict[str, Any]:
    table: dict[str, Any] = {}
    if draw(st.booleans()):
        table["capabilities"] = draw(
            st.lists(st.sampled_from(["pull", "resolve", "push", "PULL"]), max_size=3)
        )
    for key in ("skip_verify", "override_path"):
        if draw(st.booleans()):
            table[key] = draw(st.booleans())
    if draw(st.booleans()):
        table["ca"] = draw(_strings_or_list)
    if draw(st.booleans()):
        table["client"] = draw(
            st.lists(st.one_of(_file_name, st.tuples(_file_name, _file_name).map(list)), max_size=2)
        )
    if draw(st.booleans()):
        table["header"] = draw(
            st.dictionaries(
                st.from_regex(r"[A-Za-z0-9-]{1,10}", fullmatch=True),
                st.one_of(_header_values, st.lists(_header_values, max_size=2)),
                max_size=2,
            )
        )
    if draw(st.booleans()):
        table["dial_timeout"] = draw(_durations)
    return table


@st.composite
def valid_hosts_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Documents that use the known keys with values of the right types."""
    document = draw(_host_table())
    if draw(st.booleans()):
        document["server"] = draw(_url)
    mirrors = draw(st.dictionaries(_url, _host_table(), max_size=3))
    if mirrors:
        document["host"] = mirrors
    return document


_CLIENT = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))


def _check_host(host: RegistryHost) -> None:
    """What the registry client relies on for one endpoint."""
    for url in (host.url, host.api_base):
        assert url.startswith(("http://", "https://")), url
    assert host.api_base.startswith(host.url)
    assert host.capabilities
    assert host.capabilities <= ALL_CAPABILITIES
    for path in (*host.ca, *(p for pair in host.client for p in pair if p is not None)):
        assert os.path.isabs(path), path
        assert "\0" not in path, path
    # What httpx sends over HTTP/1.1 (values joined as registry.py does).
    headers = [(name, ",".join(values)) for name, values in host.header.items()]
    host_header = [] if any(name.lower() == "host" for name, _ in headers) else [("Host", "x")]
    h11.Request(method="GET", target="/v2/", headers=[*host_header, *headers])
    # A request as registry.py makes it, up to the transport.
    response = _CLIENT.get(f"{host.api_base}/library/busybox/manifests/latest", headers=headers)
    assert response.status_code == 200
    if host.dial_timeout is not None:
        assert math.isfinite(host.dial_timeout), host.dial_timeout
        assert 0 < host.dial_timeout <= GO_DURATION_MAX_SECONDS


def _check_hosts(hosts: list[RegistryHost]) -> None:
    assert hosts
    assert [host.is_mirror for host in hosts] == [True] * (len(hosts) - 1) + [False]
    for host in hosts:
        _check_host(host)


@pytest.fixture(scope="module")
def certs_d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs.d")


def load_file(certs_d: Path, content: bytes) -> None:
    """Write ``content`` as the domain's hosts.toml and check what loading it gives."""
    hosts_file = certs_d / "registry.example_5000_" / "hosts.toml"
    hosts_file.parent.mkdir(exist_ok=True)
    hosts_file.write_bytes(content)
    hosts = outcome(lambda: load_hosts(str(certs_d), DOMAIN), ConfigError, SECONDS)
    if isinstance(hosts, ConfigError):
        assert str(hosts).startswith(f"{hosts_file}: "), str(hosts)
    else:
        _check_hosts(hosts)


def _text_bytes(document: dict[str, Any]) -> bytes:
    return toml_text(document).encode()


@given(toml_documents(_keys, toml_values(_keys)))
def test_any_document_gives_usable_hosts_or_config_error(
    certs_d: Path, document: dict[str, Any]
) -> None:
    load_file(certs_d, _text_bytes(document))


@given(valid_hosts_documents())
@example({"header": {"X-A": "caf\u00e9"}})
@example({"header": {"X-A": ["ok", "bell\x07"]}})
@example({"ca": "ca\0.crt"})
@example({"client": [["a.cert", "b\0.key"]]})
@example({"dial_timeout": "9" * 310 + "h"})
def test_valid_documents_give_usable_hosts_or_config_error(
    certs_d: Path, document: dict[str, Any]
) -> None:
    load_file(certs_d, _text_bytes(document))


@given(mutated_documents(valid_hosts_documents(), _keys))
def test_edited_documents_give_usable_hosts_or_config_error(
    certs_d: Path, document: dict[str, Any]
) -> None:
    load_file(certs_d, _text_bytes(document))


@given(
    st.one_of(
        st.binary(max_size=200),
        valid_hosts_documents()
        .map(_text_bytes)
        .flatmap(
            lambda text: st.tuples(st.just(text), st.integers(0, len(text)), st.binary(max_size=4))
        )
        .map(lambda cut: cut[0][: cut[1]] + cut[2] + cut[0][cut[1] :]),
    )
)
@example(b"a = " + b"[" * 2000 + b"]" * 2000)
@example(b"header = " + b"{a = " * 1000 + b"1" + b"}" * 1000)
@example(b'server = "\xff"')
def test_any_bytes_give_usable_hosts_or_config_error(certs_d: Path, content: bytes) -> None:
    load_file(certs_d, content)


@given(
    st.one_of(
        st.text(max_size=300),
        st.text(min_size=200, max_size=600),
        st.sampled_from([".", "..", "_default", "a/b", "x.io:", "[::1]:", "..:5000"]),
    )
)
@example("a" * 300)
@example("a" * 250 + ":5000")
def test_any_domain_gives_hosts_or_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, domain: str
) -> None:
    certs_d = tmp_path_factory.getbasetemp() / "certs.d-domains"
    (certs_d / "_default").mkdir(parents=True, exist_ok=True)
    (certs_d / "_default" / "hosts.toml").write_text('[host."https://mirror.example"]\n')
    hosts = outcome(lambda: load_hosts(str(certs_d), domain), CrishimError, SECONDS)
    if isinstance(hosts, CrishimError):
        assert isinstance(hosts, InvalidArgument | ConfigError), repr(hosts)
        assert str(hosts)
        return
    assert hosts[-1].is_mirror is False
    for host in hosts:
        assert host.url.startswith(("http://", "https://"))
