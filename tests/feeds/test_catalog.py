"""Tests of feeds.catalog: every ready definition is a valid feed spec."""

from __future__ import annotations

import pytest

from feeds.catalog import CATALOG
from feeds.spec import FeedSpec

REQUIRED = {
    "feodo",
    "urlhaus",
    "threatfox",
    "spamhaus-drop",
    "spamhaus-dropv6",
    "et-compromised",
    "firehol-level1",
    "urlhaus-hostfile",
    "openphish",
}


def test_catalog_has_the_well_known_feeds() -> None:
    """The catalog names every feed the issue asks for."""
    assert set(CATALOG) >= REQUIRED


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_entry_validates(name: str) -> None:
    """Each entry validates, is remote, has a licence note and respects publisher rates."""
    spec = FeedSpec.model_validate({"catalog": name})
    assert spec.is_remote and spec.license
    assert spec.period >= 300.0
