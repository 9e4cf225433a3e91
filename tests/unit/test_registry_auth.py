"""Parsing WWW-Authenticate challenges, credentials and the token cache."""

from __future__ import annotations

import base64
import inspect

import httpcore
import pytest

from crishim.images.auth import Challenge, Credentials, TokenCache, parse_challenges
from crishim.images.registry import RESPONSE_READ_BYTES


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/busybox:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/busybox:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="r", Bearer realm="http://t/token",service=s',
            [
                Challenge("basic", {"realm": "r"}),
                Challenge("bearer", {"realm": "http://t/token", "service": "s"}),
            ],
        ),
        ('Bearer realm="a\\"b"', [Challenge("bearer", {"realm": 'a"b'})]),
        ("Negotiate", [Challenge("negotiate", {})]),
        ("", []),
    ],
)
def test_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_auth_field_is_base64_user_colon_password() -> None:
    encoded = base64.b64encode(b"alice:s3:cret").decode()
    creds = Credentials.from_auth_field(encoded)
    assert (creds.username, creds.password) == ("alice", "s3:cret")
    with pytest.raises(ValueError, match="not base64"):
        Credentials.from_auth_field("!!!")
    with pytest.raises(ValueError, match="not base64"):
        Credentials.from_auth_field(base64.b64encode(b"nocolon").decode())


def test_anonymous_and_basic_header() -> None:
    assert Credentials().anonymous
    creds = Credentials(username="u", password="p")
    assert not creds.anonymous
    assert creds.basic_header() == "Basic " + base64.b64encode(b"u:p").decode()


def test_tokens_are_reused_until_near_expiry() -> None:
    cache = TokenCache()
    key = ("h", "repo", "pull", "u")
    cache.put(key, "long", 3600)
    assert cache.get(key) == "long"
    cache.put(key, "short", 5)  # inside the renewal margin: treated as expired
    assert cache.get(key) is None
    assert cache.get(("other", "repo", "pull", "u")) is None


def test_responses_are_read_in_large_pieces() -> None:
    # The setting is a class attribute of httpcore's: fail when httpcore stops reading it.
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == RESPONSE_READ_BYTES
    assert "self.READ_NUM_BYTES" in inspect.getsource(httpcore.AsyncHTTP11Connection._receive_event)
