"""TOML documents for property tests: a small writer and hypothesis strategies.

:func:`toml_text` writes a document (a dict of TOML values) as TOML text, every table
inline, so any key (empty, dotted, non-ASCII) and any nesting survive the trip through
``tomllib``. The strategies generate arbitrary values, arbitrary documents, and random
edits of a given document (a value replaced by one of another type, a key added or
removed), the usual ways a hand-written configuration goes wrong.
"""

from __future__ import annotations

import datetime
import functools
import math
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "mutated_documents",
    "toml_documents",
    "toml_key",
    "toml_text",
    "toml_values",
]


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for char in text:
        if char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    """A key, always quoted: no key can be misread as a dotted one."""
    return _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a TOML value: {type(value).__name__}")


def toml_text(document: Mapping[str, Any]) -> str:
    """The document as TOML text, one top-level key per line."""
    return "".join(f"{toml_key(key)} = {_value(value)}\n" for key, value in document.items())


# TOML text cannot carry surrogates; everything else may appear in strings and keys.
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)

_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    _text,
    st.dates(),
    st.times(),
    st.datetimes(),
    st.builds(
        lambda moment, minutes: moment.replace(
            tzinfo=datetime.timezone(datetime.timedelta(minutes=minutes))
        ),
        st.datetimes(),
        st.integers(-23 * 60, 23 * 60),
    ),
)


@functools.cache  # building a recursive strategy costs more than drawing from it
def toml_values(keys: st.SearchStrategy[str] = _text) -> st.SearchStrategy[Any]:
    """Any TOML value: scalars, arrays (mixed types allowed) and tables, nested."""
    return st.recursive(
        _scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=12,
    )


def toml_documents(
    keys: st.SearchStrategy[str] = _text, values: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """A whole document: a table of ``keys`` to ``values`` (any TOML value by default)."""
    return st.dictionaries(keys, values if values is not None else toml_values(keys), max_size=6)


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of every table entry below ``value`` (not inside arrays)."""
    paths: list[tuple[str, ...]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            paths.append((*prefix, key))
            paths += _paths(item, (*prefix, key))
    return paths


def _tables(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of every table, the document itself included."""
    if not isinstance(value, Mapping):
        return []
    found = [prefix]
    for key, item in value.items():
        found += _tables(item, (*prefix, key))
    return found


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _at(document: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    table = document
    for key in path:
        inner = table[key]
        assert isinstance(inner, dict)
        table = inner
    return table


@st.composite
def mutated_documents(
    draw: st.DrawFn,
    documents: st.SearchStrategy[dict[str, Any]],
    keys: st.SearchStrategy[str] = _text,
) -> dict[str, Any]:
    """A document from ``documents`` with one to three random edits."""
    document: dict[str, Any] = _copy(draw(documents))
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["replace", "add", "remove"]))
        paths = _paths(document)
        if edit == "replace" and paths:
            path = draw(st.sampled_from(paths))
            _at(document, path[:-1])[path[-1]] = draw(toml_values(keys))
        elif edit == "remove" and paths:
            path = draw(st.sampled_from(paths))
            del _at(document, path[:-1])[path[-1]]
        else:
            table = _at(document, draw(st.sampled_from(_tables(document))))
            table[draw(keys)] = draw(toml_values(keys))
    return document
