"""Image references: Docker normalisation, the distribution grammar, and image queries."""

from __future__ import annotations

import pytest

from crishim.errors import InvalidArgument
from crishim.images.reference import (
    IdQuery,
    Reference,
    RefQuery,
    is_digest,
    parse_digest,
    parse_image_query,
    parse_reference,
)

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "0123456789abcdef" * 8
IMAGE_HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("user/img", "docker.io/user/img:latest"),
        ("user/img/sub", "docker.io/user/img/sub:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/user/img:v1", "docker.io/user/img:v1"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
        ("quay.io/org/app", "quay.io/org/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:dev", "localhost:5000/app:dev"),
        ("127.0.0.1:5000/e2e-test-images/busybox:1.29-2", None),
        ("myhost:5000/app", "myhost:5000/app:latest"),
        ("[::1]:5000/app:v1", "[::1]:5000/app:v1"),
        ("[2001:db8::1]/app", "[2001:db8::1]/app:latest"),
        # Uppercase makes a first component a domain (Docker's rule).
        ("Registry/app", "Registry/app:latest"),
        # Without a "/" the colon is a tag, never a port.
        ("localhost:5000", "docker.io/library/localhost:5000"),
        (f"busybox@{SHA256}", f"docker.io/library/busybox@{SHA256}"),
        (f"busybox:1.36@{SHA256}", f"docker.io/library/busybox:1.36@{SHA256}"),
        (f"localhost:5000/app:v1@{SHA512}", None),
        ("gcr.io/k8s-staging-cri-tools/test-image-user-uid-group:latest", None),
        ("a/b.c/d_e/f__g/h-i/j---k", "docker.io/a/b.c/d_e/f__g/h-i/j---k:latest"),
        ("busybox:_tag", "docker.io/library/busybox:_tag"),
        ("busybox:T.a-g_", "docker.io/library/busybox:T.a-g_"),
        (f"busybox:{'t' * 128}", f"docker.io/library/busybox:{'t' * 128}"),
        (f"{IMAGE_HEX}:v1", f"docker.io/library/{IMAGE_HEX}:v1"),
    ],
)
def test_normalises_like_docker(text: str, canonical: str | None) -> None:
    assert str(parse_reference(text)) == (canonical or text)


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None),
        (f"app@{SHA256}", "docker.io", "library/app", None, SHA256),
        (f"x.io/app:t@{SHA256}", "x.io", "app", "t", SHA256),
        ("[::1]/app", "[::1]", "app", "latest", None),
    ],
)
def test_parts(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    assert parse_reference(text) == Reference(domain, path, tag, digest)


def test_default_tag_applies_only_without_tag_and_digest() -> None:
    assert parse_reference("busybox", default_tag="stable").tag == "stable"
    assert parse_reference("busybox:1", default_tag="stable").tag == "1"
    assert parse_reference(f"busybox@{SHA256}", default_tag="stable").tag is None


def test_name_and_api_domain() -> None:
    hub = parse_reference("busybox")
    assert hub.name == "docker.io/library/busybox"
    assert hub.api_domain == "registry-1.docker.io"
    local = parse_reference("localhost:5000/app")
    assert local.name == "localhost:5000/app"
    assert local.api_domain == "localhost:5000"


def test_with_tag_and_with_digest_replace_the_pin() -> None:
    ref = parse_reference(f"busybox:1@{SHA256}")
    assert str(ref.with_tag("2")) == "docker.io/library/busybox:2"
    assert str(ref.with_digest(SHA512)) == f"docker.io/library/busybox@{SHA512}"


def test_helpers_validate_what_they_add() -> None:
    ref = parse_reference("busybox")
    with pytest.raises(InvalidArgument, match="invalid tag"):
        ref.with_tag("-bad")
    with pytest.raises(InvalidArgument, match="invalid digest"):
        ref.with_digest("sha256:abc")


def test_constructing_an_invalid_reference_fails() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r'invalid image reference "docker\.io/Library/x:latest": .* lowercase',
    ):
        Reference("docker.io", "Library/x", "latest", None)


