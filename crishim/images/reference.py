"""Image references: parsing, Docker normalisation and validation.

A reference names an image in a registry, in the grammar of the distribution project's
``reference`` package::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path            (at most 255 characters)
    domain     := host [ ":" port ]              host: DNS name, IPv4 or "[" IPv6 "]"
    path       := component ( "/" component )*
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex              sha256: 64, sha384: 96, sha512: 128 lowercase hex

Docker's normalisation comes on top: a first component is a domain only if it contains "."
or ":", is "localhost", or has uppercase letters; otherwise the domain is ``docker.io``.
``index.docker.io`` means ``docker.io``, and one-component paths on ``docker.io`` live under
``library/``. A reference with neither tag nor digest gets the default tag. So ``busybox`` is
``docker.io/library/busybox:latest``.

Requests that accept an image ID as well as a reference (RemoveImage, ImageStatus) go
through :func:`parse_image_query`, which tells the two apart.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from crishim.errors import InvalidArgument

DOCKER_DOMAIN = "docker.io"
DOCKER_API_DOMAIN = "registry-1.docker.io"
_LEGACY_DOCKER_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"

NAME_MAX = 255
TAG_MAX = 128

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ALGORITHM_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*")
_GENERIC_HEX_RE = re.compile(r"[0-9a-fA-F]{32,}")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")
# Registered algorithms have a fixed length of lowercase hex (as in opencontainers/go-digest).
_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_IMAGE_ID_HEX_RE = re.compile(r"[0-9a-f]{64}")

# Inputs come from requests; a message quotes at most this much of one.
_QUOTE_MAX = 300


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference; constructing one validates it."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __post_init__(self) -> None:
        problem = _reference_problem(self.domain, self.path, self.tag, self.digest)
        if problem:
            raise InvalidArgument(f"invalid image reference {_quote(str(self))}: {problem}")

    @property
    def name(self) -> str:
        """The repository name, ``domain/path``."""
        return f"{self.domain}/{self.path}"

    @property
    def api_domain(self) -> str:
        """The host that serves the registry API for this domain (Docker Hub's differs)."""
        return DOCKER_API_DOMAIN if self.domain == DOCKER_DOMAIN else self.domain

    def with_tag(self, tag: str) -> Reference:
        """``name:tag`` of the same repository, without a digest."""
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        """``name@digest`` of the same repository, without a tag (a "repo digest")."""
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class IdQuery:
    """An image asked for by its ID, always in the form ``sha256:<64 hex>``."""

    image_id: str


@dataclass(frozen=True)
class RefQuery:
    """An image asked for by a (normalised) reference."""

    ref: Reference


ImageQuery = IdQuery | RefQuery


def parse_reference(text: str, *, default_tag: str = "latest") -> Reference:
    """Parse and normalise ``text`` the way ``docker pull`` does.

    Raises InvalidArgument naming the input and the problem.
    """

    def invalid(problem: str) -> InvalidArgument:
        return InvalidArgument(f"invalid image reference {_quote(text)}: {problem}")

    if not text:
        raise invalid("empty reference")
    remote, at, digest_text = text.partition("@")
    digest = digest_text if at else None
    name, tag = remote, None
    # A tag's ":" comes after the last "/"; an earlier ":" belongs to a port.
    colon = remote.rfind(":")
    if colon > remote.rfind("/"):
        name, tag = remote[:colon], remote[colon + 1 :]
        if not tag:
            raise invalid("empty tag after ':'")
    if not name:
        raise invalid("repository name is empty")
    if _IMAGE_ID_HEX_RE.fullmatch(text):
        # Docker refuses these as names so that they always mean an image ID.
        raise invalid("a 64-character hexadecimal string is an image ID, not a repository name")

    domain, path = _split_domain(name)
    problem = _reference_problem(domain, path, tag, digest)
    if problem:
        raise invalid(problem)
    if tag is None and digest is None:
        tag = default_tag
    return Reference(domain, path, tag, digest)


@functools.lru_cache(maxsize=1024)
def parse_image_query(text: str) -> ImageQuery:
    """Tell an image ID (``<64 hex>`` or ``sha256:<64 hex>``) from a reference.

    Raises InvalidArgument when ``text`` is neither. Results are kept (they are frozen):
    kubelet asks about the same few images again and again.
    """
    hex_part = text.removeprefix("sha256:")
    if _IMAGE_ID_HEX_RE.fullmatch(hex_part):
        return IdQuery(f"sha256:{hex_part}")
    return RefQuery(parse_reference(text))


def parse_digest(text: str) -> tuple[str, str]:
    """Split a validated ``algorithm:hex`` digest; raises InvalidArgument otherwise."""
    problem = _digest_problem(text)
    if problem:
        raise InvalidArgument(f"invalid digest {_quote(text)}: {problem}")
    algorithm, _, hex_part = text.partition(":")
    return algorithm, hex_part


def is_digest(text: str) -> bool:
    """True when ``text`` is a valid ``algorithm:hex`` digest."""
    return _digest_problem(text) is None


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule for where the domain ends, plus its docker.io aliases."""
    first, slash, rest = name.partition("/")
    is_domain = slash and (
        "." in first or ":" in first or first == "localhost" or first != first.lower()
    )
    domain, path = (first, rest) if is_domain else (DOCKER_DOMAIN, name)
    if domain == _LEGACY_DOCKER_DOMAIN:
        domain = DOCKER_DOMAIN
    if domain == DOCKER_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return domain, path


def _reference_problem(domain: str, path: str, tag: str | None, digest: str | None) -> str | None:
    """What is wrong with these parts of a reference, or None."""
    if not _DOMAIN_RE.fullmatch(domain):
        return f"invalid registry domain {_quote(domain)}"
    if path != path.lower():
        return "repository name must be lowercase"
    for component in path.split("/"):
        if not component:
            return "repository path has an empty component"
        if not _PATH_COMPONENT_RE.fullmatch(component):
            return (
                f"invalid repository path component {_quote(component)}: use lowercase letters "
                "and digits, separated by '.', '_', '__' or dashes"
            )
    name_length = len(domain) + 1 + len(path)
    if name_length > NAME_MAX:
        return f"repository name is too long ({name_length} characters, at most {NAME_MAX})"
    if tag is not None:
        if len(tag) > TAG_MAX:
            return f"tag is too long ({len(tag)} characters, at most {TAG_MAX})"
        if not _TAG_RE.fullmatch(tag):
            return (
                f"invalid tag {_quote(tag)}: use letters, digits, '_', '.' and '-', "
                "not starting with '.' or '-'"
            )
    if digest is not None:
        problem = _digest_problem(digest)
        if problem:
            return f"invalid digest {_quote(digest)}: {problem}"
    return None


def _digest_problem(text: str) -> str | None:
    """What is wrong with an ``algorithm:hex`` digest, or None."""
    algorithm, colon, hex_part = text.partition(":")
    if not colon:
        return "expected algorithm:hex"
    expected = _HEX_LENGTHS.get(algorithm)
    if expected is not None:
        if len(hex_part) != expected or not _LOWER_HEX_RE.fullmatch(hex_part):
            return f"{algorithm} needs {expected} lowercase hex characters"
        return None
    if not _ALGORITHM_RE.fullmatch(algorithm):
        return f"invalid algorithm {_quote(algorithm)}"
    if not _GENERIC_HEX_RE.fullmatch(hex_part):
        return "the encoded part must be at least 32 hex characters"
    return None


def _quote(text: str) -> str:
    """Quote input for a message: escaped like JSON, long inputs cut short."""
    if len(text) > _QUOTE_MAX:
        return json.dumps(text[:_QUOTE_MAX], ensure_ascii=False)[:-1] + '..."'
    return json.dumps(text, ensure_ascii=False)
