"""Tests of feeds.jsonpath: the small path language of the json format."""

from __future__ import annotations

import pytest

from feeds.jsonpath import parse_path, select

DOC = {"a": {"b": [{"c": 1}, {"c": 2}, {"d": 3}]}, "x y": [10, 20], "m": {"k1": "v1", "k2": "v2"}}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", [DOC]),
        ("$", [DOC]),
        ("a.b[*].c", [1, 2]),
        ("$.a.b[].c", [1, 2]),
        ("a.b[1].c", [2]),
        ("['x y'][0]", [10]),
        ("m.*", ["v1", "v2"]),
        ("*.b[*].d", [3]),
        ("missing.b", []),
        ("a.b[9]", []),
    ],
)
def test_select(path: str, expected: list[object]) -> None:
    """Keys, wildcards, indexes and quoted keys select nodes in document order."""
    assert select(DOC, path) == expected


@pytest.mark.parametrize("path", ["a..b", "a[", "a b", "[x]"])
def test_syntax_errors(path: str) -> None:
    """Malformed paths raise ValueError naming the offset."""
    with pytest.raises(ValueError, match="offset"):
        parse_path(path)
