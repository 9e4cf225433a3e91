"""Property tests of image reference parsing: any text gives a Reference or InvalidArgument.

Inputs are arbitrary text, references built from the grammar, and such references with
random edits (the near misses a hand-written parser gets wrong). A parsed reference must
be a fixed point: its string form parses back to the same reference.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crishim.errors import InvalidArgument
from crishim.images.reference import (
    NAME_MAX,
    TAG_MAX,
    IdQuery,
    Reference,
    RefQuery,
    is_digest,
    parse_digest,
    parse_image_query,
    parse_reference,
)
from tests.rig.bounds import outcome, time_limit

# A message quotes at most ~300 characters of each input part; JSON escapes may grow them.
MESSAGE_MAX = 4000
SECONDS = 2.0

_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
_port = st.integers(0, 99999).map(lambda p: f":{p}")
_dns_domain = st.builds(
    lambda parts, port: ".".join(parts) + port,
    st.lists(_domain_component, min_size=2, max_size=4),
    st.one_of(st.just(""), _port),
)
_domain = st.one_of(
    _dns_domain,
    st.builds(lambda host, port: host + port, _domain_component, _port),
    st.sampled_from(["localhost", "localhost:5000", "docker.io", "index.docker.io"]),
    st.from_regex(r"\[[0-9a-f]{0,4}(:[0-9a-f]{0,4}){1,7}\](:[0-9]{1,5})?", fullmatch=True),
)
_path_component = st.from_regex(
    r"[a-z0-9]{1,6}(([._]|__|-{1,3})[a-z0-9]{1,6}){0,2}", fullmatch=True
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_digest = st.one_of(
    _hex64.map(lambda h: f"sha256:{h}"),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
    st.text("0123456789abcdefABCDEF", min_size=32, max_size=40).map(lambda h: f"blake3:{h}"),
)


@st.composite
def grammar_references(draw: st.DrawFn) -> tuple[str, str | None, str, str | None, str | None]:
    """(text, domain or None, path, tag, digest) of a reference written by the grammar."""
    domain = draw(st.one_of(st.none(), _domain))
    components = draw(st.lists(_path_component, min_size=1, max_size=3))
    if domain is None and "." in components[0]:
        # Docker's rule would read it as a domain: keep the name unambiguous.
        components[0] = components[0].replace(".", "-")
    path = "/".join(components)
    tag = draw(st.one_of(st.none(), _tag))
    digest = draw(st.one_of(st.none(), _digest))
    text = (f"{domain}/" if domain else "") + path
    text += (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")
    return text, domain, path, tag, digest


@st.composite
def edited_references(draw: st.DrawFn) -> str:
    """A grammar reference with a few random insertions, deletions and replacements."""
    text = draw(grammar_references())[0]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        char = draw(st.one_of(st.sampled_from(list(":/@.-_[]A\0 ")), st.characters()))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert":
            text = text[:at] + char + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + char + text[at + 1 :]
    return text


any_reference_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(list("aZ09:/@.-_[]")), max_size=80),
    edited_references(),
    st.text(min_size=250, max_size=2000),
)


def _check_parsed(ref: Reference) -> None:
    assert parse_reference(str(ref)) == ref
    assert Reference(ref.domain, ref.path, ref.tag, ref.digest) == ref
    assert len(ref.name) <= NAME_MAX
    assert ref.tag is None or len(ref.tag) <= TAG_MAX
    assert ref.tag is not None or ref.digest is not None


def _check_error(exc: InvalidArgument) -> None:
    assert str(exc)
    assert len(str(exc)) <= MESSAGE_MAX


@given(any_reference_text)
@example("a" * 10_000)
@example("/" * 500 + ":" + "@" * 500)
@example("[" + ":" * 300 + "]/x")
def test_any_text_parses_to_a_fixed_point_or_invalid_argument(text: str) -> None:
    ref = outcome(lambda: parse_reference(text), InvalidArgument, SECONDS)
    if isinstance(ref, InvalidArgument):
        _check_error(ref)
    else:
        _check_parsed(ref)


@given(grammar_references())
def test_references_of_the_grammar_parse_and_keep_their_parts(
    case: tuple[str, str | None, str, str | None, str | None],
) -> None:
    text, domain, path, tag, digest = case
    ref = outcome(lambda: parse_reference(text), InvalidArgument, SECONDS)
    if isinstance(ref, InvalidArgument):
        # The grammar allows what its length limits do not, and a bare 64-hex name.
        assert "too long" in str(ref) or "image ID" in str(ref), str(ref)
        return
    _check_parsed(ref)
    assert ref.digest == digest
    assert ref.tag == (tag if tag is not None or digest else "latest")
    assert ref.path == path or ref.path == f"library/{path}"
    if domain is not None and domain not in ("docker.io", "index.docker.io"):
        is_domain = "." in domain or ":" in domain or domain == "localhost"
        assert ref.domain == domain if is_domain else ref.domain == "docker.io"


@given(st.one_of(any_reference_text, _hex64, _hex64.map(lambda h: f"sha256:{h}")))
def test_any_image_query_is_an_id_a_reference_or_invalid_argument(text: str) -> None:
    query = outcome(lambda: parse_image_query(text), InvalidArgument, SECONDS)
    if isinstance(query, InvalidArgument):
        _check_error(query)
    elif isinstance(query, IdQuery):
        assert query.image_id == "sha256:" + text.removeprefix("sha256:")
    else:
        assert isinstance(query, RefQuery)
        _check_parsed(query.ref)


@given(st.one_of(st.text(max_size=200), _digest, _digest.map(lambda d: d + "\n")))
def test_is_digest_agrees_with_parse_digest(text: str) -> None:
    with time_limit(SECONDS):
        valid = is_digest(text)
        if not valid:
            with pytest.raises(InvalidArgument):
                parse_digest(text)
            return
        algorithm, hex_part = parse_digest(text)
    assert f"{algorithm}:{hex_part}" == text


@given(
    st.one_of(_domain, st.text(max_size=30)),
    st.one_of(_path_component, st.text(max_size=30)),
    st.one_of(st.none(), _tag, st.text(max_size=30)),
    st.one_of(st.none(), _digest, st.text(max_size=80)),
)
def test_constructing_a_reference_validates_every_part(
    domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    ref = outcome(lambda: Reference(domain, path, tag, digest), InvalidArgument, SECONDS)
    if isinstance(ref, InvalidArgument):
        _check_error(ref)
        return
    again = outcome(lambda: parse_reference(str(ref)), InvalidArgument, SECONDS)
    if isinstance(again, InvalidArgument):
        return  # normalising (docker.io adds "library/") can make the name too long
    assert again.digest == ref.digest
    assert again.tag == (ref.tag if ref.tag is not None or ref.digest else "latest")