def test_references_are_hashable_values() -> None:
    assert len({parse_reference("busybox"), parse_reference("docker.io/library/busybox")}) == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty reference"),
        (":tag", "repository name is empty"),
        (f"@{SHA256}", "repository name is empty"),
        ("busybox:", "empty tag after ':'"),
        ("Busybox", "repository name must be lowercase"),
        ("user/Img", "repository name must be lowercase"),
        ("x.io/App", "repository name must be lowercase"),
        ("busy box", 'invalid repository path component "busy box"'),
        ("bad!name", 'invalid repository path component "bad!name"'),
        ("a..b", 'invalid repository path component "a..b"'),
        ("a___b", 'invalid repository path component "a___b"'),
        ("-lead", 'invalid repository path component "-lead"'),
        ("trail.", 'invalid repository path component "trail."'),
        ("user//img", "repository path has an empty component"),
        ("x.io/", "repository path has an empty component"),
        ("-bad.io/app", 'invalid registry domain "-bad.io"'),
        ("bad_domain.io/app", 'invalid registry domain "bad_domain.io"'),
        ("x.io:port/app", 'invalid registry domain "x.io:port"'),
        ("[::g]/app", 'invalid registry domain "[::g]"'),
        ("busybox:-tag", 'invalid tag "-tag"'),
        ("busybox:.tag", 'invalid tag ".tag"'),
        ("busybox:t+g", 'invalid tag "t+g"'),
        (f"busybox:{'t' * 129}", "tag is too long (129 characters, at most 128)"),
        ("busybox@", 'invalid digest "": expected algorithm:hex'),
        ("busybox@sha256", 'invalid digest "sha256": expected algorithm:hex'),
        ("busybox@sha256:abc", "sha256 needs 64 lowercase hex characters"),
        (f"busybox@sha256:{'A' * 64}", "sha256 needs 64 lowercase hex characters"),
        (f"busybox@sha256:{'a' * 65}", "sha256 needs 64 lowercase hex characters"),
        ("busybox@sha512:" + "a" * 64, "sha512 needs 128 lowercase hex characters"),
        (f"busybox@{SHA256}@{SHA256}", "sha256 needs 64 lowercase hex characters"),
        ("busybox@1x:" + "a" * 32, 'invalid algorithm "1x"'),
        ("busybox@md5:abc", "at least 32 hex characters"),
        (IMAGE_HEX, "a 64-character hexadecimal string is an image ID"),
        ("x.io/" + "a" * 251, "repository name is too long (256 characters, at most 255)"),
        ("a" * 246, "repository name is too long (264 characters, at most 255)"),
    ],
)
def test_invalid_references_name_input_and_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference(text)
    message = str(info.value)
    assert message.startswith(f'invalid image reference "{text}": '), message
    assert problem in message


def test_long_input_is_cut_short_in_the_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference("a" * 1000)
    assert len(str(info.value)) < 400
    assert '..."' in str(info.value)


def test_control_characters_are_escaped_in_the_message() -> None:
    with pytest.raises(InvalidArgument, match=r'"busy\\nbox"'):
        parse_reference("busy\nbox")


def test_name_of_255_characters_is_accepted() -> None:
    assert len(parse_reference("x.io/" + "a" * 250).name) == 255


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_part"),
    [
        (SHA256, "sha256", "a" * 64),
        (SHA512, "sha512", "0123456789abcdef" * 8),
        ("sha384:" + "b" * 96, "sha384", "b" * 96),
        ("blake3:" + "c" * 64, "blake3", "c" * 64),
        ("multihash+base58:" + "AbCd" * 8, "multihash+base58", "AbCd" * 8),
        ("sha256.v2:" + "0" * 32, "sha256.v2", "0" * 32),
    ],
)
def test_parse_digest(text: str, algorithm: str, hex_part: str) -> None:
    assert parse_digest(text) == (algorithm, hex_part)
    assert is_digest(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected algorithm:hex"),
        ("a" * 64, "expected algorithm:hex"),
        ("sha256:", "sha256 needs 64 lowercase hex characters"),
        ("sha256:" + "g" * 64, "sha256 needs 64 lowercase hex characters"),
        ("sha384:" + "b" * 64, "sha384 needs 96 lowercase hex characters"),
        (":" + "a" * 32, 'invalid algorithm ""'),
        ("sha-:" + "a" * 32, 'invalid algorithm "sha-"'),
        ("blake3:" + "a" * 31, "at least 32 hex characters"),
        ("blake3:" + "z" * 32, "at least 32 hex characters"),
    ],
)
def test_invalid_digests(text: str, problem: str) -> None:
    assert not is_digest(text)
    with pytest.raises(InvalidArgument) as info:
        parse_digest(text)
    assert str(info.value).startswith(f'invalid digest "{text}": ')
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (IMAGE_HEX, IdQuery(f"sha256:{IMAGE_HEX}")),
        (f"sha256:{IMAGE_HEX}", IdQuery(f"sha256:{IMAGE_HEX}")),
        ("busybox", RefQuery(parse_reference("busybox"))),
        (f"busybox@sha256:{IMAGE_HEX}", RefQuery(parse_reference(f"busybox@sha256:{IMAGE_HEX}"))),
        # Short or uppercase hex is a name, not an ID.
        (IMAGE_HEX[:12], RefQuery(parse_reference(IMAGE_HEX[:12]))),
        (f"{IMAGE_HEX}:v1", RefQuery(parse_reference(f"{IMAGE_HEX}:v1"))),
        # A truncated "ID" is the valid reference docker.io/library/sha256:<63 hex>.
        (f"sha256:{IMAGE_HEX[:63]}", RefQuery(parse_reference(f"sha256:{IMAGE_HEX[:63]}"))),
    ],
)
def test_image_query_tells_ids_from_references(text: str, expected: IdQuery | RefQuery) -> None:
    assert parse_image_query(text) == expected


@pytest.mark.parametrize("text", ["", "sha256:", "Busybox", IMAGE_HEX.upper()])
def test_image_query_rejects_what_is_neither(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        parse_image_query(text)
