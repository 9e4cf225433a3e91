"""Registry endpoints from containerd's hosts.toml directory layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from crishim.errors import ConfigError, InvalidArgument
from crishim.images.hosts import ALL_CAPABILITIES, RegistryHost, hosts_for, load_hosts

# The shared conformance folder sits next to the checkout (see shared/conformance/README.md).
SHARED_CERTS_D = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "certs.d"


def write_hosts(root: Path, folder: str, text: str) -> Path:
    path = root / folder / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def urls(hosts: list[RegistryHost]) -> list[str]:
    return [host.url for host in hosts]


@pytest.mark.parametrize(
    ("domain", "url"),
    [
        ("docker.io", "https://registry-1.docker.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
        ("myregistry.example:5000", "https://myregistry.example:5000"),
        ("10.0.0.1:5000", "https://10.0.0.1:5000"),
        ("localhost", "http://localhost"),
        ("localhost:5000", "http://localhost:5000"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.1.2.3", "http://127.1.2.3"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("[::1]", "http://[::1]"),
        ("localhost.example.com", "https://localhost.example.com"),
    ],
)
def test_default_upstream_without_config(domain: str, url: str) -> None:
    assert load_hosts(None, domain) == [
        RegistryHost(
            url=url,
            api_base=url + "/v2",
            capabilities=ALL_CAPABILITIES,
            skip_verify=False,
            ca=(),
            client=(),
            header={},
            override_path=False,
            is_mirror=False,
            dial_timeout=None,
        )
    ]


def test_missing_config_dir_gives_the_default_upstream(tmp_path: Path) -> None:
    assert urls(load_hosts(str(tmp_path / "absent"), "quay.io")) == ["https://quay.io"]


def test_missing_domain_folder_gives_the_default_upstream(tmp_path: Path) -> None:
    write_hosts(tmp_path, "gcr.io", 'server = "https://gcr.io"\n[host."https://m.example"]\n')
    assert urls(load_hosts(str(tmp_path), "quay.io")) == ["https://quay.io"]


def test_mirrors_in_file_order_then_server(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "registry.k8s.io",
        """
server = "https://registry.k8s.io"

[host."https://zeta.example"]
  capabilities = ["pull", "resolve"]
[host."http://alpha.example:5000"]
  capabilities = ["pull"]
