"""Label selection as CRI list filters use it: every selector pair must be present."""

from __future__ import annotations

from collections.abc import Mapping


def matches_selector(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """True when ``labels`` holds every key of ``selector`` with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())