[host."https://mid.example"]
""",
    )
    hosts = load_hosts(str(tmp_path), "registry.k8s.io")
    assert urls(hosts) == [
        "https://zeta.example",
        "http://alpha.example:5000",
        "https://mid.example",
        "https://registry.k8s.io",
    ]
    assert [host.is_mirror for host in hosts] == [True, True, True, False]
    assert [host.capabilities for host in hosts] == [
        {"pull", "resolve"},
        {"pull"},
        ALL_CAPABILITIES,
        ALL_CAPABILITIES,
    ]


def test_default_folder_serves_domains_without_their_own(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default", '[host."http://cache.local:5000"]\n')
    write_hosts(tmp_path, "quay.io", 'server = "https://quay.io"\n')
    assert urls(load_hosts(str(tmp_path), "ghcr.io")) == [
        "http://cache.local:5000",
        "https://ghcr.io",  # the server defaults to the domain asked for
    ]
    assert urls(load_hosts(str(tmp_path), "docker.io")) == [
        "http://cache.local:5000",
        "https://registry-1.docker.io",
    ]
    assert urls(load_hosts(str(tmp_path), "quay.io")) == ["https://quay.io"]


@pytest.mark.parametrize("folder", ["127.0.0.1:5000", "127.0.0.1_5000_"])
def test_folder_names_with_a_port(tmp_path: Path, folder: str) -> None:
    write_hosts(tmp_path, folder, 'server = "https://127.0.0.1:5000"\n')
    assert urls(load_hosts(str(tmp_path), "127.0.0.1:5000")) == ["https://127.0.0.1:5000"]


@pytest.mark.parametrize(
    ("domain", "url"),
    [
        ("localhost:5000", "http://localhost:5000"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("docker.io", "https://registry-1.docker.io"),
        ("example.com", "https://example.com"),
    ],
)
def test_server_absent_from_file_uses_the_domain_default(
    tmp_path: Path, domain: str, url: str
) -> None:
    write_hosts(tmp_path, domain, "skip_verify = true\n")
    [server] = load_hosts(str(tmp_path), domain)
    assert (server.url, server.skip_verify, server.is_mirror) == (url, True, False)


def test_empty_server_means_the_default_like_containerd(tmp_path: Path) -> None:
    write_hosts(tmp_path, "localhost:5000", 'server = ""\n')
    assert urls(load_hosts(str(tmp_path), "localhost:5000")) == ["http://localhost:5000"]


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("https://docker.io", "https://registry-1.docker.io"),
        ("docker.io", "https://registry-1.docker.io"),
        ("https://docker.io:443", "https://docker.io:443"),
        ("https://registry-1.docker.io", "https://registry-1.docker.io"),
    ],
)
def test_docker_hub_server_is_its_api_host(tmp_path: Path, server: str, url: str) -> None:
    write_hosts(tmp_path, "docker.io", f'server = "{server}"\n')
    assert urls(load_hosts(str(tmp_path), "docker.io")) == [url]


@pytest.mark.parametrize(
    ("url_text", "override_path", "url", "api_base"),
    [
        ("https://m.example", False, "https://m.example", "https://m.example/v2"),
        ("m.example:8443", False, "https://m.example:8443", "https://m.example:8443/v2"),
        ("HTTP://m.example", False, "http://m.example", "http://m.example/v2"),
        ("https://m.example/", False, "https://m.example", "https://m.example/v2"),
        (
            "https://m.example/proxy/",
            False,
            "https://m.example/proxy",
            "https://m.example/proxy/v2",
        ),
        (
            "https://m.example//a/./b/../c",
            False,
            "https://m.example/a/c",
            "https://m.example/a/c/v2",
        ),
        ("https://m.example/v2", False, "https://m.example/v2", "https://m.example/v2"),
        (
            "https://m.example/api/v2/x",
            True,
            "https://m.example/api/v2/x",
            "https://m.example/api/v2/x",
        ),
        ("https://m.example", True, "https://m.example", "https://m.example"),
        ("http://[::1]:5000/p", False, "http://[::1]:5000/p", "http://[::1]:5000/p/v2"),
    ],
)
def test_api_base_and_override_path(
    tmp_path: Path, url_text: str, override_path: bool, url: str, api_base: str
) -> None:
    flag = str(override_path).lower()
    write_hosts(tmp_path, "x.io", f'[host."{url_text}"]\noverride_path = {flag}\n')
    mirror = load_hosts(str(tmp_path), "x.io")[0]
    assert (mirror.url, mirror.api_base, mirror.override_path) == (url, api_base, override_path)


def test_server_override_path(tmp_path: Path) -> None:
    write_hosts(tmp_path, "x.io", 'server = "https://x.io/custom/api"\noverride_path = true\n')
    [server] = load_hosts(str(tmp_path), "x.io")
    assert server.api_base == "https://x.io/custom/api"


def test_tls_files_resolve_relative_to_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "x.io"
    write_hosts(
        tmp_path,
        "x.io",
        """
ca = "ca.crt"
client = [["certs/client.cert", "/abs/client.key"], "both.pem"]

[host."https://m.example"]
  ca = ["/etc/ssl/a.pem", "../shared/b.pem"]
  client = "single.pem"
""",
    )
    mirror, server = load_hosts(str(tmp_path), "x.io")
    assert mirror.ca == ("/etc/ssl/a.pem", str(tmp_path / "shared" / "b.pem"))
    assert mirror.client == ((str(folder / "single.pem"), None),)
    assert server.ca == (str(folder / "ca.crt"),)
    assert server.client == (
        (str(folder / "certs" / "client.cert"), "/abs/client.key"),
        (str(folder / "both.pem"), None),
    )


def test_headers_string_or_list(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "x.io",
        """
[host."https://m.example"]
  header = { X-One = "1" }
[host."https://n.example".header]
  X-Many = ["a", "b"]
""",
    )
    first, second, server = load_hosts(str(tmp_path), "x.io")
    assert first.header == {"X-One": ("1",)}
    assert second.header == {"X-Many": ("a", "b")}
    assert server.header == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["PULL", "Resolve"]', {"pull", "resolve"}),
        ('"push"', {"push"}),
        ("[]", ALL_CAPABILITIES),  # containerd: empty means all
    ],
)
def test_capabilities(tmp_path: Path, value: str, expected: frozenset[str]) -> None:
    write_hosts(tmp_path, "x.io", f"capabilities = {value}\n")
    assert load_hosts(str(tmp_path), "x.io")[0].capabilities == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ('"5s"', 5.0),
        ('"1m30s"', 90.0),
        ('"1.5h"', 5400.0),
        ('"250ms"', 0.25),
        ('""', None),
        ('"2562047h"', 2562047 * 3600.0),  # Go's longest duration is 2562047h47m16.85s
    ],
)
def test_dial_timeout_is_a_go_duration(tmp_path: Path, value: str, seconds: float | None) -> None:
    write_hosts(tmp_path, "x.io", f"dial_timeout = {value}\n")
    assert load_hosts(str(tmp_path), "x.io")[0].dial_timeout == seconds


def test_hosts_for_filters_by_capability(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "x.io",
        """
server = "https://x.io"
capabilities = ["pull", "resolve", "push"]
[host."https://pull-only.example"]
  capabilities = ["pull"]
[host."https://resolver.example"]
  capabilities = ["pull", "resolve"]
""",
    )
    assert urls(hosts_for(str(tmp_path), "x.io", "resolve")) == [
        "https://resolver.example",
        "https://x.io",
    ]
    assert urls(hosts_for(str(tmp_path), "x.io", "pull")) == [
        "https://pull-only.example",
        "https://resolver.example",
        "https://x.io",
    ]
    assert urls(hosts_for(str(tmp_path), "x.io", "push")) == ["https://x.io"]


def test_folder_without_hosts_toml_reads_docker_cert_files(tmp_path: Path) -> None:
    folder = tmp_path / "localhost:5000"
    folder.mkdir()
    for name in ("b.crt", "a.crt", "client.cert", "client.key", "lone.cert", "notes.txt"):
        (folder / name).write_text("")
    (folder / "sub.crt").mkdir()
    [server] = load_hosts(str(tmp_path), "localhost:5000")
    assert server.url == "http://localhost:5000"
    assert server.ca == (str(folder / "a.crt"), str(folder / "b.crt"))
    assert server.client == (
        (str(folder / "client.cert"), str(folder / "client.key")),
        (str(folder / "lone.cert"), None),
    )


@pytest.mark.parametrize("domain", ["", "../etc", "a/b", ".."])
def test_domain_must_not_leave_the_config_dir(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid registry domain"):
        load_hosts(str(tmp_path), domain)


@pytest.mark.parametrize("domain", ["a" * 300, "a" * 252 + ":5000"])
def test_domain_too_long_for_a_folder_name_falls_back_to_default(
    tmp_path: Path, domain: str
) -> None:
    write_hosts(tmp_path, "_default", '[host."https://mirror.example"]\n')
    assert urls(load_hosts(str(tmp_path), domain)) == [
        "https://mirror.example",
        f"https://{domain}",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("sever = 'https://x.io'\n", "sever: unknown key (known: ca, capabilities,"),
        ('[host."https://m"]\nsikp_verify = true\n', 'host."https://m".sikp_verify: unknown key'),
        ('[host."https://m"]\nserver = "https://m"\n', 'host."https://m".server: unknown key'),
        ("skip_verify = 'yes'\n", "skip_verify: expected true or false, got a string"),
        ("override_path = 1\n", "override_path: expected true or false, got an integer"),
        ("server = 5\n", "server: expected a string, got an integer"),
        ("ca = 5\n", "ca: expected a string or an array of strings, got an integer"),
        ("ca = ['a', 1]\n", "ca: expected a string or an array of strings, got an array of"),
        ("ca = ''\n", "ca: empty file path"),
        ('ca = "a\\u0000.crt"\n', "ca: a file path must not contain a NUL character"),
        ('client = [["c", "k\\u0000"]]\n', "client: a file path must not contain a NUL"),
        ("client = [['a']]\n", "client: expected a file or a [cert, key] pair, got an array of"),
        ("client = [['a', 'b', 'c']]\n", "client: expected a file or a [cert, key] pair"),
        ("client = 1\n", "client: expected a file or [cert, key] pairs, got an integer"),
        ("capabilities = ['pull', 'fetch']\n", "capabilities: unknown capability fetch"),
        ("capabilities = 'pull,push'\n", "capabilities: unknown capability pull,push"),
        ("header = 'X-A: b'\n", "header: expected a table, got a string"),
        ("header = { X-A = 1 }\n", 'header."X-A": expected a string or an array of strings'),
        ("header = { 'X A' = 'b' }\n", 'header."X A": not a valid HTTP header name'),
        ('header = { X-A = "b\\r\\nX-B: c" }\n', 'header."X-A": a header value must not'),
        ('header = { X-A = "caf\u00e9" }\n', 'header."X-A": a header value must be printable'),
        ('header = { X-A = ["a", "\\u0007"] }\n', 'header."X-A": a header value must be printable'),
        ('header = { X-A = " padded " }\n', 'header."X-A": a header value must be printable'),
        ("dial_timeout = '5'\n", 'dial_timeout: expected a duration such as "5s"'),
        ("dial_timeout = '-1s'\n", "dial_timeout: expected a duration"),
        ("dial_timeout = '2562048h'\n", "dial_timeout: expected a duration"),
        (f"dial_timeout = '{'9' * 400}s'\n", "dial_timeout: expected a duration"),
        ("dial_timeout = 5\n", "dial_timeout: expected a string, got an integer"),
        ("host = 'https://m'\n", "host: expected a table of hosts, got a string"),
        ("host = { 'https://m' = 1 }\n", 'host."https://m": expected a table, got an integer'),
        ('[host."ftp://m"]\n', 'host."ftp://m": unsupported URL scheme "ftp": use http or https'),
        ('server = "unix:///run/r.sock"\n', 'server: unsupported URL scheme "unix"'),
        ('[host."https://"]\n', 'host."https://": expected scheme://host[:port][/path]'),
        ('[host."https://u:p@m"]\n', "expected scheme://host[:port][/path]"),
        ('[host."https://m?x=1"]\n', "expected scheme://host[:port][/path]"),
        ('[host."https://m:http"]\n', 'host."https://m:http": invalid port'),
        ('server = "https://\\u0080"\n', 'server: invalid host name "\x80"'),
        ('server = "https://a%20b"\n', 'server: invalid host name "a%20b"'),
        ('[host."https://xn--a.example"]\n', 'host."https://xn--a.example": invalid host'),
        ('server = "https://x.io/\\u001f"\n', "server: a URL must not contain control characters"),
        ('server = "https://x.io\\n"\n', "server: a URL must not contain control characters"),
        ("server = [\n", "not valid TOML"),
        ("a = 1\na = 2\n", "not valid TOML"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML: arrays or tables nested"),
        ("header = " + "{a = " * 2000 + "1" + "}" * 2000, "not valid TOML: arrays or tables"),
    ],
)
def test_bad_files_name_file_key_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write_hosts(tmp_path, "x.io", text)
    with pytest.raises(ConfigError) as info:
        load_hosts(str(tmp_path), "x.io")
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert problem in message, message


def test_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = write_hosts(tmp_path, "x.io", "")
    path.write_bytes(b'server = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_hosts(str(tmp_path), "x.io")


def test_shared_conformance_mirrors() -> None:
    if not SHARED_CERTS_D.is_dir():
        pytest.skip(f"{SHARED_CERTS_D} is not on this machine (shared conformance folder)")
    config_path = str(SHARED_CERTS_D)
    mirror, server = load_hosts(config_path, "registry.k8s.io")
    assert (mirror.url, mirror.api_base) == ("http://127.0.0.1:5000", "http://127.0.0.1:5000/v2")
    assert mirror.is_mirror
    assert mirror.skip_verify
    assert mirror.capabilities == {"pull", "resolve"}
    assert (server.url, server.is_mirror) == ("https://registry.k8s.io", False)
    local = load_hosts(config_path, "127.0.0.1:5000")
    assert {host.url for host in local} == {"http://127.0.0.1:5000"}
    assert all(host.api_base == "http://127.0.0.1:5000/v2" for host in local)
    assert urls(hosts_for(config_path, "docker.io", "pull")) == [
        "http://127.0.0.1:5000",
        "https://registry-1.docker.io",
    ]
